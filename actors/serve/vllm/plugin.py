"""SPHINX-X in vLLM: registration (a ``vllm.general_plugins`` entry point) and the engine arguments.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers) through
the entry point declared in pyproject.toml::

    [project.entry-points."vllm.general_plugins"]
    sphinx_x = "actors.serve.vllm.plugin:register"

It registers the model class (``SphinxXForConditionalGeneration``, imported lazily by vLLM), the
config class (``model_type "sphinx_x"``, with transformers' AutoConfig) and the load format
``"sphinx_x"``. :func:`engine_args` prepares the vLLM directory of a model directory
(actors.serve.vllm.config.prepare_vllm_dir: a config.json and symlinks, no weights copied) and names
them::

    >>> from vllm import LLM
    >>> llm = LLM(**engine_args("out/export", dtype="float32", max_model_len=1024))
    >>> llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [jpeg_bytes]}}, params)

where ``ids`` holds ONE ``<image>`` token per image (``build_prompt(messages, tok, [1] * n)``):
the processor (actors.serve.vllm.processor) expands it to the image's ``image_token_count``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from actors.serve.vllm.config import ARCHITECTURE, LOAD_FORMAT, MODEL_TYPE

MODEL_CLASS = "actors.serve.vllm.model:SphinxXForConditionalGeneration"


def register() -> None:
    """Idempotent: safe to call in any process, any number of times."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader, register_model_loader

    from actors.serve.vllm.config import SphinxXConfig
    from actors.serve.vllm.loader import make_model_loader

    AutoConfig.register(MODEL_TYPE, SphinxXConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    try:
        get_model_loader(LoadConfig(load_format=LOAD_FORMAT))
    except ValueError:
        register_model_loader(LOAD_FORMAT)(make_model_loader())


def engine_args(model_dir: Union[str, Path], vllm_dir: Union[str, Path, None] = None,
                **overrides: Any) -> dict[str, Any]:
    """vLLM engine keyword arguments for a sphinx-x model directory (``LLM(**...)``,
    ``AsyncEngineArgs(**...)``, or Ray Serve LLM's ``engine_kwargs`` minus ``model``); writes its
    vLLM directory (in ``vllm_dir``, default a per-model folder under the temp dir).

    ``overrides`` are any vLLM engine arguments (dtype, max_model_len, tensor_parallel_size,
    enable_expert_parallel, gpu_memory_utilization, ...); ``hf_overrides={"max_image_pixels": N}``
    sets the processor's decode limit."""
    from actors.serve.vllm.config import prepare_vllm_dir

    prepared = str(prepare_vllm_dir(model_dir, vllm_dir))
    return {"model": prepared, "tokenizer": prepared, "load_format": LOAD_FORMAT, **overrides}
