"""`sphinx-x run SPEC [--stages preprocess,train,serve] [--address URL] [--force] [--detach]`.

Runs the spec's stages in pipeline order, each consuming what the previous one wrote to
storage: shards → checkpoints → exported model → endpoint.

- ``address`` ``local`` (or a ``ray://`` client address): in this process, through each
  stage's ``run_stage(spec, force=...)``; a stage whose outputs are complete
  (``is_complete(spec)``) is skipped unless ``--force``. Inside a Ray Job this is what runs,
  on the cluster the job is on.
- ``address`` ``http://HEAD:8265`` (``--address`` or ``cluster.address``): each stage becomes a
  Ray Job (:mod:`cluster.jobs`): entrypoint ``python -m pipelines.cli run job-spec.yaml
  --stages X --address local``, the project + spec as working dir, storage env vars (no
  secrets). Its logs are streamed here; the first failed job stops the run with the job's
  error (exit 1). The serve job deploys and returns; the app stays up on the cluster.

    $ sphinx-x run cluster/examples/local.yaml --stages preprocess,train
    $ sphinx-x run spec.yaml --address http://127.0.0.1:8265 --stages preprocess
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from typing import Optional, TextIO

from cluster import jobs
from cluster.spec import ClusterSpec, load_spec
from models.errors import UserError

log = logging.getLogger(__name__)

STAGES = ("preprocess", "train", "serve")


class StageFailed(UserError):
    """A stage's Ray Job ended FAILED or STOPPED; the message carries the job's error."""

    def __init__(self, stage: str, result: jobs.JobResult):
        self.stage, self.result = stage, result
        super().__init__(f"stage {stage} failed (job {result.job_id} {result.status}):\n{jobs.error_summary(result)}")


def ordered(stages: list[str]) -> list[str]:
    """Pipeline order, whatever order the user typed: ``["train", "preprocess"]`` → preprocess, train."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def _stage_module(stage: str):
    return importlib.import_module(f"pipelines.{stage}")


# ---------------------------------------------------------------- in-process


def join_job_cluster() -> bool:
    """Inside a Ray Job's entrypoint, connect to the cluster the job runs on (``$RAY_ADDRESS``).

    Stages then find Ray initialized and use it instead of starting a private one. The job's
    ``runtime_env`` (storage env vars) applies to every task and actor it starts.
    """
    if not (os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS")):
        return False
    import ray

    if not ray.is_initialized():
        ray.init()
        log.info("joined the job's Ray cluster at %s", os.environ["RAY_ADDRESS"])
    return True


def run_local(spec: ClusterSpec, stages: list[str], *, force: bool = False) -> dict[str, dict]:
    """Run ``stages`` here, in order; returns stage -> summary (``{"skipped": True}`` if complete)."""
    summaries: dict[str, dict] = {}
    join_job_cluster()
    for stage in ordered(stages):
        module = _stage_module(stage)
        if not force and module.is_complete(spec):
            log.info("%s: outputs complete, skipped (--force to redo)", stage)
            summaries[stage] = {"skipped": True}
            continue
        started = time.monotonic()
        log.info("%s: running", stage)
        summaries[stage] = module.run_stage(spec, force=force)
        log.info("%s: done in %.1fs", stage, time.monotonic() - started)
    return summaries


# ---------------------------------------------------------------- as Ray Jobs


def stage_entrypoint(stage: str, *, force: bool = False) -> str:
    """The job's command: this same verb, in-process on the cluster, for one stage."""
    cmd = f"python -m pipelines.cli run {jobs.JOB_SPEC} --stages {stage} --address local"
    if force:
        cmd += " --force"
    if stage == "serve":
        cmd += " --detach"  # deploy and return: the Serve app outlives the job's driver
    return cmd


def run_jobs(spec: ClusterSpec, stages: list[str], address: str, *, force: bool = False,
             out: Optional[TextIO] = None, timeout_s: Optional[float] = None) -> dict[str, jobs.JobResult]:
    """Submit each stage as a Ray Job at ``address``, stream its logs, stop at the first failure."""
    out = out or sys.stdout
    client = jobs.connect(address)
    env = jobs.worker_env(spec)
    results: dict[str, jobs.JobResult] = {}
    for stage in ordered(stages):
        job_id = jobs.submit(client, entrypoint=stage_entrypoint(stage, force=force), spec=spec,
                             metadata={"stage": stage}, env_vars=env)
        print(f"[sphinx-x] {stage}: submitted job {job_id} to {address}", file=out, flush=True)
        try:
            result = jobs.follow(client, job_id, out=out, timeout_s=timeout_s)
        except KeyboardInterrupt:
            jobs.stop(client, job_id)
            print(f"[sphinx-x] {stage}: stop requested for job {job_id}", file=out, flush=True)
            raise
        results[stage] = result
        print(f"[sphinx-x] {stage}: job {job_id} {result.status}", file=out, flush=True)
        if not result.ok:
            raise StageFailed(stage, result)
    return results


# ---------------------------------------------------------------- CLI


def _wait_for_interrupt(spec: ClusterSpec) -> None:
    http = spec.serve.http
    print(f"serving at http://{http.host}:{http.port}/v1 — Ctrl-C to stop", flush=True)
    while True:
        time.sleep(3600)


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    address = args.address or spec.cluster.address
    stages = ordered(list(args.stages))
    if address.startswith(("http://", "https://")):
        run_jobs(spec, stages, address, force=args.force)
        return 0
    summaries = run_local(spec, stages, force=args.force)
    for stage, summary in summaries.items():
        print(f"{stage}: {summary}")
    if "serve" in stages and not args.detach:
        _wait_for_interrupt(spec)
    return 0
