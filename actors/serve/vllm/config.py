"""The Hugging Face-side config vLLM reads for a sphinx-x model directory.

vLLM picks a model class from ``config.architectures``, sizes the KV cache from the text config,
and loads the tokenizer next to an HF-readable ``config.json``. A sphinx-x model directory's
``config.json`` is our own format (flavour, token ids), so :func:`prepare_vllm_dir` writes a small
directory beside it (no weights copied)::

    <vllm dir>/config.json     SphinxXConfig: architectures ["SphinxXForConditionalGeneration"],
                               model_type "sphinx_x", text_config (llm/config.json: Llama | Mixtral),
                               flavour {...every Flavour field...}, image_token_index, model_dir
    <vllm dir>/llm, convnext, dinov2, mm_projector.safetensors      symlinks to the model directory's
    <vllm dir>/tokenizer.json, tokenizer_config.json, generation_config.json, ...   symlinks into llm/

    >>> LLM(model=str(prepare_vllm_dir("out/export")), load_format="sphinx_x", ...)

The plugin (actors.serve.vllm.plugin) registers ``model_type "sphinx_x"`` with transformers' AutoConfig
in every vLLM process, and the load format ``"sphinx_x"`` reads the weights from ``model_dir``
(actors.serve.vllm.loader). The text config is ``llm/``'s own HF config (what AutoModelForCausalLM
loads), so vLLM's Llama/Mixtral has the trained shapes. :func:`read_model_config` is the one
place that reads the model directory's configs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from transformers import CONFIG_MAPPING, AutoConfig, LlamaConfig, PreTrainedConfig

from models.weights.model_dir import LLM_DIR, CheckpointError, read_config
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
    """A sphinx-x model directory → :class:`SphinxXConfig`: its config.json (checked by
    ``models.weights.model_dir.read_config``) and, as ``text_config``, the HF config of its ``llm/``."""
    src = Path(model_dir).resolve()
    raw = read_config(src)
    flavour: Flavour = raw["flavour"]
    ids = raw["token_ids"]
    llm_dir = src / LLM_DIR
    try:
        text = AutoConfig.from_pretrained(str(llm_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the LLM config {llm_dir / 'config.json'}: {err}") from None
    want = {"llama": "llama", "mixtral": "mixtral"}[flavour.llm_arch]
    if text.model_type != want:
        raise CheckpointError(f"{llm_dir / 'config.json'}: model_type {text.model_type!r}, flavour "
                              f"{flavour.name!r} needs {want!r}")
    text.architectures = [text_architecture(flavour)]
    # vLLM copies the top-level tie_word_embeddings into the text config of a multimodal model
    tied = bool(getattr(text, "tie_word_embeddings", False))
    return SphinxXConfig(text_config=text, flavour=flavour.to_dict(), image_token_index=int(ids["image_token_id"]),
                         model_dir=str(src), tie_word_embeddings=tied, pad_token_id=int(ids["pad_token_id"]),
                         bos_token_id=int(ids["bos_token_id"]), eos_token_id=int(ids["eos_token_id"]),
                         dtype=raw["dtype"])


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
    # the directory's parts, and the LLM's tokenizer and generation config at the top (where vLLM looks)
    llm_files = [f for f in (src / LLM_DIR).iterdir()
                 if f.is_file() and f.name != "config.json" and not f.name.startswith("model")]
    for entry in [e for e in src.iterdir() if e.name != "config.json"] + llm_files:
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
