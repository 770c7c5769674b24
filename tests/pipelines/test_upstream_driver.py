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
