"""pipelines.upstream: why each driver-side workaround is there, shown on small data.

(Named ``test_upstream_driver`` beside ``tests/actors/test_upstream.py``: basenames stay unique.)
"""

from __future__ import annotations

import contextlib
import inspect
import io

from pipelines.upstream import repartition_without_cpus


def _optimized_physical_plan(ds) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds.explain()
    return out.getvalue().split("Physical Plan (Optimized)")[1]


def _parse_then_repartition():
    import ray.data

    ds = ray.data.from_items([{"x": i} for i in range(8)])
    return ds.map_batches(lambda b: b, num_cpus=0, batch_format="pyarrow").repartition(target_num_rows_per_block=2)


def test_repartition_without_cpus_fuses_into_the_cpu_free_parse(ray_local):
    # Ray 2.60's repartition takes no resource argument: when it does, drop the workaround
    assert not {"num_cpus", "ray_remote_args"} & set(inspect.signature(ray_local.data.Dataset.repartition).parameters)

    # without it: the repartition is an operator of its own (tasks of 1 CPU, which the tilers never leave)
    plain = _optimized_physical_plan(_parse_then_repartition())
    assert "MapBatches(<lambda>)->StreamingRepartition" not in plain
    assert plain.count("TaskPoolMapOperator[") == 2, plain

    # with it: one fused, CPU-free operator, and the same rows
    fixed = repartition_without_cpus(_parse_then_repartition())
    plan = _optimized_physical_plan(fixed)
    assert "TaskPoolMapOperator[MapBatches(<lambda>)->StreamingRepartition" in plan, plan
    assert sorted(r["x"] for r in fixed.take_all()) == list(range(8))


def _waiting_trainer(tmp_path):
    """A one-worker trainer whose loop says it runs (``started``) and then waits for ``release``
    (120 s at most): the test acts while fit is certainly inside the loop, not after a guessed delay."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    started, release = tmp_path / "started", tmp_path / "release"

    def loop(config):
        import os
        import time

        open(config["started"], "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(config["release"]) and time.monotonic() < deadline:
            time.sleep(0.1)

    trainer = TorchTrainer(loop, train_loop_config={"started": str(started), "release": str(release)},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="waiting", storage_path=str(tmp_path)))
    return trainer, started, release


def _once_it_exists(path, then) -> None:
    """On a thread: when ``path`` exists (the loop runs, 120 s at most), call ``then()``."""
    import threading
    import time

    def watch():
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        then()

    threading.Thread(target=watch, daemon=True).start()


def test_fit_interruptibly_lets_ctrl_c_stop_ray_train(ray_local, tmp_path):
    import os
    import signal
    import threading
    import time

    import pytest

    from pipelines.upstream import fit_interruptibly

    # Python's own Ctrl-C handler, whatever the session inherited (a test run started in the
    # background of a non-interactive shell ignores SIGINT); the session's is put back at the end
    default = signal.default_int_handler
    inherited = signal.signal(signal.SIGINT, default)
    seen = {}

    # without it: fit on the main thread swaps in Ray Train's SIGINT handler, which only asks for
    # a graceful abort and lets fit return (a second Ctrl-C is ignored); looked at while the loop runs
    trainer, started, release = _waiting_trainer(tmp_path / "a")
    _once_it_exists(started, lambda: (seen.setdefault("plain", signal.getsignal(signal.SIGINT)), release.touch()))
    trainer.fit()
    assert seen["plain"] is not default and "sigint_handler" in getattr(seen["plain"], "__name__", "")
    signal.signal(signal.SIGINT, default)

    # with it: the handler stays ours and Ctrl-C raises KeyboardInterrupt here within seconds
    trainer, started, release = _waiting_trainer(tmp_path / "b")

    def ctrl_c():
        seen["fixed"] = signal.getsignal(signal.SIGINT)
        seen["sent"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    _once_it_exists(started, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_interruptibly(trainer)
        assert started.exists() and seen["fixed"] is default  # sent while the loop ran
        assert time.monotonic() - seen["sent"] < 5
        # the abandoned run ends by itself (its loop is released) before the next test
        release.touch()
        for thread in threading.enumerate():
            if thread.name == "ray-train-fit":
                thread.join(timeout=60)
                assert not thread.is_alive(), "the abandoned fit did not end"
    finally:
        signal.signal(signal.SIGINT, inherited)


def _footer_readers() -> int:
    from ray._private.state import actors

    return sum(a["ActorClassName"] == "FooterReader" for a in actors().values())


def test_read_parquet_sized_starts_one_footer_reader_for_one_file_not_32(ray_local, tmp_path):
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.upstream import FOOTER_ACTORS_ENV, read_parquet_sized

    # Ray 2.60: the indexer of every parquet read starts 32 FooterReader actors, whatever the
    # files (BENCHMARKS.md measured it: 32 actors for one file); when it starts fewer, drop the
    # workaround. (Asked of a new indexer in a clean process: running Ray's read would start the 32
    # processes.)
    probe = ("from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer; "
             "print(FooterFileIndexer(ignore_missing_paths=False)._num_actors)")
    env = {k: v for k, v in os.environ.items() if k != FOOTER_ACTORS_ENV}
    ray_default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert ray_default.stdout.split()[-1] == "32"
    path = str(tmp_path / "one.parquet")
    pq.write_table(pa.table({"x": list(range(5))}), path)
    before = _footer_readers()
    assert len(read_parquet_sized([path], num_cpus=0).take_all()) == 5
    assert _footer_readers() - before == 1
    assert FOOTER_ACTORS_ENV not in os.environ  # set for the call only
    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer

    assert footer_file_indexer._DEFAULT_NUM_ACTORS == 32  # and Ray's default left as it was
