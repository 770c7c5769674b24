"""Shared fixtures: ONE embedded S3 server and ONE local Ray per test session.

- ``s3``: moto's S3 server on 127.0.0.1 (cluster.storage.EmbeddedS3); its URL is exported
  as ``SPHINX_X_S3_ENDPOINT`` so every spec with ``endpoint_url: embedded`` finds it.
- ``ray_local`` (``ray_module`` for module-scoped fixtures): a local Ray started once (4 logical CPUs on the 2-core machine so that
  2 train workers, Data tasks and Serve replicas can coexist). Tests that need a
  different cluster (``ray.cluster_utils.Cluster``) call ``ray.shutdown()`` and the next
  ``ray_local`` user starts the shared one again.
- ``make_spec``: a spec on the embedded S3 with a unique prefix per test (and, when it serves, a
  free HTTP port, not the spec's default 8000: a developer's own `sphinx-x serve` may hold it).
"""

from __future__ import annotations

import os
import uuid

import pytest

from cluster.ports import free_port

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

TEST_BUCKET = "sphinx-x-test"

# The modules that take longest (seconds of their tests under `make test`'s two workers on the 2-core
# box, 2026-12-07, BENCHMARKS.md "make test from a fresh clone"), longest first: under pytest-xdist's
# loadfile (`make test`) they are handed out first, so that the last modules to run are short ones.
HEAVY_FIRST = (
    "tests/pipelines/stages/test_train.py",  # 696
    "tests/pipelines/stages/test_serve.py",  # 393
    "tests/pipelines/test_run.py",  # 354
    "tests/pipelines/demo/test_demo.py",  # 261
    "tests/pipelines/test_interrupt.py",  # 241
    "tests/docker/test_install.py",  # 195
    "tests/pipelines/test_run_bare_head.py",  # 186
    "tests/actors/eval/test_batch_engine.py",  # 181
    "tests/pipelines/stages/test_preprocess.py",  # 162
    "tests/actors/serve/vllm/test_vllm_model.py",  # 137
    "tests/pipelines/stages/test_preprocess_layouts.py",  # 122
    "tests/pipelines/stages/test_curate.py",  # 111
    "tests/actors/train/test_train_worker.py",  # 82
    "tests/pipelines/test_convert.py",  # 71
    "tests/pipelines/test_upstream_driver.py",  # 60
    "tests/pipelines/stages/test_preprocess_hostile.py",  # 58
    "tests/actors/train/test_loop_equivalence.py",  # 41
)


def pytest_collection_modifyitems(config, items):
    """Heaviest modules first (HEAVY_FIRST), the rest in collection order; a module's tests keep
    their order."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(scope="session")
def s3():
    from cluster.storage import EmbeddedS3

    server = EmbeddedS3()
    server.start()
    old = os.environ.get("SPHINX_X_S3_ENDPOINT")
    os.environ["SPHINX_X_S3_ENDPOINT"] = server.endpoint_url
    try:
        yield server
    finally:
        server.stop()
        if old is None:
            os.environ.pop("SPHINX_X_S3_ENDPOINT", None)
        else:
            os.environ["SPHINX_X_S3_ENDPOINT"] = old


def _shared_ray(s3):
    import ray

    from cluster.connect import PRIVATE_LOCAL_ENV
    from cluster.storage import embedded_worker_env

    if not ray.is_initialized():
        ray.init(
            address="local",  # a new one: a bare ray.init() joins any Ray on the machine
            num_cpus=4,
            # Ray Train v2's placement-group cleaner asks the state API (served by the
            # dashboard) whether the controller lives; without it, an unanswered query was
            # read as "dead" and a healthy run lost its workers.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {**embedded_worker_env(s3.endpoint_url), **PRIVATE_LOCAL_ENV}},
        )
    return ray


@pytest.fixture
def ray_local(s3):
    """The session's local Ray, (re)started on demand."""
    yield _shared_ray(s3)


@pytest.fixture(scope="module")
def ray_module(s3):
    """The same shared Ray, for module-scoped fixtures (a served app shared by a module's tests)."""
    yield _shared_ray(s3)


def pytest_collection_finish(session):
    """The slow pip installs some tests check start now, beside the first tests (tests/early.py)."""
    import early

    # under pytest-xdist every worker collects every test but runs only some: the tests that need
    # a job start it themselves (their worker's other modules run beside it)
    if not session.config.option.collectonly and not os.environ.get("PYTEST_XDIST_WORKER"):
        early.start(session.items)


def pytest_sessionfinish(session, exitstatus):
    import early

    early.stop()
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


@pytest.fixture
def make_spec(s3, tmp_path):
    """Build a ClusterSpec on the embedded S3 under a unique prefix; kwargs are sections."""
    from cluster.spec import parse_spec

    def _make(**sections):
        data = {"name": "test", "storage": {"uri": f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:10]}",
                                            "endpoint_url": "embedded"}}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        if isinstance(data.get("serve"), dict) and "http" not in data["serve"]:
            data["serve"] = {**data["serve"], "http": {"port": free_port()}}  # not 8000
        return parse_spec(data, "test-spec")

    return _make
