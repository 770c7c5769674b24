"""SPHINX-X in vLLM: registration (a ``vllm.general_plugins`` entry point) and the engine arguments.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers) through
the entry point declared in pyproject.toml::

    [project.entry-points."vllm.general_plugins"]
    sphinx_x = "actors.vllm_plugin:register"

It registers the model class (``SphinxXForConditionalGeneration``, imported lazily by vLLM), the
config format and the load format ``"sphinx_x"`` (a sphinx-x model directory is read as it is: no
converted copy). :func:`engine_args` names them::

    >>> from vllm import LLM
    >>> llm = LLM(**engine_args("out/export", dtype="float32", max_model_len=1024))
    >>> llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [jpeg_bytes]}}, params)

where ``ids`` holds ONE ``<image>`` token per image (``build_prompt(messages, tok, [1] * n)``):
the processor (actors.vllm_processor) expands it to the image's ``image_token_count``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from actors.vllm_config import ARCHITECTURE, CONFIG_FORMAT, MODEL_TYPE

MODEL_CLASS = "actors.vllm_model:SphinxXForConditionalGeneration"


def register() -> None:
    """Idempotent: safe to call in any process, any number of times."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.model_loader import get_model_loader, register_model_loader
    from vllm.transformers_utils.config import get_config_parser, register_config_parser

    from actors.vllm_config import SphinxXConfig, make_config_parser
    from actors.vllm_loader import make_model_loader

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    try:
        get_config_parser(CONFIG_FORMAT)
    except ValueError:
        register_config_parser(CONFIG_FORMAT)(make_config_parser())
    from vllm.config.load import LoadConfig

    try:
        get_model_loader(LoadConfig(load_format=CONFIG_FORMAT))
    except ValueError:
        register_model_loader(CONFIG_FORMAT)(make_model_loader())
    AutoConfig.register(MODEL_TYPE, SphinxXConfig, exist_ok=True)


def engine_args(model_dir: Union[str, Path], **overrides: Any) -> dict[str, Any]:
    """vLLM engine keyword arguments for a sphinx-x model directory (``LLM(**...)``,
    ``AsyncEngineArgs(**...)``, or Ray Serve LLM's ``engine_kwargs`` minus ``model``).

    ``overrides`` are any vLLM engine arguments (dtype, max_model_len, tensor_parallel_size,
    enable_expert_parallel, gpu_memory_utilization, ...); ``hf_overrides={"max_image_pixels": N}``
    sets the processor's decode limit."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        from models.checkpoint import CheckpointError

        raise CheckpointError(f"not a sphinx-x model directory (no config.json): {model_dir}")
    args: dict[str, Any] = dict(model=str(model_dir), tokenizer=str(model_dir), config_format=CONFIG_FORMAT,
                                load_format=CONFIG_FORMAT)
    args.update(overrides)
    return args
