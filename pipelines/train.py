"""`sphinx-x train SPEC`: one-stage DeepSpeed training of the spec's flavour on Ray Train.

    >>> summary = run_stage(load_spec("cluster/examples/local.yaml"))
    >>> summary["step"], summary["export"]
    (100, 's3://sphinx-x/runs/local/train/export')

Driver side: reads the shard index (ids, lengths) written by ``sphinx-x preprocess``, fixes the
seeded, length-grouped batch plan (``actors.batching``), builds one ordered dataset per rank
(``actors.train_data``) and runs a ``TorchTrainer`` whose scaling comes from ``spec.train``
(workers, GPUs, resources per worker, placement on ``train.group``'s custom resource). The
loop itself is ``actors.train_worker``.

Outputs under ``<storage>/<train.output>/``: ``checkpoints/`` (Ray Train run: DeepSpeed shards
of every rank, ``metrics.jsonl``), ``metrics.jsonl``, ``loss.png``, ``export_check.pt``,
``export/`` (``models.checkpoint`` directory, ``_SUCCESS`` last) and ``summary.json``.

A run restarts where it stopped: Ray Train finds the run's checkpoints in storage and the
workers resume at the same step and data position. ``--force`` starts over;
``--export-from CKPT|latest`` only exports a consolidated model from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Any, Optional

from cluster.spec import ClusterSpec, load_spec
from cluster.storage import Storage, open_storage
from models.errors import UserError

log = logging.getLogger(__name__)

RUN_NAME = "checkpoints"
SUMMARY = "summary.json"


# ----------------------------------------------------------------------------- scaling


def scaling_config(spec: ClusterSpec):
    """Ray Train ScalingConfig from ``spec.train`` (and the placement resource of ``train.group``)."""
    from ray.train import ScalingConfig

    train = spec.train
    resources = {"CPU": 1.0, **train.resources_per_worker}
    if train.use_gpu:
        resources.setdefault("GPU", 1.0)
    group = spec.cluster.group(train.group)
    if group is not None:
        resources[group.placement_resource] = 0.001
    return ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu, resources_per_worker=resources)


def _connect(spec: ClusterSpec):
    import ray

    if ray.is_initialized():
        return ray
    if spec.cluster.address == "local":
        from cluster.runtime import ensure_ray

        return ensure_ray(spec)
    ray.init()  # inside a Ray Job on the spec's cluster (RAY_ADDRESS is set)
    return ray


def _tokenizer_uri(spec: ClusterSpec, storage: Storage) -> str:
    from models.flavours import from_name

    shard_tok = f"{spec.data.output}/tokenizer"
    if storage.list(shard_tok):
        return storage.uri_for(shard_tok)
    path = spec.model.tokenizer or from_name(spec.model.flavour, **spec.model.overrides).tokenizer
    if path is None:
        raise UserError(f"no tokenizer: {storage.uri_for(shard_tok)} is empty and the spec names none "
                        "(model.tokenizer); run `sphinx-x preprocess SPEC` first")
    return path


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(storage: Storage, uri: str) -> Optional[int]:
    """The DeepSpeed step a Ray Train checkpoint directory holds (from its ``latest`` tag)."""
    key = f"{uri.rstrip('/')}/latest"
    if not storage.exists(key):
        return None
    tag = storage.read_bytes(key).decode().strip()
    return int(tag.removeprefix("step")) if tag.startswith("step") else None


def list_checkpoints(spec: ClusterSpec, storage: Storage) -> list[tuple[int, str]]:
    """(step, uri) of the run's complete checkpoints, oldest first."""
    base = f"{spec.train.output}/{RUN_NAME}"
    dirs = sorted({u.split(f"/{RUN_NAME}/", 1)[1].split("/", 1)[0] for u in storage.list(base)
                   if f"/{RUN_NAME}/checkpoint_" in u})
    found = []
    for name in dirs:
        uri = storage.uri_for(base, name)
        step = checkpoint_step(storage, uri)
        if step is not None:
            found.append((step, uri))
    return sorted(found)


# ----------------------------------------------------------------------------- stage


def is_complete(spec: ClusterSpec) -> bool:
    storage = open_storage(spec.storage)
    return storage.exists(f"{spec.train.output}/export/_SUCCESS")


def _trainer(spec, storage, config, datasets, *, name: str, storage_path: str, filesystem, max_failures: int):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from actors.train_worker import train_loop_per_worker

    run_config = RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
    )
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # each rank's rows arrive in plan order
    return TorchTrainer(train_loop_per_worker, train_loop_config=config, scaling_config=scaling_config(spec),
                        run_config=run_config, datasets=datasets,
                        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest))


def run_stage(spec: ClusterSpec, *, force: bool = False, export_from: Optional[str] = None,
              pid_dir: Optional[str] = None, export: bool = True,
              report_every_s: Optional[float] = None) -> dict[str, Any]:
    """Train (or resume) and export; returns the summary (also ``<train.output>/summary.json``).

    ``report_every_s``: how often the workers report metrics to Ray Train between checkpoints
    (default ``actors.train_worker.REPORT_EVERY_S``; 0 = every step, as before, for benchmarks).
    """
    from actors.batching import plan_batches, total_steps
    from actors.train_data import plan_entries, rank_datasets, read_index

    storage = open_storage(spec.storage)
    out = spec.train.output
    if export_from is not None:
        return export_checkpoint(spec, export_from)
    if force:
        n = storage.delete(f"{out}/")
        log.info("train: --force: removed %d objects under %s", n, storage.uri_for(out))
    elif is_complete(spec) and storage.exists(f"{out}/{SUMMARY}"):
        log.info("train: %s is complete; skipping (use --force to redo)", storage.uri_for(out, "export"))
        return {**json.loads(storage.read_bytes(f"{out}/{SUMMARY}")), "skipped": True}

    _connect(spec)
    train = spec.train
    files, where, lengths = read_index(storage, spec.data.output)
    global_batch = train.global_batch
    steps = total_steps(len(lengths), global_batch, steps=train.steps, epochs=train.epochs)
    plan = plan_batches(lengths, micro_batch=train.micro_batch, grad_accum=train.grad_accum,
                        world_size=train.workers, steps=steps, seed=train.seed)
    done = list_checkpoints(spec, storage)
    start = min(done[-1][0], steps) if done else 0
    if start:
        log.info("train: resuming from step %d (%s)", start, done[-1][1])
    datasets = rank_datasets(files, spec.storage.model_dump(), plan_entries(plan, where, start_step=start))
    config = {
        "spec": spec.model_dump(mode="json"), "total_steps": steps, "data_start_step": start,
        "tokenizer_uri": _tokenizer_uri(spec, storage), "pid_dir": pid_dir, "export": export,
        "resume_from": done[-1][1] if start else None,
    }
    if report_every_s is not None:
        config["report_every_s"] = report_every_s
    t0 = time.time()
    trainer = _trainer(spec, storage, config, datasets, name=RUN_NAME, storage_path=storage.path(out),
                       filesystem=storage.filesystem, max_failures=train.max_failures)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if storage.exists(f"{out}/export.json"):  # written by rank 0 after the export
        metrics.update(json.loads(storage.read_bytes(f"{out}/export.json")))
    summary = {
        "step": metrics.get("step"), "total_steps": steps, "rows": len(lengths), "global_batch": global_batch,
        "workers": train.workers, "zero_stage": train.zero_stage, "expert_parallel": train.expert_parallel,
        "flavour": spec.model.flavour, "loss": metrics.get("loss"), "resumed_from": start or None,
        "export": metrics.get("export"), "export_max_abs_diff": metrics.get("export_max_abs_diff"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": storage.uri_for(out, "metrics.jsonl"), "wall_s": round(time.time() - t0, 1),
    }
    storage.write_bytes(f"{out}/{SUMMARY}", json.dumps(summary, indent=2).encode())
    return summary


def export_checkpoint(spec: ClusterSpec, checkpoint: str) -> dict[str, Any]:
    """Export ``<train.output>/export`` from a checkpoint URI (or ``latest``) with the run's layout."""
    from actors.train_data import read_index

    storage = open_storage(spec.storage)
    done = list_checkpoints(spec, storage)
    if checkpoint == "latest":
        if not done:
            raise UserError(f"no checkpoints under {storage.uri_for(spec.train.output, RUN_NAME)}")
        step, uri = done[-1]
    else:
        uri = storage.locate(checkpoint).uri
        step = checkpoint_step(storage, uri)
        if step is None:
            raise UserError(f"{checkpoint} is not a checkpoint of this run (no DeepSpeed 'latest' tag)")
    _connect(spec)
    _, _, lengths = read_index(storage, spec.data.output)
    from actors.batching import total_steps

    steps = total_steps(len(lengths), spec.train.global_batch, steps=spec.train.steps, epochs=spec.train.epochs)
    config = {"spec": spec.model_dump(mode="json"), "total_steps": steps, "export_from": uri,
              "tokenizer_uri": _tokenizer_uri(spec, storage)}
    with tempfile.TemporaryDirectory(prefix="sx-export-run-") as tmp:
        trainer = _trainer(spec, storage, config, None, name="export", storage_path=tmp, filesystem=None,
                           max_failures=0)
        result = trainer.fit()
    exported = json.loads(storage.read_bytes(f"{spec.train.output}/export.json"))
    return {"step": step, "checkpoint": uri, **exported}


def command(args) -> int:
    spec = load_spec(args.spec)
    summary = run_stage(spec, force=args.force, export_from=getattr(args, "export_from", None))
    print(json.dumps(summary, indent=2))
    return 0
