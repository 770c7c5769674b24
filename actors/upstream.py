"""Worker-side workarounds for upstream bugs and limitations, one function each.

Each names the project and version it targets (pyproject.toml pins them) and what goes wrong
without it; ``tests/actors/test_upstream.py`` shows each one's "without / with" on tiny inputs.
When an upgrade fixes the upstream side, that test tells: delete the function and its call.

    ==========================  ===================  ==========================================
    function                    upstream             works around
    ==========================  ===================  ==========================================
    ``share_fp32_master``       DeepSpeed 0.19.8     ZeRO keeps an fp32 clone of fp32 partitions
    ``no_cpu_shm_comm_build``   DeepSpeed 0.19.8     every rank compiles an op training never uses
    ``zero_check_without_muon`` DeepSpeed 0.19.8     ZeRO's optimizer check imports torch.compile
    ``bound_host_allocator``    glibc (2.x malloc)   freed heap memory stays resident on CPU
    ``hf_init_deferred``        transformers 5.19    ``post_init`` on ZeRO-3 partitions is a no-op
    ``hf_init_gathered``        transformers 5.19    (its counterpart: HF init, gathered)
    ``cpu_engine_one_process``  vLLM 0.32 (CPU)      a one-rank engine starts a second process
    ==========================  ===================  ==========================================
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

# ----------------------------------------------------------------------------- DeepSpeed


def share_fp32_master(optimizer) -> int:
    """DeepSpeed 0.19.8: make ZeRO's fp32 master partition a view of the parameter partition
    when both have the same dtype and device, i.e. when training in fp32 (``precision: fp32``, or
    ``auto`` on CPU).

    ZeRO gives each rank's optimizer an fp32 "master" copy of the rank's parameter partition to
    update, and copies it back into the partition after each step. When the partition is fp32
    already, the master is a second copy of the same values: 4 B per parameter / world size.
    The bug: ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``) means to skip the copy in this case but
    compares the tensor's ``device`` with the device *name* string (never equal), so it always
    copies; ZeRO-1/2 (``DeepSpeedZeroOptimizer``) always copy. After this the copy-back is a copy
    onto itself, and checkpoints save and load the same values as before.

    Before: ``master.data_ptr() != partition.data_ptr()`` (a clone). After: equal (one memory;
    the clone is freed). bf16 / fp16 training (the master stays fp32) and offloaded optimizers
    (master on the host, partition on the device) are left alone. Returns the elements now
    shared on this rank (0: nothing changed)."""
    pairs = []
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        if not optimizer.offload_optimizer:
            pairs = list(zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat))
    elif hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        if not optimizer.cpu_offload:
            import deepspeed.comm as dist

            for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
                rank = dist.get_rank(group=optimizer.real_dp_process_group[i])
                pairs.append((optimizer.parallel_partitioned_bit16_groups[i][rank], master))
    shared = 0
    for partition, master in pairs:
        if (partition is None or partition.dtype != master.dtype or partition.device != master.device
                or partition.shape != master.shape or partition.data_ptr() == master.data_ptr()):
            continue
        master.data = partition.data  # the same tensor object: the optimizer's groups and state keep it
        shared += partition.numel()
    if shared and hasattr(optimizer, "single_partition_of_fp32_groups"):
        optimizer._link_all_hp_params()  # its per-parameter fp32 views pointed into the clone
    return shared


def no_cpu_shm_comm_build() -> bool:
    """DeepSpeed 0.19.8 on its CPU accelerator: ``deepspeed.init_distributed`` (also inside
    ``deepspeed.initialize``) no longer JIT-compiles the shared-memory allreduce op
    (``deepspeed_shm_comm``). Call before either; idempotent.

    The limitation: ``deepspeed.comm.torch.TorchBackend.__init__`` calls ``build_shm_op()``,
    which compiles two C++ files with g++ through torch's extension loader (~30 s of both cores
    of the 2-core box; 25-112 s of wall time measured) into ``~/.cache/torch_extensions``: the
    first time in every environment, and again whenever the build command changes (another
    virtualenv path: a fresh clone, a Ray runtime env), i.e. on a user's first ``sphinx-x demo``
    and several times in a test run. Only ``inference_all_reduce`` (DeepSpeed's tensor-parallel
    inference) uses the op; training's collectives are torch.distributed's (gloo on CPU).

    Before: ``cdb.shm_comm_op`` is the compiled module. After: None, nothing compiled or
    loaded. On another accelerator (CUDA: no such builder) nothing changes; returns whether it
    patched."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    # by module name: the attribute deepspeed.comm.torch is torch itself (deepspeed.comm imports it)
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None
    return True


def zero_check_without_muon() -> bool:
    """DeepSpeed 0.19.8: ``deepspeed.initialize``'s ZeRO optimizer check answers for an optimizer
    of ZeRO's supported types without importing DeepSpeed's Muon optimizer. Call before
    ``deepspeed.initialize``; idempotent. Returns whether it patched.

    The limitation: ``deepspeed.runtime.zero.utils.is_zero_supported_optimizer`` imports
    ``deepspeed.runtime.zero.muon.muon_optimizer`` on every call, to add Muon to the supported
    list. That module decorates a function with ``torch.compile``, which imports
    ``torch._dynamo`` and ``torch._inductor``: ~3 CPU-s in every rank of every run (measured in a
    Ray Train worker on the 2-core box), for an optimizer this project never builds.

    Before: after ``deepspeed.initialize`` with ZeRO, ``torch._inductor.compile_fx`` is in
    ``sys.modules``. After: not (an optimizer of another type, Muon's included, still gets
    DeepSpeed's own check, import and all)."""
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.runtime.zero import utils

    if getattr(ds_engine.is_zero_supported_optimizer, "_sphinx_x", False):
        return False
    original = utils.is_zero_supported_optimizer

    def is_zero_supported_optimizer(optimizer) -> bool:
        return type(optimizer) in utils.ZERO_SUPPORTED_OPTIMIZERS or original(optimizer)

    is_zero_supported_optimizer._sphinx_x = True  # type: ignore[attr-defined]
    ds_engine.is_zero_supported_optimizer = is_zero_supported_optimizer  # engine.py imported it by name
    return True


# ----------------------------------------------------------------------------- glibc

# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h) and the value bound_host_allocator sets
M_MMAP_THRESHOLD = -3
HOST_MMAP_THRESHOLD = 1 << 20


def bound_host_allocator(threshold: int = HOST_MMAP_THRESHOLD) -> bool:
    """glibc malloc (any 2.x; ``mallopt(M_MMAP_THRESHOLD)``): serve every host allocation of
    ``threshold`` bytes (1 MiB) or more with its own ``mmap``, so a freed tensor's memory goes
    straight back to the system. For training on CPU; on GPU the host holds little.

    The limitation: glibc's default threshold starts at 128 KiB and rises (up to 32 MiB) each
    time an mmapped block is freed; after the first freed gathered parameter, ZeRO's per-step
    transients (gathered ZeRO-3 parameters, gradients, the optimizer's sub-group temporaries:
    1–12 MB each at d 1024) come from the heap arenas instead, and freed heap space stays
    resident (``benchmarks/train_memory.py`` measures it). Setting the threshold also turns its
    adaptation off. Tensors under 1 MiB still come from the heap. Returns False where there is
    no glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


# ----------------------------------------------------------------------------- transformers


@contextmanager
def hf_init_deferred() -> Iterator[None]:
    """transformers 5.19 with DeepSpeed 0.19.8 ZeRO-3: skip ``PreTrainedModel.init_weights``
    while models are built inside ``deepspeed.zero.Init``; ``hf_init_gathered`` runs it after.

    The limitation: ``post_init`` initialises the whole model once its modules exist, when
    ``zero.Init`` has already partitioned them (every parameter a 0-element tensor outside a
    gather), so the init writes nothing: the weights keep torch's defaults (an embedding
    N(0, 1), not N(0, ``initializer_range``)). transformers gathers only when an
    ``HfDeepSpeedConfig`` is registered globally, which this project does not do (the config is
    built per run, not per process)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original  # type: ignore[method-assign]


def hf_init_gathered(parts: Iterable) -> None:
    """The counterpart of ``hf_init_deferred``: each Hugging Face model in ``parts`` gets its own
    initialisation (``_init_weights``), one module at a time: the module's parameters gathered,
    rank 0 initialises, ZeRO-3 re-partitions (so rank 0's values land on every rank, and no rank
    holds a full copy of the model), then its tied weights are re-tied."""
    import deepspeed

    for part in parts:
        for module in part.modules():
            params = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                part._init_weights(module)
        if hasattr(part, "tie_weights"):
            part.tie_weights()


# ----------------------------------------------------------------------------- vLLM


def cpu_engine_one_process(tensor_parallel_size: int) -> bool:
    """vLLM 0.32 on its CPU platform: a one-rank ``AsyncLLM`` engine runs its model worker inside
    the engine core process (vLLM's ``uni`` executor) instead of in a third process. Call in the
    replica before the engine is built, with OpenMP threads unpinned
    (``VLLM_CPU_OMP_THREADS_BIND=nobind``); a no-op otherwise. Returns whether it applied.

    The limitation: ``CpuPlatform.check_and_update_config`` switches a one-rank engine from
    ``uni`` to the ``mp`` executor whenever ``VLLM_ENABLE_V1_MULTIPROCESSING`` is on (its
    default), so that the worker process can pin its OpenMP threads to cores. The replica then
    holds three processes that each import vLLM (replica, ``VLLM::EngineCore``,
    ``VLLM::Worker``: ~10 CPU-s and a few hundred MB each, measured on the 2-core box). The
    replicas here never pin (they share cores), so the worker gains nothing from its process.
    ``AsyncLLM`` keeps its engine core in a child process either way (it has no in-process
    client); that variable is read nowhere else on its path (``LLM``, the offline engine, would
    run in-process: the batch engine, actors.eval.batch_engine, sets it for that reason).

    Before: ``VllmConfig().parallel_config.distributed_executor_backend == "mp"``. After: ``"uni"``.
    On GPU (another platform: ``uni`` already) and with tensor parallelism nothing changes."""
    import os

    if tensor_parallel_size != 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND") != "nobind":
        return False
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return True
