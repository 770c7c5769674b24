"""One member's vLLM engine: the options a replica starts it with, and the sampling parameters
of one request.

    >>> options = EngineOptions(device="cpu", dtype="float32", max_model_len=None, max_num_seqs=16,
    ...                         tensor_parallel_size=1, gpu_memory_utilization=0.9, cpu_kv_cache_gb=1.0,
    ...                         enforce_eager=True, threads=1)
    >>> engine = start_engine("out/export", options, max_image_pixels=40_000_000)   # vllm AsyncLLM
    >>> params = sampling_params({"max_tokens": 8, "temperature": 0, "stop": []}, options)

The engine is vLLM's ``AsyncLLM``: its engine core runs in a child process of the replica (vLLM has
no in-process async engine) with the model worker inside it (on CPU:
``actors.upstream.cpu_engine_one_process``), or, with ``tensor_parallel_size`` > 1, one worker
process per rank. ``device`` follows the replica's reservation: ``cuda`` when
``ray_actor_options.num_gpus`` > 0 (bf16 by default, CUDA graphs unless ``enforce_eager``), else
``cpu`` (fp32 by default, the KV cache ``cpu_kv_cache_gb`` GiB, OpenMP threads = the replica's CPUs,
never pinned: replicas share cores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from actors.upstream import cpu_engine_one_process
from models.errors import UserError

# The template's turn separator (models.conversation: " Assistant: {a}\n###"): always a stop.
TURN_SEPARATOR = "###"


@dataclass(frozen=True)
class EngineOptions:
    """vLLM settings of one member (``serve.models[]``), resolved by ``pipelines.stages.serve``."""

    device: str  # "cpu" | "cuda"
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: Optional[int]  # None: the flavour's context (max_seq_len, max_position_embeddings)
    max_num_seqs: int  # requests the engine decodes at once
    tensor_parallel_size: int
    gpu_memory_utilization: float  # cuda: the fraction of each GPU the engine may use
    cpu_kv_cache_gb: float  # cpu: the KV cache size
    enforce_eager: bool
    threads: int  # cpu: OpenMP threads (the replica's CPUs)


def context_length(model_dir: Union[str, Path]) -> int:
    """The longest sequence the model directory's flavour and LLM config allow."""
    from actors.serve.vllm.config import read_model_config

    cfg = read_model_config(model_dir)
    return min(int(cfg.flavour["max_seq_len"]), int(getattr(cfg.text_config, "max_position_embeddings", 1 << 30)))


def engine_kwargs(model_dir: Union[str, Path], options: EngineOptions, *, max_image_pixels: int) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for ``model_dir`` under ``options``."""
    from actors.serve.vllm.plugin import engine_args

    context = context_length(model_dir)
    max_len = options.max_model_len or context
    if max_len > context:
        raise UserError(f"serve.models[].max_model_len {max_len} is over the model's context of {context} tokens")
    kw: dict[str, Any] = dict(dtype=options.dtype, max_model_len=max_len, max_num_seqs=options.max_num_seqs,
                              tensor_parallel_size=options.tensor_parallel_size, enforce_eager=options.enforce_eager,
                              hf_overrides={"max_image_pixels": int(max_image_pixels)}, disable_log_stats=True)
    if options.device == "cuda":
        kw["gpu_memory_utilization"] = options.gpu_memory_utilization
    else:
        kw["kv_cache_memory_bytes"] = int(options.cpu_kv_cache_gb * 2**30)
    # a prompt's images can make it as long as the context: one prefill step must hold it
    kw["max_num_batched_tokens"] = max(max_len, 2048)
    return engine_args(model_dir, **kw)


def start_engine(model_dir: Union[str, Path], options: EngineOptions, *, max_image_pixels: int):
    """A running vLLM ``AsyncLLM`` for the model directory (call from inside the replica)."""
    if options.device == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # several replicas share the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, options.threads))
        cpu_engine_one_process(options.tensor_parallel_size)  # the model worker in the engine core
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from actors.serve.vllm.plugin import register

    register()
    args = AsyncEngineArgs(**engine_kwargs(model_dir, options, max_image_pixels=max_image_pixels))
    return AsyncLLM.from_engine_args(args)


def sampling_params(payload: dict, *, max_tokens: int, stream: bool):
    """vLLM ``SamplingParams`` of one request (the plain dict the ingress sends): ``n``, ``seed``,
    ``logprobs``/``top_logprobs``, its stop strings plus :data:`TURN_SEPARATOR`, ``max_tokens``;
    streams get deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    stops = list(payload.get("stop") or [])
    if TURN_SEPARATOR not in stops:
        stops.append(TURN_SEPARATOR)
    logprobs = None
    if payload.get("logprobs"):
        logprobs = int(payload.get("top_logprobs") or 0)
    temperature = float(payload.get("temperature", 1.0))
    return SamplingParams(
        n=int(payload.get("n") or 1), temperature=temperature, top_p=float(payload.get("top_p", 1.0)),
        seed=payload.get("seed"), stop=stops, max_tokens=max_tokens, ignore_eos=bool(payload.get("ignore_eos")),
        logprobs=logprobs, skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
