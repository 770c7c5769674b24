"""`sphinx-x train SPEC`: one-stage DeepSpeed training of the spec's flavour on Ray Train.

    >>> summary = run_stage(load_spec("cluster/examples/local.yaml"))
    >>> summary["step"], summary["export"]
    (100, 's3://sphinx-x/runs/local/train/export')

Driver side: reads the preprocess manifest (the shard list, the tiling and tokenizer facts: a
model they do not fit is refused here, before any worker starts) and the shard index (lengths),
checks the cluster can hold the workers and their readers, fixes the
seeded, length-grouped batch plan (``actors.train.batching``), builds one ordered dataset per rank
(``actors.train.data``) and runs a ``TorchTrainer`` whose scaling comes from ``spec.train``
(workers, GPUs, resources per worker, placement on ``train.group``'s custom resource). The
loop itself is ``actors.train.worker``.

Outputs under ``<train.output>/``, as ``cluster.layout`` names them: ``checkpoints/`` (the Ray
Train run: DeepSpeed shards of every rank), ``metrics.jsonl``, ``loss.png``, ``export_check.pt``,
``export/`` (``models.weights.model_dir`` directory, ``_SUCCESS`` last) and ``summary.json``.

A run restarts where it stopped: Ray Train finds the run's checkpoints in storage and the
workers resume at the same step and data position. ``--force`` starts over;
``--export-from CKPT|latest`` only exports a consolidated model from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np

from actors.data.manifest import Manifest, Tiling
from actors.train.data import READER_CPUS
from actors.train.summaries import ExportSummary, TrainSummary
from cluster import layout as run_layout
from cluster.capacity import Demand, Work, check_capacity
from cluster.connect import connect
from cluster.layout import Layout
from cluster.logs import Progress
from cluster.output_guard import check_force_output
from cluster.placement import placement
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec
from cluster.stall import stall_watch
from cluster.storage import Storage
from models.errors import UserError
from models.flavours import Flavour, from_name
from pipelines.stage import StageBase
from pipelines.upstream import fit_interruptibly

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scaling


def worker_resources(spec: ClusterSpec) -> dict[str, float]:
    """What each Ray Train worker holds: 1 CPU (or ``train.resources_per_worker``), a GPU with
    ``train.use_gpu``, and the placement resource of ``train.group``. The one rule: the
    ScalingConfig and the stage's demand both read it."""
    train = spec.train
    resources = {"CPU": 1.0, **train.resources_per_worker, **placement(spec, train.group)}
    if train.use_gpu:
        resources.setdefault("GPU", 1.0)
    return resources


def scaling_config(spec: ClusterSpec):
    """Ray Train ScalingConfig from ``spec.train`` (:func:`worker_resources` per worker)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=spec.train.workers, use_gpu=spec.train.use_gpu,
                         resources_per_worker=worker_resources(spec))


def train_flavour(spec: ClusterSpec) -> Flavour:
    """The spec's flavour with its overrides; ``train.aux_loss_weight`` is the MoE load-balancing
    coefficient (the paper's 0.01)."""
    flavour = from_name(spec.model.flavour, **spec.model.overrides)
    if flavour.is_moe:
        flavour = replace(flavour, llm={**flavour.llm, "router_aux_loss_coef": spec.train.aux_loss_weight})
    return flavour


# ----------------------------------------------------------------------------- the manifest


def read_manifest(storage: Storage, lay: Layout) -> Manifest:
    if not storage.exists(lay.manifest):
        raise UserError(f"no preprocess manifest at {lay.manifest}: run `sphinx-x preprocess SPEC` first")
    return Manifest.from_json(storage.read_bytes(lay.manifest), where=lay.manifest)


def check_manifest(manifest: Manifest, flavour: Flavour, where: str, *, weights: bool = False,
                   max_quarantine_fraction: Optional[float] = None) -> None:
    """Refuse shards tiled or tokenized for another model, naming both sides (on the driver), and
    shards whose quarantine gate failed (as recorded, or under ``max_quarantine_fraction`` now).
    (A shard format newer than this code reads is refused by :meth:`Manifest.from_json`.)"""
    failure = manifest.gate_failure(1.0 if max_quarantine_fraction is None else max_quarantine_fraction)
    if failure:
        raise UserError(f"the shards at {where} failed the quarantine gate ({failure}): not training on them. "
                        "Fix the data or raise data.max_quarantine_fraction, then run `sphinx-x preprocess SPEC`.")
    mine, theirs = Tiling.from_flavour(flavour).to_dict(), manifest.tiling.to_dict()
    diffs = [f"{k}: shards {theirs.get(k)!r} vs model {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    if diffs:
        raise UserError(f"the shards at {where} were tiled for another model (flavour "
                        f"{manifest.flavour!r}) than {flavour.name!r}: " + "; ".join(diffs)
                        + ". Run `sphinx-x preprocess SPEC --force` with this model.")
    vocab = manifest.tokenizer.vocab_size
    # with published weights the vocab follows their tokenizer (models.weights.hf_llm)
    if not weights and flavour.tokenizer is None and vocab > int(flavour.llm["vocab_size"]):
        raise UserError(f"the shards' tokenizer at {where} has {vocab} tokens but flavour {flavour.name!r} "
                        f"has vocab_size {flavour.llm['vocab_size']}")
    if not manifest.shards:
        raise UserError(f"the manifest at {where} lists no shards (rows written: "
                        f"{manifest.counts.rows_written}): nothing to train on")


def _tokenizer_uri(spec: ClusterSpec, storage: Storage, lay: Layout) -> str:
    if storage.list(lay.tokenizer):
        return lay.tokenizer
    path = spec.model.tokenizer or from_name(spec.model.flavour, **spec.model.overrides).tokenizer
    if path is None:
        raise UserError(f"no tokenizer: {lay.tokenizer} is empty and the spec names none "
                        "(model.tokenizer); run `sphinx-x preprocess SPEC` first")
    return lay.path(path)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(storage: Storage, uri: str) -> Optional[int]:
    """The DeepSpeed step a Ray Train checkpoint directory holds (from its ``latest`` tag)."""
    key = f"{uri.rstrip('/')}/latest"
    if not storage.exists(key):
        return None
    tag = storage.read_bytes(key).decode().strip()
    return int(tag.removeprefix("step")) if tag.startswith("step") else None


def list_checkpoints(spec: ClusterSpec, storage: Storage) -> list[tuple[int, str]]:
    """(step, uri) of the run's complete checkpoints, oldest first: a DeepSpeed ``latest`` tag and
    every rank's marker with every file it lists (``actors.train.checkpoints.incomplete``); a
    partly uploaded checkpoint is skipped, with a warning."""
    from actors.train.checkpoints import incomplete

    base = Layout.from_spec(spec, storage.uri).checkpoints
    keys = storage.list(base)
    dirs = sorted({u[len(base):].strip("/").split("/", 1)[0] for u in keys})
    found = []
    for name in dirs:
        if not name.startswith("checkpoint_"):
            continue
        uri = run_layout.join(base, name)
        step = checkpoint_step(storage, uri)
        if step is None:
            continue
        names = [k[len(uri):].strip("/") for k in keys if k.startswith(uri + "/")]
        why = incomplete(names, lambda n, u=uri: storage.read_bytes(run_layout.join(u, n)))
        if why:
            log.warning("train: skipping checkpoint %s: %s", uri, why)
            continue
        found.append((step, uri))
    return sorted(found)


# ----------------------------------------------------------------------------- stage


class TrainStage(StageBase):
    """`sphinx-x train SPEC [--export-from CKPT|latest]`: train (or resume) and export."""

    name = "train"
    help = "one-stage DeepSpeed training on Ray Train"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--export-from", default=None, metavar="CKPT",
                            help="only export a consolidated model dir from this checkpoint ('latest' ok)")

    def demand(self, spec: ClusterSpec) -> Demand:
        t = spec.train
        return Demand(self.name, (
            Work("train workers", t.workers, worker_resources(spec), group=t.group, uses_gpu=t.use_gpu),
            # each rank's Ray Data reader, beside the workers (actors.train.data.rank_datasets)
            Work("data readers", t.workers, {"CPU": READER_CPUS}, group=t.group, uses_gpu=t.use_gpu),
        ))

    def outputs(self, layout: Layout) -> dict[str, str]:
        return {"checkpoints": layout.checkpoints, "metrics": layout.metrics, "export": layout.export,
                "summary": layout.train_summary}

    def is_complete(self, ctx: RunContext) -> bool:
        return ctx.storage.exists(ctx.layout.export_success) and ctx.storage.exists(ctx.layout.train_summary)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Options: ``export_from`` (only export), ``export`` (False: no export), ``report_every_s``
        and ``on_step`` (see :func:`run_stage`)."""
        if ctx.option("export_from") is not None:
            return export_checkpoint(ctx, ctx.option("export_from"))
        return _train(ctx, export=ctx.option("export") is not False, report_every_s=ctx.option("report_every_s"),
                      on_step=ctx.option("on_step"))

    def report(self, ctx: RunContext, summary: dict[str, Any]) -> None:
        print(json.dumps(summary, indent=2), flush=True)


STAGE = TrainStage()


def is_complete(spec: ClusterSpec) -> bool:
    return STAGE.is_complete(RunContext.build(spec))


def _trainer(spec, config, datasets, *, name: str, storage_path: str, filesystem, max_failures: int):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from actors.train.worker import train_loop_per_worker

    run_config = RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
    )
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # each rank's rows arrive in plan order
    return TorchTrainer(train_loop_per_worker, train_loop_config={"config": config},
                        scaling_config=scaling_config(spec), run_config=run_config, datasets=datasets,
                        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest))


def run_stage(spec: ClusterSpec, *, force: bool = False, export_from: Optional[str] = None,
              export: bool = True, report_every_s: Optional[float] = None,
              on_step: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """``STAGE.run`` on a context built here: train (or resume) and export; returns the summary
    (also ``<train.output>/summary.json``).

    ``report_every_s``: how often the workers report metrics to Ray Train between checkpoints
    (default ``actors.train.worker.REPORT_EVERY_S``; 0 = every step, for benchmarks).
    ``on_step(progress)`` is called on the driver for every step rank 0 finishes
    (``{"step", "total", "loss", "tokens_per_s"}``); the live progress line uses it too.
    """
    return STAGE.run(RunContext.build(spec, force=force, options={
        "export_from": export_from, "export": export, "report_every_s": report_every_s, "on_step": on_step}))


def _train(ctx: RunContext, *, export: bool, report_every_s: Optional[float],
           on_step: Optional[Callable[[dict], None]]) -> dict[str, Any]:
    from actors.train.batching import plan_batches, total_steps
    from actors.train.data import plan_entries, rank_datasets, read_index
    from actors.train.worker import REPORT_EVERY_S, TrainWorkerConfig

    spec, storage, lay = ctx.spec, ctx.storage, ctx.layout
    if ctx.force:
        check_force_output(spec, "train.output", lay.root)  # never a root, a home or the inputs
        n = storage.delete(lay.train)
        log.info("train: --force: removed %d objects under %s", n, lay.train)
    elif STAGE.is_complete(ctx):
        log.info("train: %s is complete; skipping (use --force to redo)", lay.export)
        done_before = TrainSummary.from_json(storage.read_bytes(lay.train_summary), where=lay.train_summary)
        return {**done_before.to_dict(), "skipped": True}

    flavour = train_flavour(spec)
    manifest = read_manifest(storage, lay)
    check_manifest(manifest, flavour, lay.shards, weights=bool(spec.model.weights),
                   max_quarantine_fraction=spec.data.max_quarantine_fraction)
    conn = connect(spec)
    check_capacity(spec, STAGE.demand(spec))
    train = spec.train
    files, where, lengths = read_index(storage, lay, list(manifest.shards))
    global_batch = train.global_batch
    packs, row_lengths = training_rows(spec, lengths)
    steps = total_steps(len(row_lengths), global_batch, steps=train.steps, epochs=train.epochs,
                        rows=f"packed rows (train.packing, data.max_seq_len {spec.data.max_seq_len})"
                        if train.packing else "rows")
    plan = plan_batches(row_lengths, micro_batch=train.micro_batch, grad_accum=train.grad_accum,
                        world_size=train.workers, steps=steps, seed=train.seed)
    done = list_checkpoints(spec, storage)
    start = min(done[-1][0], steps) if done else 0
    if start:
        log.info("train: resuming from step %d (%s)", start, done[-1][1])
    datasets = rank_datasets(files, spec.storage, plan_entries(plan, where, start_step=start, packs=packs),
                             tile=manifest.tiling.tile)
    progress_queue = _progress_queue()
    config = TrainWorkerConfig(
        train=train, storage=spec.storage, flavour=flavour, layout=lay, total_steps=steps,
        tokenizer_uri=_tokenizer_uri(spec, storage, lay),
        weights_uri=lay.path(spec.model.weights) if spec.model.weights else None,
        data_start_step=start, resume_from=done[-1][1] if start else None, export=export,
        report_every_s=REPORT_EVERY_S if report_every_s is None else report_every_s, progress=progress_queue,
    )
    t0 = time.time()
    fs, path = storage.resolve(lay.train)
    trainer = _trainer(spec, config, datasets, name=run_layout.CHECKPOINT_RUN, storage_path=path,
                       filesystem=fs, max_failures=train.max_failures)
    with stall_watch("train"), _follow(progress_queue, steps, on_step):
        result = fit_interruptibly(trainer)
    last = result.metrics  # the workers' last report (actors.train.worker): loss None when no step ran here
    exported = None
    if storage.exists(lay.export_summary):  # written by rank 0 after the export
        exported = ExportSummary.from_json(storage.read_bytes(lay.export_summary), where=lay.export_summary)
    summary = TrainSummary(
        step=int(last["step"]), total_steps=steps, rows=len(lengths), global_batch=global_batch,
        packed_rows=len(row_lengths) if train.packing else None,
        workers=train.workers, zero_stage=train.zero_stage, expert_parallel=train.expert_parallel,
        flavour=spec.model.flavour, loss=last.get("loss"), aux_loss=last.get("aux_loss"),
        resumed_from=start or None,
        export=exported.export if exported else None,
        export_max_abs_diff=exported.export_max_abs_diff if exported else None,
        export_check=exported.export_check if exported else None,
        export_bytes=exported.export_bytes if exported else None,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        metrics=lay.metrics, wall_s=round(time.time() - t0, 1), ray=conn.ray_address,
    )
    storage.write_bytes(lay.train_summary, summary.to_json(indent=2).encode())
    return summary.to_dict()


def _progress_queue():
    """A small queue rank 0 feeds once per step (actors.train.worker); 0 CPUs, dropped when full."""
    from ray.util.queue import Queue

    return Queue(maxsize=256, actor_options={"num_cpus": 0})


class _follow:
    """Drain the progress queue on a thread: the live line, and ``on_step`` for each item."""

    def __init__(self, queue, total: int, on_step: Optional[Callable[[dict], None]]):
        self.queue, self.total, self.on_step = queue, total, on_step
        self.stop = threading.Event()
        self.bar = Progress("train", total=total, unit="steps")

    def __enter__(self) -> "_follow":
        self.thread = threading.Thread(target=self._run, name="train-progress", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone (shutdown)
                return
            self.bar.update(item["step"], loss=round(item["loss"], 4),
                            tok_s=int(item.get("tokens_per_s") or 0))
            if self.on_step is not None:
                try:
                    self.on_step(item)
                except Exception:  # noqa: BLE001 - a callback's failure must not stall training
                    log.exception("train: on_step callback failed")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        # its ``get`` waits 0.5 s at most; it must be out of Ray before the caller's ``ray.shutdown``
        # (pipelines.upstream.fit_interruptibly says why)
        self.thread.join(timeout=10)
        self.bar.close()
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:  # noqa: BLE001
            pass


def training_rows(spec: ClusterSpec, lengths: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(sample indices per training row, the rows' token counts): ``train.packing`` packs the
    samples into rows of at most ``data.max_seq_len`` (actors.train.batching.pack_rows), else one
    sample per row."""
    from actors.train.batching import pack_rows

    if spec.train.packing:
        packs = pack_rows(lengths, capacity=spec.data.max_seq_len, seed=spec.train.seed)
    else:
        packs = [np.asarray([i], dtype=np.int64) for i in range(len(lengths))]
    return packs, np.asarray([int(lengths[p].sum()) for p in packs], dtype=np.int64)


def export_checkpoint(ctx: RunContext, checkpoint: str) -> dict[str, Any]:
    """Export ``<train.output>/export`` from a checkpoint URI (or ``latest``) with the run's layout."""
    from actors.train.batching import total_steps
    from actors.train.data import read_index
    from actors.train.worker import TrainWorkerConfig

    spec, storage, lay = ctx.spec, ctx.storage, ctx.layout
    done = list_checkpoints(spec, storage)
    if checkpoint == "latest":
        if not done:
            raise UserError(f"no checkpoints under {lay.checkpoints}")
        step, uri = done[-1]
    else:
        uri = lay.path(checkpoint)
        step = checkpoint_step(storage, uri)
        if step is None:
            raise UserError(f"{checkpoint} is not a checkpoint of this run (no DeepSpeed 'latest' tag)")
    connect(spec)
    check_capacity(spec, STAGE.demand(spec))
    manifest = read_manifest(storage, lay)
    _, _, lengths = read_index(storage, lay, list(manifest.shards))
    steps = total_steps(len(training_rows(spec, lengths)[1]), spec.train.global_batch, steps=spec.train.steps, epochs=spec.train.epochs)
    config = TrainWorkerConfig(
        train=spec.train, storage=spec.storage, flavour=train_flavour(spec), layout=lay, total_steps=steps,
        tokenizer_uri=_tokenizer_uri(spec, storage, lay), weights_uri=None, export_from=uri)
    with tempfile.TemporaryDirectory(prefix="sx-export-run-") as tmp:
        trainer = _trainer(spec, config, None, name="export", storage_path=tmp, filesystem=None, max_failures=0)
        fit_interruptibly(trainer)
    exported = ExportSummary.from_json(storage.read_bytes(lay.export_summary), where=lay.export_summary)
    return {"step": step, "checkpoint": uri, **exported.to_dict()}
