"""The one stage protocol (docs/architecture.md "Stages"): what every pipeline stage declares.

A stage is one object: its name (the verb and the ``--stages`` name), its command-line
arguments, what it asks of the cluster (:class:`cluster.capacity.Demand`), its outputs and
their "complete" test, and ``run(ctx)``. ``pipelines.stages`` lists them in pipeline order;
`sphinx-x run`, the per-stage verbs, Ray Jobs and the rendered manifests all go through that
list, so infrastructure (``cluster/``) only ever sees data: demands, worker groups and entry
points. Adding a stage is one module with a :class:`Stage` and one line in the registry.

    >>> from pipelines.stages import get
    >>> stage = get("train")
    >>> stage.demand(spec).how()               # '2 train workers x 1 CPU + 2 data readers x 0.25 CPU'
    >>> ctx = RunContext.build(spec)
    >>> stage.is_complete(ctx) or stage.run(ctx)
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Protocol

from cluster.capacity import Demand
from cluster.layout import Layout
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec


class Stage(Protocol):
    name: str
    help: str
    # import path of the long-running application this stage deploys (a RayService when rendered
    # for KubeRay; `run` holds it until Ctrl-C unless --detach); None for a batch stage (a RayJob)
    service: Optional[str]
    # the verb takes no SPEC when its own flags say everything (`eval --data ...`): one_off_spec
    spec_optional: bool

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The stage verb's own arguments (``SPEC`` and ``--force`` are added for every stage)."""

    def one_off_spec(self, args: argparse.Namespace) -> ClusterSpec:
        """The spec of the verb called without SPEC (only with ``spec_optional``)."""

    def used(self, spec: ClusterSpec) -> bool:
        """False when the spec gives the stage nothing to do (not rendered as a job then)."""

    def demand(self, spec: ClusterSpec) -> Demand:
        """Everything the stage holds on the cluster at once (capacity check, placement, RayJob groups)."""

    def outputs(self, layout: Layout) -> dict[str, str]:
        """What the stage writes, by name -> URI (empty for a stage whose output is not on storage)."""

    def is_complete(self, ctx: RunContext) -> bool:
        """True when the outputs are there and whole: `run` skips the stage unless ``--force``."""

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Do the stage's work; returns its summary (a plain dict, printed and kept by `run`)."""

    def report(self, ctx: RunContext, summary: dict[str, Any]) -> None:
        """What the stage's own verb prints after ``run``; a service stage holds it here until Ctrl-C
        (unless ``--detach``)."""


class StageBase:
    """The protocol's defaults: a batch stage (no service), a SPEC required, always used, the
    summary printed in one line. A stage overrides what it does differently."""

    service: Optional[str] = None
    spec_optional: bool = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        return None

    def one_off_spec(self, args: argparse.Namespace) -> ClusterSpec:
        raise NotImplementedError(f"{type(self).__name__} needs a SPEC")

    def used(self, spec: ClusterSpec) -> bool:
        return True

    def report(self, ctx: RunContext, summary: dict[str, Any]) -> None:
        print(short_summary(summary), flush=True)


def short_summary(summary: dict[str, Any]) -> str:
    keys = ("skipped", "rows_written", "rows_quarantined", "step", "loss", "export", "url", "models")
    return ", ".join(f"{k}={summary[k]}" for k in keys if k in summary) or str(summary)


def entrypoint(stage: Stage, spec_path: str, *, force: bool = False, python: str = "python") -> str:
    """The command that runs ONE stage on a cluster (a Ray Job, a RayJob pod): `run` in-process."""
    cmd = f"{python} -m pipelines.cli run {spec_path} --stages {stage.name} --address local"
    if force:
        cmd += " --force"
    if stage.service:
        cmd += " --detach"  # deploy and return: the app outlives the job's driver
    return cmd


def command(stage: Stage, args: argparse.Namespace) -> int:
    """A stage's own verb (`sphinx-x preprocess SPEC ...`): build the context once, run, report."""
    from cluster.spec import load_spec

    spec = load_spec(args.spec) if args.spec else stage.one_off_spec(args)  # no SPEC: spec_optional
    options = {k: v for k, v in vars(args).items() if k not in ("spec", "force", "verb", "target", "verbose", "stage")}
    ctx = RunContext.build(spec, force=bool(getattr(args, "force", False)), options=options)
    stage.report(ctx, stage.run(ctx))
    return 0
