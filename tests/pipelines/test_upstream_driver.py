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


def _sleepy_trainer(tmp_path, seconds: float):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import time

        time.sleep(config["s"])

    return TorchTrainer(loop, train_loop_config={"s": seconds}, scaling_config=ScalingConfig(num_workers=1),
                        run_config=RunConfig(name="sleepy", storage_path=str(tmp_path)))


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

    def look(key: str, after: float) -> threading.Timer:
        timer = threading.Timer(after, lambda: seen.setdefault(key, signal.getsignal(signal.SIGINT)))
        timer.start()
        return timer

    # without it: fit on the main thread swaps in Ray Train's SIGINT handler, which only asks for
    # a graceful abort and lets fit return (a second Ctrl-C is ignored)
    look("plain", 8.0)
    _sleepy_trainer(tmp_path / "a", 12).fit()
    assert seen["plain"] is not default and "sigint_handler" in getattr(seen["plain"], "__name__", "")
    signal.signal(signal.SIGINT, default)

    # with it: the handler stays ours and Ctrl-C raises KeyboardInterrupt here within seconds
    look("fixed", 8.0)
    threading.Timer(10.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_interruptibly(_sleepy_trainer(tmp_path / "b", 20))
        assert seen["fixed"] is default
        assert time.monotonic() - t0 < 15
        time.sleep(12)  # the abandoned run ends by itself (its loop sleeps 20 s) before the next test
    finally:
        signal.signal(signal.SIGINT, inherited)
