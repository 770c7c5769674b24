"""cluster.connect: the one worker environment, where Ray comes from, and the capacity check."""

from __future__ import annotations

import pytest

from cluster import connect
from cluster.placement import GROUP_CAPACITY, PLACEMENT_FRACTION, group_resources, placement
from cluster.spec import StorageSection, parse_spec
from models.errors import UserError


# ---------------------------------------------------------------- the worker environment


def test_worker_env_embedded_has_endpoint_and_dummy_credentials():
    env = connect.worker_env(StorageSection(uri="s3://bkt/p", endpoint_url="embedded"), "http://127.0.0.1:9")
    assert env["SPHINX_X_S3_ENDPOINT"] == "http://127.0.0.1:9" and env["AWS_ACCESS_KEY_ID"] == "testing"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_REQUIRED"
    assert "AWS_ENDPOINT_URL" not in env


def test_worker_env_custom_endpoint_sets_it_and_the_checksum_mode(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-xyz")
    env = connect.worker_env(StorageSection(uri="s3://bkt/p", endpoint_url="http://minio:9000", region="eu-west-1"))
    assert env == {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1",
                   "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
                   "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED"}


def test_worker_env_aws_is_region_only_and_never_a_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-xyz")
    env = connect.worker_env(StorageSection(uri="s3://bkt/p", endpoint_url=None, region="us-west-2"))
    assert env == {"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-west-2"}


def test_render_jobs_and_connect_share_the_one_env(make_spec, s3):
    from cluster import jobs, render

    spec = make_spec(storage={"endpoint_url": "http://minio:9000"})
    assert render.plain_env(spec) == jobs.worker_env(spec) == connect.worker_env(spec.storage)


def test_placement_is_one_fraction_of_one_capacity():
    spec = parse_spec({"cluster": {"worker_groups": [{"name": "gpu-a", "gpus": 1}]}})
    assert placement(spec, "gpu-a") == {"sphinx_group_gpu_a": PLACEMENT_FRACTION}
    assert placement(spec, None) == {}
    assert group_resources(spec) == {"sphinx_group_gpu_a": GROUP_CAPACITY}


# ---------------------------------------------------------------- where Ray comes from


class _FakeRay:
    """Records ray.init calls (the branch connect takes) without starting anything."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)


@pytest.fixture
def fake_ray(monkeypatch, tmp_path):
    import ray

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setenv("SPHINX_X_HOME", str(tmp_path / "run"))  # no `up` state
    for var in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    return fake


def test_http_address_is_not_joined_it_takes_ray_jobs(make_spec, fake_ray):
    with pytest.raises(UserError, match="Ray Jobs"):
        connect.connect(make_spec(cluster={"address": "http://head:8265"}))
    assert fake_ray.calls == []


def test_inside_a_job_joins_without_replacing_its_runtime_env(make_spec, fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    connect.connect(make_spec())
    assert fake_ray.calls == [{}]


def test_ray_address_is_joined_with_the_worker_env(make_spec, fake_ray, monkeypatch, s3):
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    connect.connect(make_spec())
    (call,) = fake_ray.calls
    assert call["address"] == "10.9.9.9:6379"
    assert call["runtime_env"]["env_vars"]["SPHINX_X_S3_ENDPOINT"] == s3.endpoint_url


def test_local_ray_gets_the_resources_the_spec_declares(make_spec, fake_ray, s3):
    spec = make_spec(cluster={"head": {"cpus": 3, "gpus": 0},
                              "worker_groups": [{"name": "gpu-a", "gpus": 1}]})
    conn = connect.connect(spec)
    (call,) = fake_ray.calls
    assert call["address"] == "local" and call["num_cpus"] == 3  # never someone else's Ray
    assert call["resources"] == {"sphinx_group_gpu_a": GROUP_CAPACITY}
    # the worker env, and Ray Train's preemption watcher off (nothing on one machine is preempted)
    assert call["runtime_env"]["env_vars"] == {**conn.env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert conn.env["SPHINX_X_S3_ENDPOINT"] == s3.endpoint_url


def test_reuses_an_initialized_ray(ray_local, make_spec):
    before = ray_local.get_runtime_context().gcs_address
    connect.connect(make_spec())
    assert ray_local.get_runtime_context().gcs_address == before
