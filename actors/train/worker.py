"""The training loop every Ray Train worker runs: DeepSpeed one-stage training of SphinxX.

``train_loop_per_worker({"config": TrainWorkerConfig})`` (built once by ``pipelines.stages.train``):

1. build the spec's flavour with the shards' tokenizer (same seed on every rank), freeze the
   encoders unless ``train.train_encoders``; DeepSpeed wraps it (``actors.train.deepspeed_config``:
   ZeRO-2/3, AutoEP for MoE, AdamW, warm-up + cosine). ZeRO-3 builds it partitioned from the
   start (``deepspeed.zero.Init``); on GPU it is built on the device; initial weights
   (``model.weights``) are read first, their settings applied, then loaded
   (``actors.train.initial_weights``). Every collective runs on ``engine.device`` (NCCL and gloo
   alike); bf16 on GPU (``precision: auto``); activation checkpointing on for real flavours;
2. restore the latest checkpoint Ray Train hands back (after a worker died, or a restarted
   ``sphinx-x train``): model, optimizer, scheduler, the step, the metrics so far;
3. iterate this rank's planned micro-batches of packed rows (``train.packing``) or single samples
   (``get_dataset_shard(f"rank{r}").iter_torch_batches``), skipping what was consumed;
   one optimizer step per ``grad_accum`` micro-batches; uint8 views go to the device as is
   (the model normalises them);
4. every ``checkpoint_every`` steps and at the end: every rank ``engine.save_checkpoint`` into
   its own directory, then ``ray.train.report(metrics, checkpoint=...)`` (Ray merges the ranks'
   files into one checkpoint on the run's storage);
5. at the end, stream the model into the export (``actors.train.consolidate.write_model_dir``: gathered
   parameter by parameter, written by rank 0 shard by shard; paths: ``cluster.layout``;
   ``models.weights.model_dir`` format, ``_SUCCESS`` last) plus a fixed batch with the trained
   engine's logits (``export_check.pt``) so anyone can verify the export.

Metrics per step (rank 0 writes them, ``metrics.jsonl``): step, loss, lm_loss, aux_loss, lr,
grad_norm, tokens, tokens_per_s, image_tokens, saved_tokens (image tokens skip tokens saved),
step_time_s (data_s waiting for the input + compute_s forward/backward/step + sync_s all_reduce and
grad norm), report_s (the previous step's pid file, report and checkpoint, outside step_time_s),
wall_t (unix time at the step's end), restored_from. Ray Train sees a report at every checkpoint
and about every ``REPORT_EVERY_S`` seconds (config ``report_every_s``), not every step; rank 0
also puts a small progress item (step, loss, tokens/s, its pid) on the driver's queue every step.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from actors.train.batching import collate, model_inputs
from cluster.layout import Layout
from cluster.spec import StorageSection, TrainSection
from models.errors import UserError
from models.flavours import Flavour

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # inside a checkpoint directory: rank 0's history up to it
# ray.train.report is a barrier with the Ray Train controller (~0.5-2 s on a loaded 2-core box,
# 10x a debug step): report at checkpoints and about every REPORT_EVERY_S seconds, not every step.
# metrics.jsonl (rank 0's history) still holds every step.
REPORT_EVERY_S = 10.0


@dataclass(frozen=True)
class TrainWorkerConfig:
    """Everything a training worker gets from the driver, built once from the spec."""

    train: TrainSection
    storage: StorageSection
    flavour: Flavour  # the spec's flavour, overrides and train.aux_loss_weight applied
    layout: Layout
    total_steps: int
    tokenizer_uri: str
    weights_uri: Optional[str] = None  # model.weights, resolved by the layout
    data_start_step: int = 0  # the step this run's datasets start at
    resume_from: Optional[str] = None  # a checkpoint URI the driver found (a restarted `train`)
    export_from: Optional[str] = None  # export this checkpoint only, no training
    export: bool = True
    report_every_s: float = REPORT_EVERY_S
    progress: Any = None  # a ray.util.queue.Queue rank 0 feeds once per step, or None


class ShardCollate(NumpyBatchCollateFn):
    """iter_torch_batches collate: numpy shard rows → padded model inputs (actors.train.batching.collate)."""

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, pad_token_id=self.pad_token_id)


# ----------------------------------------------------------------------------- model


def activation_checkpointing(train: TrainSection, flavour: Flavour) -> bool:
    """``train.activation_checkpointing``; unset (None) means on for the real flavours (an HF
    tokenizer: a real LLM's shapes) and off for the toys (``debug``, ``debug-moe``)."""
    if train.activation_checkpointing is None:
        return flavour.tokenizer is not None
    return bool(train.activation_checkpointing)


def build_model(config: TrainWorkerConfig, storage, ds_config: Optional[dict] = None, device=None):
    """(SphinxX, tokenizer): the shards' tokenizer, the initial weights' settings when
    ``config.weights_uri`` is set (``actors.train.initial_weights``: published components or a
    sphinx-x model dir; the model is built AFTER their flavour overrides, with their
    tokenizer), the model (``construct_model``), then the weights.

    The weights are read one tensor at a time (models.weights.stream). ZeRO-3: rank 0 alone opens
    them, hands the flavour to the other ranks (``broadcast_object_list``) and the weights
    parameter by parameter (``actors.train.consolidate.scatter_recipes``): no rank holds more than one
    parameter in full. Otherwise every rank loads them into its own model (ZeRO-1/2 keep full
    parameters anyway)."""
    import torch.distributed as dist

    from actors.train.initial_weights import check_tokenizer, read_initial_weights
    from models.conversation import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="sx-tok-") as tmp:
        tokenizer = load_tokenizer(storage.download_dir(config.tokenizer_uri, tmp))
    if not config.weights_uri:
        return construct_model(config.flavour, tokenizer, config.train, ds_config, device), tokenizer
    zero3 = is_zero3(ds_config)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    init, flavour = None, config.flavour
    with tempfile.TemporaryDirectory(prefix="sx-weights-") as tmp:
        error = None
        if rank0 or not zero3:
            try:
                init = read_initial_weights(Path(storage.download_dir(config.weights_uri, tmp)), config.flavour)
                check_tokenizer(init.tokenizer, tokenizer, config.weights_uri)
                flavour, tokenizer = init.flavour, init.tokenizer or tokenizer
            except UserError as err:
                if not (zero3 and dist.is_initialized()):
                    raise
                error = str(err)  # every rank raises it: none is left waiting below
        if zero3 and dist.is_initialized():
            shared = [flavour, error]
            dist.broadcast_object_list(shared, src=0, device=device)
            flavour, error = shared
            if error:
                raise UserError(error)
        model = construct_model(flavour, tokenizer, config.train, ds_config, device)
        if zero3:
            from actors.train.consolidate import scatter_recipes

            scatter_recipes(model, init.recipes() if rank0 else None, what=f"model.weights {config.weights_uri}",
                            strict_prefixes=init.strict_prefixes() if rank0 else ("",), device=device)
        else:
            init.load_into(model)
            model.set_vision_trainable(config.train.train_encoders)
    return model, tokenizer


def is_zero3(ds_config: Optional[dict]) -> bool:
    return bool(ds_config) and ds_config["zero_optimization"]["stage"] == 3


def _use_flash_attention(model, train: TrainSection) -> None:
    """On GPU with ``flash_attn`` installed, the LLM's SDPA becomes flash-attention 2 (packed rows
    then run as varlen sequences split at the position-id restarts). Only the live module's
    config changes: the flavour, and so the export, keep SDPA."""
    if not (train.use_gpu and torch.cuda.is_available()) or model.llm.config._attn_implementation != "sdpa":
        return
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return
    model.llm.config._attn_implementation = "flash_attention_2"


@contextmanager
def _hf_init_deferred() -> Iterator[None]:
    """transformers' ``post_init`` initialises the whole model after its modules exist, when
    zero.Init has partitioned them already: defer it (``_hf_init_gathered`` runs it after)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original  # type: ignore[method-assign]


def _hf_init_gathered(model) -> None:
    """The Hugging Face parts' own initialisation, one module at a time: its parameters gathered,
    rank 0 initialises, ZeRO-3 re-partitions (so rank 0's values on every rank, no full copy)."""
    import deepspeed

    for part in (model.llm, model.vision.convnext, model.vision.dino):
        for module in part.modules():
            params = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                part._init_weights(module)
        if hasattr(part, "tie_weights"):
            part.tie_weights()


def construct_model(flavour: Flavour, tokenizer, train: TrainSection, ds_config: Optional[dict] = None,
                    device=None):
    """The flavour's SphinxX, random-initialised with ``train.seed`` (the same on every rank),
    encoders frozen unless ``train.train_encoders``, activation checkpointing per
    ``activation_checkpointing``.

    ZeRO-3 (``ds_config`` stage 3): built inside ``deepspeed.zero.Init``, so each module's
    parameters are partitioned over the ranks (in the training dtype) as soon as it exists: no
    rank ever holds the whole model. Otherwise built directly on ``device`` (the GPU: no host
    copy; None: CPU). On CPU the host allocator is bounded first (``bound_host_allocator``)."""
    from models.sphinx import SphinxX

    if not train.use_gpu:
        bound_host_allocator()
    torch.manual_seed(train.seed)
    if is_zero3(ds_config):
        import deepspeed

        deepspeed.init_distributed()  # adopts the process group Ray Train made (zero.Init reads its size)
        # The dtype comes from the config's bf16 flag (actors.train.deepspeed_config.use_bf16). Not passed
        # as dtype=: with a config, DeepSpeed 0.19 then picks fp16 / bf16 by what the accelerator
        # supports (on CPU bf16, whatever was asked), so fp32 training got bf16 partitions.
        with _hf_init_deferred(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = SphinxX.from_flavour(flavour, tokenizer)
        _hf_init_gathered(model)
    else:
        with torch.device(device or "cpu"):
            model = SphinxX.from_flavour(flavour, tokenizer)
    model.set_vision_trainable(train.train_encoders)
    _use_flash_attention(model, train)
    if activation_checkpointing(train, flavour):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_engine(train: TrainSection, model, world_size: int, total_steps: int, ds_config: Optional[dict] = None):
    import deepspeed

    from actors.train.deepspeed_config import deepspeed_config

    cfg = ds_config or deepspeed_config(train, model.flavour, world_size=world_size, total_steps=total_steps)
    # No ZeRO-3 special cases: every parameter is used only inside its own module's forward, and
    # the vision module runs (and touches all its parameters) on every batch, images or not.
    # Frozen parameters (the encoders) go to no optimizer group: no optimizer state, no gradient.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    share_fp32_master(engine.optimizer)
    return engine


# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h) and the value bound_host_allocator sets
M_MMAP_THRESHOLD = -3
HOST_MMAP_THRESHOLD = 1 << 20


def bound_host_allocator(threshold: int = HOST_MMAP_THRESHOLD) -> bool:
    """Training on CPU: glibc serves every host allocation of ``threshold`` bytes (1 MiB) or more
    with its own ``mmap``, so a freed tensor's memory goes straight back to the system.

    glibc's default threshold starts at 128 KiB and rises (up to 32 MiB) each time an mmapped
    block is freed; after the first freed gathered parameter, ZeRO's per-step transients (gathered
    ZeRO-3 parameters, gradients, the optimizer's sub-group temporaries: 1–12 MB each at d 1024)
    come from the heap arenas instead, and freed heap space stays resident. Measured on the
    0.38 B model (``benchmarks/train_memory.py``), one ZeRO-3 rank after two steps: 1.3 GiB free
    but resident heap with the default, 0.3 GiB with 1 MiB fixed (peak RSS 5.40 → 4.39 GiB).
    Setting the threshold also turns its adaptation off. Tensors under 1 MiB (activations of
    short rows, small parameters) still come from the heap. Returns False where there is no
    glibc (nothing changed). On GPU the host holds little (the model is built on the device):
    not used there."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


def share_fp32_master(optimizer) -> int:
    """Make ZeRO's fp32 master partition a view of the parameter partition when the two have the
    same dtype and device, i.e. when training in fp32 (``precision: fp32``, or ``auto`` on CPU).

    ZeRO gives each rank's optimizer an fp32 "master" copy of the rank's parameter partition to
    update, and copies it back into the partition after each step. When the partition is fp32
    already, the master is a second copy of the same values: 4 B per parameter / world size
    (0.7 GiB per rank for 0.38 B parameters on 2 ranks). DeepSpeed 0.19's ZeRO-3 means to skip
    the copy in this case, but compares the tensor's ``device`` with the device *name* string
    (never equal), so it always copies; ZeRO-1/2 always copy. After this the copy-back is a copy
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


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(engine, step: int, history: list[dict], rank: int) -> str:
    """Every rank writes its DeepSpeed shards into its own directory; rank 0 adds the metrics."""
    directory = tempfile.mkdtemp(prefix=f"sx-ckpt-r{rank}-")
    engine.save_checkpoint(directory, tag=f"step{step:08d}", client_state={"step": step})
    if rank == 0:
        Path(directory, METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    return directory


def _load_checkpoint(engine, directory: str) -> tuple[int, list[dict]]:
    _, client = engine.load_checkpoint(directory)
    if client is None or "step" not in client:
        raise RuntimeError(f"checkpoint {directory} holds no DeepSpeed state with a step")
    history_path = Path(directory, METRICS_FILE)
    history = [json.loads(x) for x in history_path.read_text().splitlines() if x] if history_path.exists() else []
    step = int(client["step"])
    return step, [m for m in history if m["step"] <= step]


def _load_from_storage(engine, storage, uri: str) -> tuple[int, list[dict]]:
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="sx-restore-") as tmp:
        fs, path = storage.resolve(uri)  # pyarrow copy: S3 directory markers are skipped
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return _load_checkpoint(engine, tmp)


# ----------------------------------------------------------------------------- metrics


def write_metrics(storage, layout: Layout, history: list[dict], *, png: bool = False) -> None:
    storage.write_bytes(layout.metrics, "".join(json.dumps(m) + "\n" for m in history).encode())
    if png and history:
        storage.write_bytes(layout.loss_png, loss_png(history))


def loss_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [m["step"] for m in history]
    ax.plot(steps, [m["loss"] for m in history], label="loss")
    ax.plot(steps, [m["lm_loss"] for m in history], label="lm loss", alpha=0.7)
    for m in history:
        if m.get("restored_from") is not None and m["step"] == m["restored_from"] + 1:
            ax.axvline(m["restored_from"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- export


def export_dtype(engine) -> torch.dtype:
    """The export's dtype: bf16 when the engine trains in bf16, else fp32."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


# the in-worker logits check of the export loads the written directory on rank 0: up to this size
EXPORT_CHECK_MAX_BYTES = 8 * 2**30


def export_model(engine, tokenizer, storage, layout: Layout, check_batch: Optional[dict], rank: int, *,
                 max_shard_bytes: Optional[int] = None) -> dict:
    """Write ``<out>/export`` (``_SUCCESS`` last) streamed from the engine, parameter by parameter
    (``actors.train.consolidate.write_model_dir``: rank 0 writes, in the training dtype, never holding
    the whole model); rank 0 returns a summary.

    The written directory is checked on rank 0: its safetensors headers against the model
    (``inspect_model_dir``: every key, shape and dtype), and, for models up to
    ``EXPORT_CHECK_MAX_BYTES``, the logits of the directory reloaded against the engine's on
    ``check_batch`` (``export_max_abs_diff``). ``export_check.pt`` keeps the batch and the
    engine's logits, so anyone can verify a larger export where it fits."""
    from actors.train.consolidate import write_model_dir
    from models.weights.model_dir import inspect_model_dir, load_model_dir

    logits = None
    if check_batch is not None:  # every rank runs the forward (EP layers exchange tokens)
        engine.module.eval()
        with torch.no_grad():
            logits = engine(**model_inputs(check_batch, engine.device)).logits.float().cpu()
        engine.module.train()
    dtype = export_dtype(engine)
    with tempfile.TemporaryDirectory(prefix="sx-export-") as tmp:
        written = write_model_dir(engine, tokenizer, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        if rank != 0:
            return {}
        info = inspect_model_dir(written)
        size = sum(Path(f).stat().st_size for part in info["parts"].values() for f in part["files"])
        summary: dict[str, Any] = {"export": layout.export, "export_params": info["params"]["total"],
                                   "export_bytes": size}
        if check_batch is not None:
            buf = io.BytesIO()
            torch.save({"batch": {k: v for k, v in check_batch.items()}, "logits": logits}, buf)
            storage.write_bytes(layout.export_check, buf.getvalue())
            if size <= EXPORT_CHECK_MAX_BYTES:
                plain, _ = load_model_dir(written)
                with torch.no_grad():
                    mine = plain(**model_inputs(check_batch)).logits.float()  # on CPU, in the export dtype
                del plain
                summary["export_max_abs_diff"] = float((mine - logits).abs().max())
            else:
                summary["export_check"] = (f"headers only: {size / 2**30:.1f} GiB is over the in-worker logits "
                                           f"check's {EXPORT_CHECK_MAX_BYTES / 2**30:.0f} GiB; "
                                           f"{layout.export_check} holds the batch and the engine's logits")
        storage.delete(layout.export)
        storage.upload_dir(written, layout.export)
    storage.write_bytes(layout.export_success, b"")
    storage.write_bytes(layout.export_summary, json.dumps(summary).encode())
    return summary


# ----------------------------------------------------------------------------- the loop


def token_share(num_tokens: int, world: int, device) -> float:
    """This rank's share of the micro-batch's supervised tokens over all ranks (all_reduce);
    ``num_tokens`` is the model's own count (``SphinxOutput.num_tokens``).

    Each rank's ``lm_loss`` is a mean over its own supervised tokens, and DeepSpeed averages the
    ranks' gradients. Length grouping gives ranks very different rows (one rank the short
    word / chat rows with one answer each, the other the scene rows with three), so a plain
    average would weigh a token on a "short" rank several times more than one on a "long" rank.
    Scaling each rank's loss by ``share · world`` makes the step the mean over ALL supervised
    tokens of the global batch, as one process training on the whole batch would compute:

        rank 0: 6 tokens, rank 1: 30 tokens  ->  shares 1/6, 5/6  (plain average: 1/2, 1/2)
    """
    if world == 1:
        return 1.0
    total = all_reduce_sums([float(num_tokens)], device)[0]
    return num_tokens / total if total else 1.0 / world


def all_reduce_sums(values: list[float], device) -> list[float]:
    """Sum ``values`` over all ranks: one float64 all_reduce on ``device`` (the engine's: NCCL
    takes only GPU tensors, gloo CPU ones; the same code for both)."""
    import torch.distributed as dist

    sums = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums.tolist()


def _progress(config: TrainWorkerConfig, rank: int, metrics: dict) -> None:
    """Rank 0 hands the driver's progress line one small item per step (never blocks)."""
    if rank != 0 or config.progress is None:
        return
    try:
        config.progress.put_nowait({"step": metrics["step"], "total": config.total_steps, "loss": metrics["loss"],
                                    "tokens_per_s": metrics["tokens_per_s"], "pid": os.getpid()})
    except Exception:  # noqa: BLE001 - full (nobody reading) or gone: progress is best effort
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from cluster.storage import open_storage

    config: TrainWorkerConfig = loop_config["config"]
    train, lay = config.train, config.layout
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage = open_storage(config.storage)
    total, accum, micro = config.total_steps, train.grad_accum, train.micro_batch
    # as many threads as CPUs the worker reserved (scaling_config: 1 unless resources_per_worker says)
    torch.set_num_threads(max(1, int(train.resources_per_worker.get("CPU", 1))))

    from actors.train.deepspeed_config import deepspeed_config

    ds_config = deepspeed_config(train, config.flavour, world_size=world, total_steps=total)
    device = None
    if train.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # Ray Train set this worker's GPU
    model, tokenizer = build_model(config, storage, ds_config, device)
    engine = build_engine(train, model, world, total, ds_config)

    step, history, restored_from = 0, [], None
    if config.export_from:  # export only: this checkpoint, no training
        step, history = _load_from_storage(engine, storage, config.export_from)
        summary = export_model(engine, tokenizer, storage, lay, None, rank)
        ray.train.report({"step": step, **summary})
        return
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step, history = _load_checkpoint(engine, directory)
        restored_from = step
        log.info("rank %d: restored step %d", rank, step)
    elif config.resume_from:  # a restarted `sphinx-x train`: the driver found the latest checkpoint
        step, history = _load_from_storage(engine, storage, config.resume_from)
        restored_from = step
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    batches = iter(shard.iter_torch_batches(batch_size=micro, collate_fn=ShardCollate(tokenizer.pad_token_id),
                                            drop_last=False, prefetch_batches=2))
    ds_start = config.data_start_step
    for _ in range((step - ds_start) * accum):  # consumed before the restored checkpoint
        next(batches)

    engine.train()
    aux_coef = float(engine.module.aux_loss_coef)
    last_batch = None
    report_s, last_report = 0.0, time.monotonic()
    report_every_s = config.report_every_s
    while step < total:
        t0 = time.perf_counter()
        data_s = compute_s = 0.0
        # lm, aux, tokens, image tokens, saved tokens, "report now" (rank 0 decides; the
        # all_reduce hands its decision to every rank, so all ranks call ray.train.report together)
        sums = [0.0] * 6
        for m in range(accum):
            t = time.perf_counter()
            batch = next(batches)
            data_s += time.perf_counter() - t
            expected = (step * accum + m) * micro  # absolute place in this rank's stream
            pos = batch.pop("pos", None)
            if pos is not None and pos.tolist() != list(range(expected, expected + len(pos))):
                raise RuntimeError(f"rank {rank}: data out of plan order at step {step}: got positions "
                                   f"{pos.tolist()[:4]}..., expected from {expected}")
            t = time.perf_counter()
            output = engine(**model_inputs(batch, engine.device))
            share = token_share(output.num_tokens, world, engine.device)
            lm = output.lm_loss * (share * world)  # DeepSpeed averages over ranks: x world undoes it
            engine.backward(lm + (output.loss - output.lm_loss))
            engine.step()
            compute_s += time.perf_counter() - t
            for k, v in enumerate((float(output.lm_loss) * share, float(output.aux_loss) / world,
                                   float(batch["num_tokens"]), float(batch["image_tokens"]),
                                   float(batch["saved_tokens"]))):
                sums[k] += v
            last_batch = batch
        if rank == 0 and time.monotonic() - last_report >= report_every_s:
            sums[5] = 1.0
        t = time.perf_counter()
        sums = all_reduce_sums(sums, engine.device)
        norm = engine.get_global_grad_norm()
        sync_s = time.perf_counter() - t
        step += 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": step,
            "loss": (float(sums[0]) + aux_coef * float(sums[1])) / accum,
            "lm_loss": float(sums[0]) / accum,  # token-weighted over the ranks (see token_share)
            "aux_loss": float(sums[1]) / accum,
            "lr": float(engine.get_lr()[0]),
            "grad_norm": float(norm) if norm is not None else None,
            "tokens": int(sums[2]),
            "tokens_per_s": float(sums[2]) / elapsed,
            "image_tokens": int(sums[3]),
            "saved_tokens": int(sums[4]),
            "step_time_s": elapsed,
            "data_s": data_s, "compute_s": compute_s, "sync_s": sync_s, "report_s": report_s,
            "wall_t": time.time(),
            "restored_from": restored_from,
        }
        history.append(metrics)
        t = time.perf_counter()
        _progress(config, rank, metrics)
        if step % train.checkpoint_every == 0 or step == total:
            directory = _save_checkpoint(engine, step, history, rank)
            if rank == 0:
                write_metrics(storage, lay, history)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
            shutil.rmtree(directory, ignore_errors=True)
            last_report = time.monotonic()
        elif sums[5] > 0:
            ray.train.report(metrics)
            last_report = time.monotonic()
        report_s = time.perf_counter() - t  # outside the step: shown on the next step's metrics

    summary = {}
    if config.export:
        summary = export_model(engine, tokenizer, storage, lay, last_batch, rank)
    if rank == 0:
        write_metrics(storage, lay, history, png=True)
    ray.train.report({**(history[-1] if history else {"step": step}), **summary, "done": True})
