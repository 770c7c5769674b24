"""The Hugging Face-side config vLLM reads for a sphinx-x model directory.

vLLM picks a model class from ``config.architectures``, sizes the KV cache from the text config,
and loads the tokenizer next to an HF-readable ``config.json``. A sphinx-x model directory's
``config.json`` is our own format (flavour, token ids), so :func:`prepare_vllm_dir` writes a small
directory beside it (no weights copied)::

    <vllm dir>/config.json     SphinxXConfig: architectures ["SphinxXForConditionalGeneration"],
                               model_type "sphinx_x", text_config (LlamaConfig | MixtralConfig),
                               flavour {...every Flavour field...}, image_token_index, model_dir
    <vllm dir>/<every other entry of the model directory>   symlinks (tokenizer files, ...)

    >>> LLM(model=str(prepare_vllm_dir("out/export")), load_format="sphinx_x", ...)

The plugin (actors.vllm_plugin) registers ``model_type "sphinx_x"`` with transformers' AutoConfig
in every vLLM process, and the load format ``"sphinx_x"`` reads the weights from ``model_dir``
(actors.vllm_loader). The text config is built exactly as ``models.sphinx.build_llm`` builds the
PyTorch LLM (flavour kwargs + the token ids), so vLLM's Llama/Mixtral has the trained shapes.
:func:`read_model_config` is the one place that reads the model directory's config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from transformers import CONFIG_MAPPING, AutoConfig, LlamaConfig, MixtralConfig, PreTrainedConfig

from models.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError
from models.flavours import Flavour
from models.tiling import DEFAULT_MAX_PIXELS

ARCHITECTURE = "SphinxXForConditionalGeneration"
LOAD_FORMAT = "sphinx_x"  # the vLLM load format registered by the plugin
MODEL_TYPE = "sphinx_x"
_TEXT_ARCH = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


class SphinxXConfig(PreTrainedConfig):
    """The whole model for vLLM: ``text_config`` (the LLM), ``flavour`` (a Flavour as a dict:
    vision geometry and encoders), the token ids, ``model_dir`` (the sphinx-x model directory the
    weights are read from) and ``max_image_pixels`` (the processor's decode limit; override with
    ``hf_overrides={"max_image_pixels": N}``)."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: Union[dict, PreTrainedConfig, None] = None,
                 flavour: Optional[dict] = None, image_token_index: int = 0, model_dir: str = "",
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, **kwargs: Any):
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", "llama")](**text_config)
        self.text_config = text_config if text_config is not None else LlamaConfig()
        self.flavour = dict(flavour or {})
        self.image_token_index = int(image_token_index)
        self.model_dir = str(model_dir)
        self.max_image_pixels = int(max_image_pixels)
        kwargs.setdefault("architectures", [ARCHITECTURE])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def get_flavour(self) -> Flavour:
        return Flavour.from_dict(self.flavour)


def text_architecture(flavour: Flavour) -> str:
    """vLLM's decoder class name for the flavour's LLM."""
    return _TEXT_ARCH[flavour.llm_arch]


def read_model_config(model_dir: Union[str, Path]) -> SphinxXConfig:
    """A sphinx-x model directory's config.json → :class:`SphinxXConfig` (clear error if it is not one)."""
    src = Path(model_dir)
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"not a sphinx-x model directory (no config.json): {src}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                              f"{raw.get('format')!r} version {raw.get('format_version')!r}")
    try:
        flavour = Flavour.from_dict(raw["flavour"])
        ids = {k: int(raw["token_ids"][k]) for k in
               ("vocab_size", "image_token_id", "pad_token_id", "bos_token_id", "eos_token_id")}
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad 'flavour' or 'token_ids': {err}") from None
    dtype = raw.get("dtype", "float32")
    # the same kwargs as models.sphinx.build_llm
    kwargs = dict(flavour.llm, vocab_size=ids["vocab_size"], pad_token_id=ids["pad_token_id"],
                  bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                  architectures=[text_architecture(flavour)], dtype=dtype, tie_word_embeddings=False)
    text = MixtralConfig(**kwargs) if flavour.is_moe else LlamaConfig(**kwargs)
    return SphinxXConfig(text_config=text, flavour=flavour.to_dict(), image_token_index=ids["image_token_id"],
                         model_dir=str(src.resolve()),
                         pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"],
                         eos_token_id=ids["eos_token_id"], dtype=dtype)


def prepare_vllm_dir(model_dir: Union[str, Path], out_dir: Union[str, Path, None] = None) -> Path:
    """Write the vLLM directory of a sphinx-x model directory (module docstring); returns it.

    ``out_dir`` defaults to ``<tmp>/sphinx-x-vllm/<hash of the absolute model path>``. Idempotent:
    config.json is rewritten (atomically) and the symlinks refreshed on every call."""
    src = Path(model_dir).resolve()
    config = read_model_config(src)
    if out_dir is None:
        digest = hashlib.sha1(str(src).encode()).hexdigest()[:12]
        out_dir = Path(tempfile.gettempdir()) / "sphinx-x-vllm" / f"{src.name}-{digest}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name == "config.json":
            continue
        link = out / entry.name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and os.readlink(link) == str(entry):
                continue
            link.unlink()
        link.symlink_to(entry)
    tmp = out / f".config.json.{os.getpid()}"
    tmp.write_text(config.to_json_string(use_diff=False))
    tmp.replace(out / "config.json")
    return out
