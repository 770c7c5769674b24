"""pipelines.stages / pipelines.stage: one registry, pipeline order, entry points, each stage's
demand written once (the ScalingConfig and the capacity check read the same rule)."""

from __future__ import annotations

import argparse

import pytest

from cluster.spec import parse_spec
from models.errors import UserError
from pipelines import stages
from pipelines.stage import entrypoint


def test_registry_lists_every_stage_in_pipeline_order():
    assert stages.names() == ["curate", "preprocess", "train", "eval", "serve"]
    assert stages.ordered(["serve", "preprocess"]) == ["preprocess", "serve"]
    with pytest.raises(UserError, match="unknown stage"):
        stages.ordered(["tune"])
    with pytest.raises(UserError, match="stages are curate, preprocess, train, eval, serve"):
        stages.get("tune")


def test_entrypoints_run_one_stage_in_process_and_services_detach():
    assert entrypoint(stages.get("train"), "job-spec.yaml") == \
        "python -m pipelines.cli run job-spec.yaml --stages train --address local"
    assert entrypoint(stages.get("serve"), "s.yaml", force=True).endswith("--address local --force --detach")
    assert [p.service for p in stages.plans(parse_spec({}), "s.yaml")] == [None, None, "pipelines.stages.serve:build_app"]
    # a stage the spec gives nothing to do (eval without benchmarks) is not rendered as a job
    assert [p.name for p in stages.plans(parse_spec({}), "s.yaml")] == ["preprocess", "train", "serve"]


def test_every_stage_declares_the_protocol():
    for stage in stages.STAGES:
        for attr in ("name", "help", "service", "spec_optional", "add_arguments", "one_off_spec", "used", "demand",
                     "outputs", "is_complete", "run", "report"):
            assert hasattr(stage, attr), (stage.name, attr)
        parser = argparse.ArgumentParser()
        stage.add_arguments(parser)  # declares its own verb's arguments without error


def test_train_demand_counts_workers_and_their_readers():
    from actors.train.data import READER_CPUS

    demand = stages.get("train").demand(parse_spec({"train": {"workers": 2}}))
    assert demand.total() == {"CPU": 2 * 1.0 + 2 * READER_CPUS}
    assert demand.how() == f"2 train workers x 1 CPU + 2 data readers x {READER_CPUS:g} CPU"


def test_train_worker_resources_are_one_rule_for_scaling_and_demand():
    from pipelines.stages.train import scaling_config, worker_resources

    spec = parse_spec({"cluster": {"worker_groups": [{"name": "gpu", "gpus": 8}]},
                       "train": {"workers": 3, "use_gpu": True, "group": "gpu"}})
    per = worker_resources(spec)
    assert per["GPU"] == 1.0 and per["sphinx_group_gpu"] > 0
    assert scaling_config(spec).resources_per_worker == per
    (workers, _readers) = stages.get("train").demand(spec).work
    assert dict(workers.per_unit) == per and workers.count == 3


def test_serve_demand_counts_replicas_and_the_ingress():
    from pipelines.stages.serve import INGRESS_CPUS

    spec = parse_spec({"serve": {"models": [
        {"name": "a", "flavour": "debug", "autoscaling_config": {"min_replicas": 2, "max_replicas": 3},
         "ray_actor_options": {"num_cpus": 1}},
        {"name": "b", "flavour": "debug", "ray_actor_options": {"num_cpus": 2}}]}})
    demand = stages.get("serve").demand(spec)
    assert demand.total()["CPU"] == 2 * 1 + 1 * 2 + INGRESS_CPUS
    assert "2 replicas of a x 1 CPU" in demand.how() and "1 ingress" in demand.how()


def test_preprocess_demand_is_the_tiler_pool_on_its_group():
    spec = parse_spec({"cluster": {"worker_groups": [{"name": "cpu", "cpus": 8}]},
                       "data": {"concurrency": 3, "num_cpus_per_worker": 2, "group": "cpu"}})
    (work,) = stages.get("preprocess").demand(spec).work
    assert (work.count, work.per_unit["CPU"], work.group) == (3, 2, "cpu")
