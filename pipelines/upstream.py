"""Upstream workarounds, driver side: each one a function naming the upstream project, the
version it targets and the bug or limitation it works around; each has a test in
tests/pipelines/test_upstream_driver.py that shows why it is there. Drop one when its test says the
upstream no longer needs it.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any


def repartition_without_cpus(ds):
    """Ray Data 2.60: make a just-made ``ds.repartition(target_num_rows_per_block=...)`` reserve no CPU.

    Limitation: ``Dataset.repartition`` takes no ``num_cpus`` / ``ray_remote_args``, so its
    ``StreamingRepartition`` logical op asks for the default 1 CPU per task. Behind a CPU-free
    map (preprocess parses with ``num_cpus=0``) the two ops' remote args then differ, Ray Data
    does not fuse them, and the repartition becomes an operator of its own that needs a free CPU,
    which an actor pool as large as the cluster (the tilers) never leaves: the graph stalls.
    Giving the op the map's ``{"num_cpus": 0}`` lets it fuse into the map
    (``MapBatches(...)->StreamingRepartition``). The op is a frozen dataclass in Ray's private
    ``ds._logical_plan``; hence ``object.__setattr__``. ``ds`` must end in the repartition.
    """
    op = ds._logical_plan.dag
    if hasattr(op, "ray_remote_args"):
        object.__setattr__(op, "ray_remote_args", {"num_cpus": 0})
    return ds


# Ray Data's variable; the indexer reads it when read_parquet builds it, on the driver
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_ACTOR = 256  # each actor reads footers on 128 I/O threads


def read_parquet_sized(files: list[str], **kwargs):
    """Ray Data 2.60: ``ray.data.read_parquet(files, **kwargs)`` with one footer-reading actor per
    256 files (at least 1, at most Ray's 32), not always 32.

    Limitation: every parquet read lists its files through a ``FooterFileIndexer`` that starts
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (default 32) ``FooterReader`` actors, whatever the
    number of files (ray/data/_internal/datasource_v2/formats/parquet/footer_file_indexer.py):
    32 new worker processes, ~1–1.5 CPU-s each to start, to read one file's footer on a 2-core
    machine. The count is read from the environment when ``read_parquet`` builds the indexer (on
    the caller's process, before any task), so it is set for that call only. A value the user set
    is kept. (The indexer's module also reads it once at import, as its default: it is imported
    first, so that default stays Ray's.)
    """
    import ray.data
    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer  # noqa: F401

    if FOOTER_ACTORS_ENV in os.environ:
        return ray.data.read_parquet(files, **kwargs)
    os.environ[FOOTER_ACTORS_ENV] = str(min(32, max(1, math.ceil(len(files) / FILES_PER_FOOTER_ACTOR))))
    try:
        return ray.data.read_parquet(files, **kwargs)
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


def fit_interruptibly(trainer) -> Any:
    """Ray Train 2.60 (v2): ``trainer.fit()`` that Ctrl-C stops.

    Bug: on the main thread, ``DataParallelTrainer.fit`` replaces the process's SIGINT handler
    with one that only asks the controller to abort "gracefully" and lets ``fit`` return (the
    caller then goes on: exports, serves, ...); a second Ctrl-C is logged and ignored, only the
    third exits. Ray skips that handler off the main thread (as under Tune), so ``fit`` runs on
    a worker thread here and Ctrl-C raises KeyboardInterrupt in the caller at once; the caller's
    cleanup (``ray.shutdown``, ``Serve`` teardown) then stops the controller and its workers.
    """
    out: dict[str, Any] = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: the main thread stays interruptible
    if "error" in out:
        raise out["error"]
    return out["result"]
