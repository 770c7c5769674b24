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

    # with it: the handler stays ours, fit runs on this thread (no thread of ours is left inside
    # Ray when the caller's cleanup shuts Ray down) and Ctrl-C raises KeyboardInterrupt here within seconds
    from ray._private.state import actors

    trainer, started, release = _waiting_trainer(tmp_path / "b")

    def ctrl_c():
        seen["fixed"] = signal.getsignal(signal.SIGINT)
        seen["threads"] = {t.name for t in threading.enumerate()}
        seen["sent"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    _once_it_exists(started, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_interruptibly(trainer)
        assert started.exists() and seen["fixed"] is default  # sent while the loop ran
        assert time.monotonic() - seen["sent"] < 5
        assert not any("fit" in name for name in seen["threads"]), seen["threads"]
        # the abandoned run ends (its loop is released) and its worker is gone before the next test
        release.touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                a["ActorClassName"] == "RayTrainWorker" and a["State"] != "DEAD" for a in actors().values()):
            time.sleep(0.5)
        assert time.monotonic() < deadline, "the abandoned run did not end"
    finally:
        signal.signal(signal.SIGINT, inherited)


_STALL = """
import json, sys, threading
import pyarrow as pa, pyarrow.parquet as pq, ray, ray.data
from ray._private.state import actors
from pipelines.upstream import read_parquet_cpu_free

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
path = sys.argv[1]
pq.write_table(pa.table({"x": list(range(5))}), path)

class Pool:  # an actor pool as large as the cluster, as preprocess's tilers on a 2-CPU head
    def __call__(self, batch):
        return batch

def rows_within(read, seconds):
    ds = read([path], num_cpus=0).map_batches(Pool, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1,
                                              batch_format="pyarrow")
    got = []
    t = threading.Thread(target=lambda: got.append(len(ds.take_all())), daemon=True)
    t.start()
    t.join(seconds)
    return (got or [None])[0], "ListFiles" in ds._logical_plan.dag.dag_str

out = {"with": rows_within(read_parquet_cpu_free, 120),
       "footer_readers": sum(a["ActorClassName"] == "FooterReader" for a in actors().values()),
       "v2_after": ray.data.DataContext.get_current().use_datasource_v2}
out["without"] = rows_within(ray.data.read_parquet, 15)  # last: its pool keeps the CPUs
print(json.dumps(out), flush=True)
import os; os._exit(0)
"""


def test_read_parquet_cpu_free_reads_beside_an_actor_pool_that_holds_every_cpu(tmp_path):
    """Ray Data 2.60, a fresh 2-CPU Ray in a child process: a parquet read feeding an actor pool of
    both CPUs. Ray's default reader plans a ``ListFiles`` operator whose task waits for a CPU the pool
    never frees: no rows (when it reads, drop the workaround). The workaround's read has no such
    operator, starts no ``FooterReader`` actor and reads every row; Ray's flag is left as it was."""
    import json

    from child_python import last_line

    got = json.loads(last_line(_STALL, str(tmp_path / "one.parquet")))
    assert got["without"] == [None, True], f"Ray's own read no longer stalls: {got}"
    assert got["with"] == [5, False] and got["footer_readers"] == 0 and got["v2_after"] is True, got
