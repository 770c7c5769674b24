"""Upstream workarounds, driver side: each one a function naming the upstream project, the
version it targets and the bug or limitation it works around; each has a test in
tests/pipelines/test_upstream_driver.py that shows why it is there. Drop one when its test says the
upstream no longer needs it.
"""

from __future__ import annotations

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


def read_parquet_cpu_free(files: list[str], **kwargs):
    """Ray Data 2.60: ``ray.data.read_parquet(files, **kwargs)`` through Ray's V1 parquet datasource
    (``DataContext.use_datasource_v2`` off for this call), whose read tasks take the ``num_cpus``
    given and which starts no actor.

    Limitation: the default (V2) reader plans every read as ``ListFiles -> ReadFiles``. The
    ``num_cpus`` argument reaches only ``ReadFiles``: the ``ListFiles`` tasks ask for 1 CPU
    whatever the caller says (hard-coded in ray/data/_internal/planner/plan_list_files_op.py).
    Behind an actor pool as large as the cluster (preprocess's tilers on a 2-CPU head) the
    listing task never gets its CPU and the read never starts: ``sphinx-x preprocess`` with a
    parquet source stalled for good. V2 also lists through a ``FooterFileIndexer`` that starts
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (default 32) ``FooterReader`` actors for any number of
    files: 32 worker processes, ~1–1.5 CPU-s each, for one file. V1 lists the files on the
    caller's process, and samples a few in short tasks, when ``read_parquet`` is called: before
    the dataset's actor pools exist. The flag is Ray's public switch
    (``RAY_DATA_USE_DATASOURCE_V2=0``); the dataset keeps a copy of the context, so restoring the
    flag after the call changes nothing in it.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    was = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, **kwargs)
    finally:
        ctx.use_datasource_v2 = was


def fit_interruptibly(trainer) -> Any:
    """Ray Train 2.60 (v2): ``trainer.fit()`` that Ctrl-C stops.

    Bug: on the main thread, ``DataParallelTrainer.fit`` replaces the process's SIGINT handler
    with one that only asks the controller to abort "gracefully" and lets ``fit`` return (the
    caller then goes on: exports, serves, ...); a second Ctrl-C is logged and ignored, only the
    third exits. Ray installs it through the trainer's private ``_register_sigint_handler``, which
    this trainer's instance answers with a no-op: the process keeps its own handler, Ctrl-C
    raises KeyboardInterrupt out of ``fit``'s ``ray.get`` at once, and the caller's cleanup
    (``ray.shutdown``, ``Serve`` teardown) then stops the controller and its workers.

    ``fit`` stays on the calling thread on purpose. Running it on a thread of its own (this
    function's earlier form: Ray skips the handler off the main thread) left that thread blocked
    in ``ray.get`` when the caller's cleanup called ``ray.shutdown``; a thread that touches Ray's
    core worker during or after its shutdown ends the whole process on the spot (Ray's
    ``QuickExit``: "The core worker has already been shutdown ... The process will exit"), before
    the command's reaper (cluster.reaper) runs, and Ray's agents were left running.
    """
    if not callable(getattr(type(trainer), "_register_sigint_handler", None)):
        raise RuntimeError(f"{type(trainer).__name__} has no _register_sigint_handler: Ray Train changed; "
                           "check pipelines.upstream.fit_interruptibly against it")
    trainer._register_sigint_handler = lambda controller: None
    return trainer.fit()
