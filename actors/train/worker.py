"""The training loop every Ray Train worker runs: DeepSpeed one-stage training of SphinxX.

``train_loop_per_worker({"config": TrainWorkerConfig})`` (built once by ``pipelines.stages.train``):

1. build the model and its engine (``actors.train.engine``: the spec's flavour with the shards'
   tokenizer, initial weights when ``model.weights`` is set, ZeRO-2/3, AutoEP for MoE, AdamW,
   warm-up + cosine). Every collective runs on ``engine.device`` (NCCL and gloo alike); bf16
   on GPU (``precision: auto``); activation checkpointing on for real flavours;
2. restore the latest checkpoint Ray Train hands back (after a worker died, or a restarted
   ``sphinx-x train``): model, optimizer, scheduler, the step, the metrics so far
   (``actors.train.checkpoints``);
3. iterate this rank's planned micro-batches of packed rows (``train.packing``) or single samples
   (``get_dataset_shard(f"rank{r}").iter_torch_batches``), skipping what was consumed;
   one optimizer step per ``grad_accum`` micro-batches (``_train_step``); uint8 views go to the
   device as is (the model normalises them);
4. every ``checkpoint_every`` steps and at the end: every rank ``engine.save_checkpoint`` into
   its own directory, then ``ray.train.report(metrics, checkpoint=...)`` (Ray merges the ranks'
   files into one checkpoint on the run's storage);
5. at the end, stream the model into the export plus a fixed batch with the trained engine's
   logits (``actors.train.export``), and rank 0 writes ``metrics.jsonl`` and ``loss.png``
   (``actors.train.metrics``).

Metrics per step (rank 0 writes them, ``metrics.jsonl``): step, loss, lm_loss, aux_loss, lr (the
one this step ran at), grad_norm, tokens, tokens_per_s, image_tokens, saved_tokens (image tokens
skip tokens saved), step_time_s (data_s waiting for the input + compute_s forward/backward/step +
sync_s all_reduce and grad norm), report_s (the previous step's pid file, report and checkpoint, outside step_time_s),
wall_t (unix time at the step's end), restored_from. Ray Train sees a report at every checkpoint
and about every ``REPORT_EVERY_S`` seconds (config ``report_every_s``), not every step; rank 0
also puts a small progress item (step, loss, tokens/s, its pid) on the driver's queue every step.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from actors.train.batching import collate, model_inputs
from actors.train.checkpoints import load_checkpoint, load_from_storage, save_checkpoint
from actors.train.collectives import all_reduce_sums, token_share
from actors.train.engine import build_engine, build_model
from actors.train.export import export_model
from actors.train.metrics import write_metrics
from actors.train.summaries import ExportSummary
from cluster.layout import Layout
from cluster.spec import StorageSection, TrainSection
from models.flavours import Flavour

log = logging.getLogger(__name__)

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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from cluster.storage import open_storage

    config: TrainWorkerConfig = loop_config["config"]
    train, lay, total = config.train, config.layout, config.total_steps
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage = open_storage(config.storage)
    # as many threads as CPUs the worker reserved (scaling_config: 1 unless resources_per_worker says)
    torch.set_num_threads(max(1, int(train.resources_per_worker.get("CPU", 1))))
    engine, tokenizer = _engine(config, storage, world)

    if config.export_from:  # export only: this checkpoint, no training
        step, _ = load_from_storage(engine, storage, config.export_from)
        exported = export_model(engine, tokenizer, storage, lay, None, rank)
        ray.train.report({"step": step, **_export_metrics(exported)})
        return

    step, history, restored_from = _restore(engine, storage, config, rank)
    batches = _batches(config, tokenizer, rank, step)
    engine.train()
    last_batch, report_s, last_report = None, 0.0, time.monotonic()
    while step < total:
        report_at = last_report + config.report_every_s if rank == 0 else None  # rank 0 decides
        metrics, last_batch, report_now = _train_step(engine, batches, config, step, rank, world, report_at,
                                                      report_s=report_s, restored_from=restored_from)
        step += 1
        history.append(metrics)
        t = time.perf_counter()
        _progress(config, rank, metrics)
        if step % train.checkpoint_every == 0 or step == total:
            directory = save_checkpoint(engine, step, history, rank)
            if rank == 0:
                write_metrics(storage, lay, history)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
            shutil.rmtree(directory, ignore_errors=True)
            last_report = time.monotonic()
        elif report_now:
            ray.train.report(metrics)
            last_report = time.monotonic()
        report_s = time.perf_counter() - t  # outside the step: shown on the next step's metrics

    exported = export_model(engine, tokenizer, storage, lay, last_batch, rank) if config.export else None
    if rank == 0:
        write_metrics(storage, lay, history, png=True)
    ray.train.report({**(history[-1] if history else {"step": step}), **_export_metrics(exported), "done": True})


def _engine(config: TrainWorkerConfig, storage, world: int):
    """(DeepSpeed engine, tokenizer) on this worker's device (the GPU Ray Train set, or CPU)."""
    from actors.train.deepspeed_config import deepspeed_config

    ds_config = deepspeed_config(config.train, config.flavour, world_size=world, total_steps=config.total_steps)
    device = None
    if config.train.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # Ray Train set this worker's GPU
    model, tokenizer = build_model(config, storage, ds_config, device)
    return build_engine(config.train, model, world, config.total_steps, ds_config), tokenizer


def _restore(engine, storage, config: TrainWorkerConfig, rank: int) -> tuple[int, list[dict], Optional[int]]:
    """(step, history, restored_from): the checkpoint Ray Train hands back (a worker died), else
    the one the driver found (a restarted ``sphinx-x train``), else step 0."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # a private copy per rank, not Ray's shared per-node download (`as_directory`): the ranks'
        # copies never depend on another process's download or clean-up (a restore once read a
        # ZeRO partition that ended before its first byte; cause not pinned down, BENCHMARKS.md)
        with tempfile.TemporaryDirectory(prefix=f"sx-restore-r{rank}-") as directory:
            checkpoint.to_directory(directory)
            step, history = load_checkpoint(engine, directory)
        log.info("rank %d: restored step %d", rank, step)
        return step, history, step
    if config.resume_from:
        step, history = load_from_storage(engine, storage, config.resume_from)
        return step, history, step
    return 0, [], None


def _batches(config: TrainWorkerConfig, tokenizer, rank: int, step: int) -> Iterator[dict]:
    """This rank's micro-batches in plan order, from ``step`` on (what came before is skipped)."""
    import ray.train

    shard = ray.train.get_dataset_shard(f"rank{rank}")
    batches = iter(shard.iter_torch_batches(batch_size=config.train.micro_batch,
                                            collate_fn=ShardCollate(tokenizer.pad_token_id),
                                            drop_last=False, prefetch_batches=2))
    for _ in range((step - config.data_start_step) * config.train.grad_accum):  # consumed before the checkpoint
        next(batches)
    return batches


def _train_step(engine, batches: Iterator[dict], config: TrainWorkerConfig, step: int, rank: int, world: int,
                report_at: Optional[float], *, report_s: float,
                restored_from: Optional[int]) -> tuple[dict, dict, bool]:
    """One optimizer step over ``grad_accum`` micro-batches: (its metrics, the last micro-batch,
    whether every rank reports now). ``report_at``: rank 0's ``time.monotonic()`` deadline for a
    report (None on the other ranks); the step's all_reduce hands its decision to every rank, so
    all call ``ray.train.report`` together."""
    accum, micro = config.train.grad_accum, config.train.micro_batch
    lr = float(engine.get_lr()[0])  # this step's lr: DeepSpeed steps the schedule after the optimizer step
    t0 = time.perf_counter()
    data_s = compute_s = 0.0
    sums = [0.0] * 6  # lm, aux, tokens, image tokens, saved tokens, "report now"
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
    if report_at is not None and time.monotonic() >= report_at:
        sums[5] = 1.0
    t = time.perf_counter()
    sums = all_reduce_sums(sums, engine.device)
    norm = engine.get_global_grad_norm()
    sync_s = time.perf_counter() - t
    elapsed = time.perf_counter() - t0
    lm_sum, aux_sum = float(sums[0]), float(sums[1])
    metrics = {
        "step": step + 1,
        "loss": (lm_sum + float(engine.module.aux_loss_coef) * aux_sum) / accum,
        "lm_loss": lm_sum / accum,  # token-weighted over the ranks (see token_share)
        "aux_loss": aux_sum / accum,
        "lr": lr,
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
    return metrics, batch, sums[5] > 0


def _progress(config: TrainWorkerConfig, rank: int, metrics: dict) -> None:
    """Rank 0 hands the driver's progress line one small item per step (never blocks)."""
    if rank != 0 or config.progress is None:
        return
    try:
        config.progress.put_nowait({"step": metrics["step"], "total": config.total_steps, "loss": metrics["loss"],
                                    "tokens_per_s": metrics["tokens_per_s"], "pid": os.getpid()})
    except Exception:  # noqa: BLE001 - full (nobody reading) or gone: progress is best effort
        pass


def _export_metrics(exported: Optional[ExportSummary]) -> dict:
    """The export's summary among the last report's metrics (rank 0; {} on the others)."""
    return exported.to_dict() if exported is not None else {}
