"""The one way to connect (docs/architecture.md "Connecting"): Ray, storage, the worker
environment and placement, for every stage, `run` and the demo.

    >>> conn = connect(spec)           # Ray up (or joined), storage open, env for workers
    >>> conn.storage.uri               # 's3://sphinx-x/runs/local'
    >>> conn.env                       # {'AWS_REGION': ..., 'SPHINX_X_S3_ENDPOINT': ...}: no secrets

Where Ray comes from, first match wins:

1. this process already runs Ray (a test, the demo, an earlier stage): reuse it;
2. inside a Ray Job (``sphinx-x run --address``): join the job's cluster (its runtime_env already
   carries :func:`worker_env`);
3. ``$RAY_ADDRESS`` or a ``ray://`` ``cluster.address``: join it;
4. ``cluster.address: local``: the head `sphinx-x up` keeps alive, else a private local Ray with
   the resources the spec's head declares (``cluster.head.cpus/gpus``, one custom resource per
   worker group) — whichever command starts it.

Placement on worker groups is :mod:`cluster.placement`'s. An ``http://HEAD:8265`` address is not joined: stages run there as Ray Jobs (`sphinx-x run`).

The embedded S3 endpoint (``storage.endpoint_url: embedded``) is found in ``$SPHINX_X_S3_ENDPOINT``,
then in the `up` state, else a server is started for this process (objects vanish at exit).
Workers learn it from :func:`worker_env`, never by discovery.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

from cluster.embedded_s3 import CHECKSUM_ENV, DUMMY_CREDENTIALS, ENDPOINT_ENV, EmbeddedS3, embedded_worker_env
from cluster.placement import group_resources
from cluster.spec import ClusterSpec, StorageSection
from cluster.storage import Storage, open_storage
from models.errors import UserError

log = logging.getLogger(__name__)

_process_server: Optional[EmbeddedS3] = None
_lock = threading.Lock()


# ---------------------------------------------------------------- the worker environment


def worker_env(section: StorageSection, endpoint_url: Optional[str] = None) -> dict[str, str]:
    """The ONE environment every Ray worker, job and rendered pod gets to reach storage.

    Region; for any non-AWS endpoint the checksum settings (docs/architecture.md "Connecting") and the endpoint
    (``AWS_ENDPOINT_URL``); for the embedded server its URL and its dummy credentials. Never a
    real secret: those come from the nodes' own environment or instance role.
    """
    env = {"AWS_REGION": section.region, "AWS_DEFAULT_REGION": section.region}
    if section.is_s3 and section.endpoint_url == "embedded":
        env.update(CHECKSUM_ENV)
        if endpoint_url:
            env.update(embedded_worker_env(endpoint_url, section.region))
    elif section.is_s3 and section.endpoint_url:
        env.update(CHECKSUM_ENV)
        env["AWS_ENDPOINT_URL"] = section.endpoint_url
    return env


# ---------------------------------------------------------------- storage


def embedded_endpoint() -> str:
    """The embedded S3 endpoint for this process (see the module docstring); sets the env var."""
    global _process_server
    if os.environ.get(ENDPOINT_ENV):
        return os.environ[ENDPOINT_ENV].rstrip("/")
    from cluster.runtime import up_state

    state = up_state(alive_only=True)
    endpoint = (state or {}).get("s3", {}).get("endpoint_url")
    if not endpoint:
        with _lock:
            if _process_server is None:
                _process_server = EmbeddedS3().start()
                atexit.register(_process_server.stop)
                log.info("started an embedded S3 server for this process (%s); objects vanish at exit — "
                         "`sphinx-x up` keeps one alive", _process_server.endpoint_url)
            endpoint = _process_server.endpoint_url
    os.environ[ENDPOINT_ENV] = endpoint
    return endpoint


def storage_for(spec: ClusterSpec) -> Storage:
    """The spec's storage on the driver: the embedded endpoint found (or started), bucket checked."""
    if spec.storage.is_s3 and spec.storage.endpoint_url == "embedded":
        embedded_endpoint()
        for key, value in DUMMY_CREDENTIALS.items():
            os.environ.setdefault(key, value)
    return open_storage(spec.storage)


# ---------------------------------------------------------------- Ray


@dataclass(frozen=True)
class Connection:
    """What a stage needs from :func:`connect`: the storage, the worker env, where Ray is."""

    storage: Storage
    env: dict[str, str] = field(default_factory=dict)
    ray_address: str = ""


# What a private local Ray (one this process starts, on this machine only) sets in every worker:
# no node of it can be drained or preempted, so Ray Train's preemption watcher (one more actor
# process per run, ~3 CPU-s to start; ray/train/v2/_internal/execution/preemption.py) is off.
PRIVATE_LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"))


def connect(spec: ClusterSpec, *, ray: bool = True) -> Connection:
    """Storage, the worker env and (``ray=True``) a Ray connection, by the rules above."""
    storage = storage_for(spec)
    env = worker_env(spec.storage, storage.endpoint_url)
    address = _init_ray(spec, env) if ray else ""
    return Connection(storage=storage, env=env, ray_address=address)


def _init_ray(spec: ClusterSpec, env: dict[str, str]) -> str:
    address = _start_or_join(spec, env)
    from cluster.logs import after_ray_init

    after_ray_init()
    return address


def _start_or_join(spec: ClusterSpec, env: dict[str, str]) -> str:
    import ray

    if ray.is_initialized():
        return "this process's Ray"
    address = spec.cluster.address
    runtime_env = {"env_vars": env}
    if in_ray_job():
        ray.init()  # the job's runtime_env applies; passing one would replace it
        return os.environ["RAY_ADDRESS"]
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
        return os.environ["RAY_ADDRESS"]
    if address.startswith("ray://"):
        ray.init(address=address, runtime_env=runtime_env)
        return address
    if address != "local":
        raise UserError(f"cluster.address is {address}: stages run there as Ray Jobs; use "
                        f"`sphinx-x run SPEC` (or `--address {address}`), not a single stage command")
    from cluster.runtime import join_up_head, up_state

    state = up_state(alive_only=True)
    if state and "ray" in state:
        join_up_head(state, runtime_env)
        return state["ray"]["gcs_address"]
    head = spec.cluster.head
    ray.init(address="local", num_cpus=head.cpus, num_gpus=head.gpus,
             resources={**group_resources(spec), **head.resources} or None,
             include_dashboard=True, dashboard_host="127.0.0.1",  # the state API (stall reports)
             runtime_env={"env_vars": {**env, **PRIVATE_LOCAL_ENV}})
    return "a private local Ray"
