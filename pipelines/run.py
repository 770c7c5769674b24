"""`sphinx-x run SPEC [--stages preprocess,train,serve] [--address URL] [--force] [--detach]`.

Runs the spec's stages in pipeline order, each consuming what the previous one wrote to
storage: shards → checkpoints → exported model → endpoint.

- ``address`` ``local`` (or a ``ray://`` client address): in this process, through each
  stage's ``run(ctx)`` (:mod:`pipelines.stage`; one :class:`~cluster.run_context.RunContext`
  for the whole command); a stage whose outputs are complete (``is_complete(ctx)``) is skipped
  unless ``--force``. A service stage (serve) is then held until Ctrl-C unless ``--detach``.
  Inside a Ray Job this is what runs, on the cluster the job is on.
- ``address`` ``http://HEAD:8265`` (``--address`` or ``cluster.address``): each stage becomes a
  Ray Job (:mod:`cluster.jobs`): entrypoint ``python -m pipelines.cli run job-spec.yaml
  --stages X --address local``, the project + spec as working dir, storage env vars (no
  secrets) and, on a stock Ray cluster (``cluster.dependencies: runtime_env``), the pinned
  dependencies as the job's ``pip``: the first job on a node waits while Ray installs them
  (said here, with the time it took). Its logs are streamed here; the first failed job stops
  the run with the job's error (exit 1). The serve job deploys and returns; the app stays up
  on the cluster.

    $ sphinx-x run cluster/examples/local.yaml --stages preprocess,train
    $ sphinx-x run spec.yaml --address http://127.0.0.1:8265 --stages preprocess
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from typing import Iterator, Optional, TextIO

from cluster import jobs
from cluster.layout import JOB_SPEC_NAME
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec, load_spec
from models.errors import UserError
from pipelines import stages as registry
from pipelines.stage import entrypoint, short_summary

log = logging.getLogger(__name__)


class StageFailed(UserError):
    """A stage's Ray Job ended FAILED or STOPPED; the message carries the job's error."""

    def __init__(self, stage: str, result: jobs.JobResult):
        self.stage, self.result = stage, result
        super().__init__(f"stage {stage} failed (job {result.job_id} {result.status}):\n{jobs.error_summary(result)}")


# ---------------------------------------------------------------- in-process


@contextlib.contextmanager
def own_signals(stage: str) -> Iterator[None]:
    """Whatever signal handlers a stage installs (Ray Train installs a SIGINT handler that only
    "gracefully aborts the training run") end with the stage: Ctrl-C works again after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if signal.getsignal(sig) is not handler:
                log.debug("%s: restoring the %s handler it replaced", stage, sig.name)
                signal.signal(sig, handler)


def run_local(spec: ClusterSpec, stages: list[str], *, force: bool = False,
              ctx: Optional[RunContext] = None) -> dict[str, dict]:
    """Run ``stages`` here, in order; returns stage -> summary (``{"skipped": True}`` if complete)."""
    ctx = ctx or RunContext.build(spec, force=force)
    summaries: dict[str, dict] = {}
    for name in registry.ordered(stages):
        stage = registry.get(name)
        with own_signals(name):
            if not ctx.force and stage.is_complete(ctx):
                log.info("%s: outputs complete, skipped (--force to redo)", name)
                summaries[name] = {"skipped": True}
                continue
            started = time.monotonic()
            log.info("%s: running", name)
            summaries[name] = stage.run(ctx)
            log.info("%s: done in %.1fs", name, time.monotonic() - started)
    return summaries


# ---------------------------------------------------------------- as Ray Jobs


def run_jobs(spec: ClusterSpec, stages: list[str], address: str, *, force: bool = False,
             out: Optional[TextIO] = None, timeout_s: Optional[float] = None) -> dict[str, jobs.JobResult]:
    """Submit each stage as a Ray Job at ``address``, stream its logs, stop at the first failure."""
    out = out or sys.stdout
    client = jobs.connect(address)
    jobs.check_ray_version(client, spec)
    env = jobs.worker_env(spec)
    shipped = jobs.job_pip(spec) is not None
    results: dict[str, jobs.JobResult] = {}
    for stage in registry.ordered(stages):
        job_id = jobs.submit(client, entrypoint=entrypoint(registry.get(stage), JOB_SPEC_NAME, force=force), spec=spec,
                             metadata={"stage": stage}, env_vars=env)
        print(f"[sphinx-x] {stage}: submitted job {job_id} to {address}", file=out, flush=True)

        def waiting(_s: float, stage: str = stage) -> None:
            why = ("Ray installs the pinned dependencies of cluster/requirements.txt, once per node (minutes)"
                   if shipped else "the working dir upload, or resources")
            print(f"[sphinx-x] {stage}: waiting for the job's runtime environment: {why}", file=out, flush=True)

        try:
            started, waited = jobs.wait_started(client, job_id, on_wait=waiting)
            if waited > 5:
                print(f"[sphinx-x] {stage}: job {job_id} {started.status} after {waited:.0f}s", file=out, flush=True)
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


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    address = args.address or spec.cluster.address
    stages = registry.ordered(list(args.stages))
    if address.startswith(("http://", "https://")):
        # a stage the spec gives nothing to do (curate without curate:, eval without benchmarks) is
        # not worth a Ray Job (a runtime env, a driver) that would only find it complete
        run_jobs(spec, [s for s in stages if registry.get(s).used(spec)], address, force=args.force)
        return 0
    ctx = RunContext.build(spec, force=args.force, options={"detach": args.detach})
    summaries = run_local(spec, stages, ctx=ctx)
    for stage, summary in summaries.items():
        print(f"{stage}: {short_summary(summary)}", flush=True)
    for stage in stages:  # a service stage is held until Ctrl-C, unless --detach
        if registry.get(stage).service and not args.detach:
            registry.get(stage).report(ctx, summaries[stage])
    return 0
