"""Ray Jobs on a running cluster: submit a stage, stream its logs, wait, status, stop.

A thin layer over ``ray.job_submission.JobSubmissionClient`` (the dashboard's HTTP API,
``http://HEAD:8265``) that turns its failures into one-line :class:`UserError` s, and
``command(args)`` for ``sphinx-x jobs list|status|logs|stop [JOB] [--address URL]``.

What a submission carries (``runtime_env``), and what it does not:

- ``working_dir``: a copy of the project (``.venv``, ``.git``, ``runs``, caches excluded)
  with the spec written into it as ``job-spec.yaml``, so the job reads the same spec and runs
  the same code wherever the user's file lives.
- ``pip`` (only with ``cluster.dependencies: runtime_env``, a stock Ray cluster): the exact pins
  of ``cluster/requirements.txt`` (:func:`cluster.pins.job_pip`). Ray installs them into a
  virtualenv cloned from the node's Ray environment, once per node, and reuses it for every
  later job with the same list (the runtime env is cached by content). With
  ``dependencies: image`` (the default) the nodes run this project's image, which has them.
- ``env_vars``: ``cluster.connect.worker_env`` — endpoint, region, checksum settings. Never a
  credential value: credentials come from the cluster's environment.

    >>> client = connect("http://127.0.0.1:8265")                      # doctest: +SKIP
    >>> job_id = submit(client, entrypoint="python -m pipelines.cli run job-spec.yaml ...",
    ...                 spec=spec)                                     # doctest: +SKIP
    >>> follow(client, job_id).status                                  # doctest: +SKIP
    'SUCCEEDED'
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

from cluster import pins
from cluster.layout import JOB_SPEC_NAME as JOB_SPEC
from cluster.spec import ClusterSpec, dump_spec, load_spec
from models.errors import UserError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never shipped with a job: environments, VCS, outputs, caches, weights and data.
EXCLUDES = [".venv", "venv", ".git", "runs", ".sphinx-x", "tmp", "build", "dist", "node_modules",
            "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info",
            "*.pyc", "*.safetensors", "*.parquet", "*.pt", "*.bin"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# How long Ray may take to build a job's runtime env (Ray's own default is 600 s): the first job on
# a GPU node of a stock cluster downloads the CUDA torch build and the rest of the pins.
SETUP_TIMEOUT_S = 1800
# A head right after `ray start` answers "500: No available agent to submit job, please try again
# later" while its job agent starts: submission is retried that long, every few seconds.
AGENT_WAIT_S = 60.0
AGENT_POLL_S = 2.0
_NO_AGENT = "no available agent to submit job"
_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")


@dataclass
class JobResult:
    job_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


# ---------------------------------------------------------------- address and client


def resolve_address(address: Optional[str], spec: Optional[ClusterSpec] = None) -> str:
    """``address``, else ``$RAY_ADDRESS`` (when it is an http URL), else the spec's http address."""
    if address is not None:
        if not address.startswith(("http://", "https://")):
            raise UserError(f"--address must be the Ray Jobs (dashboard) URL like http://HEAD:8265, got {address!r}")
        return address.rstrip("/")
    for value in (os.environ.get("RAY_ADDRESS", ""), spec.cluster.address if spec is not None else ""):
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    raise UserError("no Ray Jobs address: pass --address http://HEAD:8265, set RAY_ADDRESS, "
                    "or give a --spec whose cluster.address is an http URL")


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``; UserError when the dashboard is not reachable."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, ValueError (bad URL), ...
        if _needs_token(err):
            raise UserError(f"the Ray Jobs API at {address} needs an auth token (Ray 2.60 heads turn token "
                            "auth on): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the head's token file> "
                            "(or RAY_AUTH_TOKEN=<token>); a `sphinx-x up` head prints both. "
                            f"({_one_line(err)})") from None
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {_one_line(err)}") from None


def _needs_token(err: BaseException) -> bool:
    """Whether the SDK's error is the head refusing us for want of a token.

    "401" must stand alone (a status code), not inside a port: a closed dashboard on port 40197 said
    "Failed to connect to Ray at address: http://127.0.0.1:40197" and was taken for an auth refusal.
    """
    text = str(err).lower()
    return bool(re.search(r"(?<![\d.:])401(?!\d)", text)) or any(
        k in text for k in ("unauthorized", "unauthenticated", "auth token", "authentication"))


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as err:  # the SDK raises RuntimeError("Request failed with status code 404: ...")
        text = str(err)
        if "404" in text or "does not exist" in text:
            raise UserError(f"{what}: no such job ({_one_line(err)})") from None
        raise UserError(f"{what}: {_one_line(err)}") from None


# ---------------------------------------------------------------- submission


def stage_working_dir(spec: ClusterSpec, dest: Path) -> Path:
    """Copy the project into ``dest`` (without :data:`EXCLUDES`) and write the spec beside it.

    Before: the user's spec anywhere on disk. After: ``dest/job-spec.yaml`` + ``dest/cluster/``,
    ``dest/pipelines/``, ... — the directory Ray zips and unpacks as the job's working dir.
    """
    shutil.copytree(PROJECT_ROOT, dest, ignore=shutil.ignore_patterns(*EXCLUDES), dirs_exist_ok=True)
    (dest / JOB_SPEC).write_text(dump_spec(spec))
    return dest


def worker_env(spec: ClusterSpec) -> dict[str, str]:
    """The job's environment: ``cluster.connect.worker_env`` — no secret values.

    For the embedded server this finds (or starts) the server to learn its endpoint; for any
    other endpoint nothing is contacted from here.
    """
    from cluster.connect import storage_for
    from cluster.connect import worker_env as env_for

    section = spec.storage
    if section.is_s3 and section.endpoint_url == "embedded":
        return env_for(section, storage_for(spec).endpoint_url)
    return env_for(section)


def runtime_env(working_dir: Path, env_vars: dict[str, str], *, pip: Optional[dict] = None) -> dict:
    """The submission's runtime_env: the staged project, the worker env, and ``pip`` if given."""
    env: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": dict(env_vars)}
    if pip is not None:
        env["pip"] = pip
        env["config"] = {"setup_timeout_seconds": SETUP_TIMEOUT_S}
    return env


def job_pip(spec: ClusterSpec) -> Optional[dict]:
    """What a job must install: the pins on a stock cluster, nothing when the image has them."""
    return pins.job_pip() if spec.cluster.dependencies == "runtime_env" else None


def check_ray_version(client, spec: ClusterSpec) -> Optional[str]:
    """The cluster's Ray version; UserError when jobs would bring their pins to another Ray.

    A runtime env cannot replace the Ray a node runs (Ray refuses a pip list that changes it),
    so a stock cluster must run the pinned Ray. With the image, a mismatch is only logged: the
    image decides.
    """
    theirs = getattr(client, "_server_ray_version", None)
    ours = pins.ray_version()
    if not theirs or theirs == ours:
        return theirs
    if spec.cluster.dependencies == "runtime_env":
        raise UserError(f"the cluster runs Ray {theirs}, but sphinx-x's jobs bring their dependencies for Ray "
                        f"{ours} (cluster/requirements.txt): start the cluster with ray[default]=={ours}, or "
                        "run this project's image and set cluster.dependencies: image")
    log.warning("the cluster runs Ray %s; sphinx-x pins Ray %s (its image is built on it)", theirs, ours)
    return theirs


def submit(client, *, entrypoint: str, spec: ClusterSpec, metadata: Optional[dict[str, str]] = None,
           env_vars: Optional[dict[str, str]] = None) -> str:
    """Submit ``entrypoint`` with the project + spec as working dir; returns the submission id."""
    env = worker_env(spec) if env_vars is None else env_vars
    with tempfile.TemporaryDirectory(prefix="sphinx-x-job-") as tmp:
        work = stage_working_dir(spec, Path(tmp) / "project")
        job_id = _submit_waiting_for_agent(client, entrypoint=entrypoint,
                                           runtime_env=runtime_env(work, env, pip=job_pip(spec)),
                                           metadata={"sphinx-x": spec.name, **(metadata or {})})
    log.info("submitted %s: %s", job_id, entrypoint)
    return job_id


def _submit_waiting_for_agent(client, **kwargs) -> str:
    """``client.submit_job(**kwargs)``, retried for up to :data:`AGENT_WAIT_S` while the head
    answers "No available agent to submit job" (its job agent is still starting); any other
    failure, or the agent still missing after that, is one UserError line."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**kwargs)
        except Exception as err:  # noqa: BLE001 - the SDK raises RuntimeError("Request failed with status code 500: ...")
            if _NO_AGENT not in str(err).lower():
                return _call("submit", _reraise, err)
            if time.monotonic() + AGENT_POLL_S > deadline:
                raise UserError(f"submit: the head's job agent did not start within {AGENT_WAIT_S:.0f}s "
                                f"({_one_line(err)}); check the head's dashboard_agent.log") from None
            log.info("the head's job agent is not up yet; retrying the submission in %.0fs", AGENT_POLL_S)
            time.sleep(AGENT_POLL_S)


def _reraise(err: BaseException):
    raise err


# ---------------------------------------------------------------- watching


def status(client, job_id: str) -> JobResult:
    info = _call(f"job {job_id}", client.get_job_info, job_id)
    return JobResult(job_id, str(getattr(info.status, "value", info.status)), info.message or "")


def stream_logs(client, job_id: str, out: Optional[TextIO] = None) -> None:
    """Copy the job's log lines to ``out`` (stdout) until the job ends (websocket tail, polling fallback)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # e.g. a proxy that drops websockets: poll the full log instead
        log.debug("log tail failed (%s); polling", _one_line(err))
        seen = 0
        while True:
            done = status(client, job_id).status in TERMINAL
            text = _call(f"job {job_id}", client.get_job_logs, job_id)
            out.write(text[seen:])
            out.flush()
            seen = len(text)
            if done:
                return
            time.sleep(1)


def wait_started(client, job_id: str, *, timeout_s: Optional[float] = None, poll_s: float = 0.5,
                 on_wait=None) -> tuple[JobResult, float]:
    """Block while the job is PENDING (Ray builds its runtime env then); (status, seconds waited).

    ``on_wait(seconds)`` is called once when the wait passes 5 s, so a caller can say why.
    """
    started = time.monotonic()
    told = False
    while True:
        result = status(client, job_id)
        waited = time.monotonic() - started
        if result.status != "PENDING":
            return result, waited
        if on_wait is not None and not told and waited > 5:
            on_wait(waited)
            told = True
        if timeout_s is not None and waited > timeout_s:
            raise UserError(f"job {job_id} still PENDING after {timeout_s:.0f}s (its runtime env is not ready)")
        time.sleep(poll_s)


def wait(client, job_id: str, *, timeout_s: Optional[float] = None, poll_s: float = 0.5) -> JobResult:
    """Block until the job reaches a terminal state; UserError on timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        result = status(client, job_id)
        if result.status in TERMINAL:
            return result
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"job {job_id} still {result.status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow(client, job_id: str, *, out: Optional[TextIO] = None, timeout_s: Optional[float] = None) -> JobResult:
    """Stream the logs, then wait for the terminal status."""
    stream_logs(client, job_id, out)
    return wait(client, job_id, timeout_s=timeout_s)


def stop(client, job_id: str) -> bool:
    return bool(_call(f"job {job_id}", client.stop_job, job_id))


def error_summary(result: JobResult, limit_lines: int = 30, logs: str = "") -> str:
    """The job's failure message, trimmed to its last lines (where the exception is).

    A ``ModuleNotFoundError`` in the message (Ray puts the log's tail there) or in ``logs`` gets a
    first line naming the module and the setting that fixes it: a stock Ray head lacks the
    project's dependencies unless jobs bring them (``cluster.dependencies: runtime_env``)."""
    lines = [ln for ln in (result.message or "").splitlines() if ln.strip()]
    text = "\n".join(lines[-limit_lines:]) or f"job ended {result.status}"
    found = _MISSING_MODULE.findall(f"{result.message or ''}\n{logs}")
    if found:
        module = found[-1]
        text = (f"the job's Python has no module {module!r}: the cluster's nodes lack sphinx-x's dependencies. "
                "On a stock Ray cluster set `cluster.dependencies: runtime_env` in the spec (each job then "
                "installs cluster/requirements.txt), or run the nodes on this project's image "
                f"(`cluster.dependencies: image`).\n{text}")
    return text


# ---------------------------------------------------------------- CLI: sphinx-x jobs


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec) if args.spec else None
    address = resolve_address(args.address, spec)
    client = connect(address)
    if args.action == "list":
        jobs = _call("list", client.list_jobs)
        jobs = sorted(jobs, key=lambda j: j.start_time or 0)
        print(f"{'SUBMISSION ID':<32} {'STATUS':<10} ENTRYPOINT")
        for job in jobs:
            state = str(getattr(job.status, "value", job.status))
            print(f"{job.submission_id or job.job_id or '-':<32} {state:<10} {job.entrypoint}")
        return 0
    if not args.job_id:
        raise UserError(f"`sphinx-x jobs {args.action}` needs a JOB id (see `sphinx-x jobs list`)")
    if args.action == "status":
        result = status(client, args.job_id)
        print(f"{result.job_id}: {result.status}")
        if result.message:
            print(result.message)
        return 0
    if args.action == "logs":
        if args.follow:
            stream_logs(client, args.job_id)
        else:
            sys.stdout.write(_call(f"job {args.job_id}", client.get_job_logs, args.job_id))
        return 0
    stopped = stop(client, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
