"""DeepSpeed checkpoints as the training loop saves and restores them.

    >>> directory = save_checkpoint(engine, step, history, rank)   # this rank's shards (+ metrics)
    >>> ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    >>> step, history = load_checkpoint(engine, directory)         # what Ray Train hands back
    >>> step, history = load_from_storage(engine, storage, uri)    # a checkpoint the driver found

Every rank writes its own DeepSpeed shards (tag ``step00000012``, client state ``{"step": 12}``)
into its own directory; Ray merges the ranks' files into one checkpoint on the run's storage.
Rank 0 adds ``metrics.jsonl``: its history up to the step, so a restored run keeps its curve.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.jsonl"  # inside a checkpoint directory: rank 0's history up to it


def save_checkpoint(engine, step: int, history: list[dict], rank: int) -> str:
    """Every rank writes its DeepSpeed shards into its own directory; rank 0 adds the metrics."""
    directory = tempfile.mkdtemp(prefix=f"sx-ckpt-r{rank}-")
    engine.save_checkpoint(directory, tag=f"step{step:08d}", client_state={"step": step})
    if rank == 0:
        Path(directory, METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    return directory


def load_checkpoint(engine, directory: str) -> tuple[int, list[dict]]:
    """(step, history up to it): the engine's model, optimizer and scheduler restored from ``directory``."""
    _, client = engine.load_checkpoint(directory)
    if client is None or "step" not in client:
        raise RuntimeError(f"checkpoint {directory} holds no DeepSpeed state with a step")
    history_path = Path(directory, METRICS_FILE)
    history = [json.loads(x) for x in history_path.read_text().splitlines() if x] if history_path.exists() else []
    step = int(client["step"])
    return step, [m for m in history if m["step"] <= step]


def load_from_storage(engine, storage, uri: str) -> tuple[int, list[dict]]:
    """``load_checkpoint`` of a checkpoint directory on the run's storage (S3 or local)."""
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="sx-restore-") as tmp:
        fs, path = storage.resolve(uri)  # pyarrow copy: S3 directory markers are skipped
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(engine, tmp)
