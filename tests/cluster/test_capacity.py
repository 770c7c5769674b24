"""cluster.capacity: a stage's demand as data, checked against the cluster with the numbers."""

from __future__ import annotations

import pytest

from cluster.capacity import Demand, Work, check_capacity, groups_for, shortfall
from cluster.spec import parse_spec
from models.errors import UserError


def _train_like(workers: int, gpu: bool = False, group: str | None = None) -> Demand:
    per = {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}
    return Demand("train", (Work("train workers", workers, per, group=group, uses_gpu=gpu),
                            Work("data readers", workers, {"CPU": 0.25}, group=group, uses_gpu=gpu)))


def test_demand_sums_its_work_and_says_how():
    d = _train_like(2)
    assert d.total() == {"CPU": 2.5}
    assert d.how() == "2 train workers x 1 CPU + 2 data readers x 0.25 CPU"
    assert shortfall(parse_spec({}), d, {"CPU": 2.0}) == {"CPU": (2.5, 2.0)}
    assert shortfall(parse_spec({}), d, {"CPU": 4.0}) == {}


def test_a_stage_that_cannot_fit_fails_at_once_with_the_numbers(ray_local, make_spec):
    total = ray_local.cluster_resources()["CPU"]
    spec = make_spec()
    with pytest.raises(UserError) as err:
        check_capacity(spec, _train_like(int(total)))  # the workers alone take every CPU: no room for readers
    text = str(err.value)
    assert text.startswith("train: the cluster cannot hold this stage")
    assert f"CPU: needs {total + total * 0.25:g}, the cluster has {total:g}" in text
    assert "cluster.head.cpus" in text
    check_capacity(spec, _train_like(2))  # fits: no error
    with pytest.raises(UserError, match="GPU: needs 1"):
        check_capacity(spec, _train_like(1, gpu=True))


def test_capacity_on_a_growable_cluster_counts_what_the_groups_can_grow_to(ray_local, make_spec):
    spec = make_spec(cluster={"address": "ray://head:10001",
                              "worker_groups": [{"name": "gpu", "cpus": 8, "gpus": 8, "max_workers": 2}]})
    check_capacity(spec, _train_like(16, gpu=True))  # 16 GPUs within 2 x 8: the autoscaler adds them
    with pytest.raises(UserError, match="GPU: needs 17"):
        check_capacity(spec, _train_like(17, gpu=True))


def test_groups_follow_placement_then_the_kind_of_work():
    spec = parse_spec({"cluster": {"worker_groups": [{"name": "cpu-a"}, {"name": "big-gpu", "gpus": 8},
                                                     {"name": "cpu-b"}]}})
    assert [g.name for g in groups_for(spec, _train_like(2, gpu=True))] == ["big-gpu"]
    assert [g.name for g in groups_for(spec, _train_like(2))] == ["cpu-a", "cpu-b"]
    assert [g.name for g in groups_for(spec, _train_like(2, group="cpu-b"))] == ["cpu-b"]
    head_only = Demand("s", (Work("ingress", 1, {"CPU": 0.25}, reserve_only=True),))
    assert groups_for(spec, head_only) == []
