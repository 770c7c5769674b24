"""DeepSpeed checkpoints as the training loop saves and restores them.

    >>> directory = save_checkpoint(engine, step, history, rank)   # this rank's shards (+ metrics)
    >>> ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    >>> step, history = load_checkpoint(engine, directory)         # what Ray Train hands back
    >>> step, history = load_from_storage(engine, storage, uri)    # a checkpoint the driver found

Every rank writes its own DeepSpeed shards (tag ``step00000012``, client state ``{"step": 12}``)
into its own directory; Ray merges the ranks' files into one checkpoint on the run's storage.
Rank 0 adds ``metrics.jsonl``: its history up to the step, so a restored run keeps its curve.

Complete or not (docs/security.md, "Atomic exports and checkpoints"): each rank writes, last, a
marker ``_rank00001-of-00002.json`` listing its files and their sizes. A checkpoint is complete
when the markers of all ranks are there and every file they list is (:func:`incomplete`); a
checkpoint without them is never resumed from — a partly uploaded one looks like it otherwise.

Loading runs no code from the files (docs/security.md, "Checkpoint loads"): every ``torch.load``
DeepSpeed makes while restoring is forced to ``weights_only=True``, with only the DeepSpeed
classes its optimizer states hold (:data:`SAFE_GLOBALS`) allowed; any other object in a file
(a pickle whose ``__reduce__`` would run a command) raises UserError and nothing is restored.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from models.errors import UserError

METRICS_FILE = "metrics.jsonl"  # inside a checkpoint directory: rank 0's history up to it
_MARKER = re.compile(r"^_rank(\d{5})-of-(\d{5})\.json$")
# the non-tensor classes DeepSpeed's optimizer states pickle (ZeRO 1-3, fp32/bf16/fp16)
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def marker_name(rank: int, world: int) -> str:
    return f"_rank{rank:05d}-of-{world:05d}.json"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _write_marker(directory: str, rank: int, world: int) -> None:
    root = Path(directory)
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    tmp = root / f".{marker_name(rank, world)}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world": world, "files": files}))
    tmp.replace(root / marker_name(rank, world))


def incomplete(names: list[str], read_marker) -> Optional[str]:
    """Why a checkpoint whose files are ``names`` (paths relative to it) is not complete, or None.

    ``read_marker(name)`` returns a marker's bytes. Complete: markers ``_rank<k>-of-<W>.json`` for
    every k < W, one W, and every file each lists present (with ``sizes``: of that size).

        >>> incomplete(["latest"], None)
        'no rank markers (_rankNNNNN-of-NNNNN.json): written before markers, or not finished'
    """
    have = set(names)
    markers = {n: _MARKER.match(n) for n in names if _MARKER.match(n)}
    if not markers:
        return "no rank markers (_rankNNNNN-of-NNNNN.json): written before markers, or not finished"
    worlds = {int(m.group(2)) for m in markers.values()}
    if len(worlds) != 1:
        return f"rank markers of several world sizes: {sorted(worlds)}"
    world = worlds.pop()
    missing_ranks = sorted(set(range(world)) - {int(m.group(1)) for m in markers.values()})
    if missing_ranks:
        return f"no marker from rank(s) {missing_ranks} of {world}"
    for name in sorted(markers):
        try:
            listed = json.loads(read_marker(name))["files"]
        except (ValueError, KeyError, TypeError) as err:
            return f"unreadable marker {name}: {err}"
        absent = sorted(f for f in listed if f not in have)
        if absent:
            return f"{len(absent)} file(s) listed by {name} are missing, e.g. {absent[0]}"
    return None


def _check_complete(directory: str) -> None:
    root = Path(directory)
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    why = incomplete(names, lambda n: (root / n).read_bytes())
    latest = root / "latest"
    if why is None and latest.is_file() and not re.fullmatch(r"step\d{8}", latest.read_text().strip()):
        why = f"its 'latest' tag {latest.read_text().strip()[:80]!r} is not a step tag of this project"
    if why is None:  # sizes too: a local copy can be cut short
        for name in (n for n in names if _MARKER.match(n)):
            for rel, size in json.loads((root / name).read_bytes())["files"].items():
                if (root / rel).stat().st_size != size:
                    why = f"{rel} has {(root / rel).stat().st_size} bytes, {name} says {size}"
    if why:
        raise UserError(f"checkpoint {directory} is incomplete ({why}); it is not resumed from")


@contextlib.contextmanager
def weights_only_loads(where: str) -> Iterator[None]:
    """Within: every ``torch.load`` (DeepSpeed's included) is ``weights_only=True`` with only
    :data:`SAFE_GLOBALS` allowed; a file holding anything else raises UserError naming it."""
    import pickle

    import torch

    allowed = []
    for dotted in SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), name))
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            first = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), str(err).splitlines()[0])
            raise UserError(f"{where}: refusing to load {f}: it holds objects a weights-only load does not "
                            f"allow ({first[:200]}); a checkpoint could run code when unpickled") from None

    with torch.serialization.safe_globals(allowed):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def save_checkpoint(engine, step: int, history: list[dict], rank: int) -> str:
    """Every rank writes its DeepSpeed shards into its own directory; rank 0 adds the metrics."""
    directory = tempfile.mkdtemp(prefix=f"sx-ckpt-r{rank}-")
    engine.save_checkpoint(directory, tag=f"step{step:08d}", client_state={"step": step})
    if rank == 0:
        Path(directory, METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    _write_marker(directory, rank, _world_size())  # last: this rank's part is complete
    return directory


def load_checkpoint(engine, directory: str) -> tuple[int, list[dict]]:
    """(step, history up to it): the engine's model, optimizer and scheduler restored from ``directory``.

    UserError, before anything is restored, for an incomplete checkpoint; UserError for a file
    holding objects outside the weights-only allow-list (:func:`weights_only_loads`)."""
    _check_complete(directory)
    with weights_only_loads(f"checkpoint {directory}"):
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

    from cluster.storage import confined_path

    with tempfile.TemporaryDirectory(prefix="sx-restore-") as tmp:
        base = storage.locate(uri).uri
        for key in storage.list(base):  # a key with `..` is refused before anything is written
            if not key.endswith("/"):  # S3 directory markers are not copied
                confined_path(tmp, key[len(base):], key)
        fs, path = storage.resolve(uri)  # pyarrow copy: S3 directory markers are skipped
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(engine, tmp)
