"""The Hugging Face-side config vLLM reads for a sphinx-x model directory (no extra files).

vLLM picks a model class from ``config.architectures`` and sizes the KV cache from the text
config. A sphinx-x model directory's ``config.json`` is our own format (flavour, token ids), so
the plugin (actors.vllm_plugin) registers a vLLM *config format* ``"sphinx_x"`` whose parser
turns that file into a :class:`SphinxXConfig`::

    LLM(model="out/export", config_format="sphinx_x", load_format="sphinx_x", ...)
    # hf_config = SphinxXConfig(architectures=["SphinxXForConditionalGeneration"],
    #                           text_config=LlamaConfig(...) | MixtralConfig(...),
    #                           flavour={...every Flavour field...}, image_token_index=4, ...)

The text config is built exactly as ``models.sphinx.build_llm`` builds the PyTorch LLM (flavour
kwargs + the token ids), so vLLM's Llama/Mixtral has the same shapes as the trained one.
:func:`read_model_config` is the one place that reads the directory's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from transformers import CONFIG_MAPPING, AutoConfig, LlamaConfig, MixtralConfig, PreTrainedConfig

from models.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError
from models.flavours import Flavour
from models.tiling import DEFAULT_MAX_PIXELS

ARCHITECTURE = "SphinxXForConditionalGeneration"
CONFIG_FORMAT = "sphinx_x"  # vLLM config_format and load_format names registered by the plugin
MODEL_TYPE = "sphinx_x"
_TEXT_ARCH = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


class SphinxXConfig(PreTrainedConfig):
    """The whole model for vLLM: ``text_config`` (the LLM), ``flavour`` (a Flavour as a dict:
    vision geometry and encoders), the token ids, and ``max_image_pixels`` (the processor's
    decode limit; override with ``hf_overrides={"max_image_pixels": N}``)."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: Union[dict, PreTrainedConfig, None] = None,
                 flavour: Optional[dict] = None, image_token_index: int = 0,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, **kwargs: Any):
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", "llama")](**text_config)
        self.text_config = text_config if text_config is not None else LlamaConfig()
        self.flavour = dict(flavour or {})
        self.image_token_index = int(image_token_index)
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
                         pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"],
                         eos_token_id=ids["eos_token_id"], dtype=dtype)


def make_config_parser():
    """vLLM's ConfigParserBase subclass for ``config_format="sphinx_x"`` (built lazily: vLLM is optional)."""
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    class SphinxXConfigParser(ConfigParserBase):
        def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
            config = read_model_config(model)
            return config.to_dict(), config

    return SphinxXConfigParser
