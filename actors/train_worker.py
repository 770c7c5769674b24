"""The training loop every Ray Train worker runs: DeepSpeed one-stage training of SphinxX.

``train_loop_per_worker({"config": TrainWorkerConfig})`` (built once by ``pipelines.train``):

1. build the spec's flavour with the shards' tokenizer (same seed on every rank), freeze the
   encoders unless ``train.train_encoders``; DeepSpeed wraps it (``actors.deepspeed_config``:
   ZeRO-2/3, AutoEP for MoE, AdamW, warm-up + cosine);
2. restore the latest checkpoint Ray Train hands back (after a worker died, or a restarted
   ``sphinx-x train``): model, optimizer, scheduler, the step, the metrics so far;
3. iterate this rank's planned, length-grouped micro-batches
   (``get_dataset_shard(f"rank{r}").iter_torch_batches``), skipping what was consumed;
   one optimizer step per ``grad_accum`` micro-batches; uint8 views go to the device as is
   (the model normalises them);
4. every ``checkpoint_every`` steps and at the end: every rank ``engine.save_checkpoint`` into
   its own directory, then ``ray.train.report(metrics, checkpoint=...)`` (Ray merges the ranks'
   files into one checkpoint on the run's storage);
5. at the end, gather the full model (``actors.consolidate``) and write the export (paths: ``cluster.layout``)
   (``models.checkpoint`` format, ``_SUCCESS`` last) plus a fixed batch with the trained
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
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from actors.batching import collate, model_inputs
from cluster.layout import Layout
from cluster.spec import StorageSection, TrainSection
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
    """iter_torch_batches collate: numpy shard rows → padded model inputs (actors.batching.collate)."""

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, pad_token_id=self.pad_token_id)


# ----------------------------------------------------------------------------- model


def build_model(config: TrainWorkerConfig, storage):
    """(SphinxX, tokenizer) on CPU: the flavour, optional weights, encoders frozen by default."""
    from models.checkpoint import import_weights_dir
    from models.conversation import load_tokenizer
    from models.sphinx import SphinxX

    with tempfile.TemporaryDirectory(prefix="sx-tok-") as tmp:
        tokenizer = load_tokenizer(storage.download_dir(config.tokenizer_uri, tmp))
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = SphinxX.from_flavour(config.flavour, tokenizer)
    if config.weights_uri:
        with tempfile.TemporaryDirectory(prefix="sx-weights-") as tmp:
            import_weights_dir(model, storage.download_dir(config.weights_uri, tmp))
    model.set_vision_trainable(config.train.train_encoders)
    if config.train.activation_checkpointing:
        model.llm.gradient_checkpointing_enable()
    return model, tokenizer


def build_engine(train: TrainSection, model, world_size: int, total_steps: int):
    import deepspeed

    from actors.deepspeed_config import deepspeed_config

    cfg = deepspeed_config(train, model.flavour, world_size=world_size, total_steps=total_steps)
    # No ZeRO-3 special cases: every parameter is used only inside its own module's forward, and
    # the vision module runs (and touches all its parameters) on every batch, images or not.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    return engine


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


def export_model(engine, tokenizer, storage, layout: Layout, check_batch: Optional[dict], rank: int) -> dict:
    """Gather the full model, write ``<out>/export`` (``_SUCCESS`` last); rank 0 returns a summary."""
    from actors.consolidate import consolidated_state_dict, load_consolidated
    from models.checkpoint import save_model_dir
    from models.sphinx import SphinxX

    logits = None
    if check_batch is not None:  # every rank runs the forward (EP layers exchange tokens)
        engine.module.eval()
        with torch.no_grad():
            logits = engine(**model_inputs(check_batch, engine.device)).logits.float().cpu()
        engine.module.train()
    state = consolidated_state_dict(engine)
    if rank != 0:
        return {}
    module = engine.module
    plain = SphinxX(module.flavour, **module.token_ids())
    load_consolidated(plain, state)
    plain.eval()
    summary: dict[str, Any] = {"export": layout.export}
    if check_batch is not None:
        with torch.no_grad():
            mine = plain(**model_inputs(check_batch)).logits.float()
        summary["export_max_abs_diff"] = float((mine - logits).abs().max())
        buf = io.BytesIO()
        torch.save({"batch": {k: v for k, v in check_batch.items()}, "logits": logits}, buf)
        storage.write_bytes(layout.export_check, buf.getvalue())
    storage.delete(layout.export)
    with tempfile.TemporaryDirectory(prefix="sx-export-") as tmp:
        save_model_dir(plain, tokenizer, tmp)
        storage.upload_dir(tmp, layout.export)
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
    import torch.distributed as dist

    if world == 1:
        return 1.0
    counts = torch.tensor([float(num_tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    total = float(counts[0])
    return num_tokens / total if total else 1.0 / world


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
    import torch.distributed as dist
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

    model, tokenizer = build_model(config, storage)
    engine = build_engine(train, model, world, total)

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
        sums = torch.zeros(6, dtype=torch.float64)
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
            sums[:5] += torch.tensor([float(output.lm_loss) * share, float(output.aux_loss) / world,
                                      float(batch["num_tokens"]), float(batch["image_tokens"]),
                                      float(batch["saved_tokens"])], dtype=torch.float64)
            last_batch = batch
        if rank == 0 and time.monotonic() - last_report >= report_every_s:
            sums[5] = 1.0
        t = time.perf_counter()
        dist.all_reduce(sums)
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
