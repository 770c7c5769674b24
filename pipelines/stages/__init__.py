"""The stage registry: every pipeline stage, in pipeline order (docs/architecture.md "Stages").

Each entry is a :class:`pipelines.stage.Stage`; the CLI's stage verbs, `sphinx-x run`, Ray Jobs
and the rendered manifests all read this list. Adding a stage: one module here, one line below.

    >>> [s.name for s in STAGES]
    ['curate', 'preprocess', 'train', 'eval', 'serve']
    >>> ordered(["serve", "preprocess"])
    ['preprocess', 'serve']
"""

from __future__ import annotations

from cluster.render import StagePlan
from cluster.spec import ClusterSpec
from models.errors import UserError
from pipelines.stage import Stage, entrypoint
from pipelines.stages import curate, eval, preprocess, serve, train  # noqa: A004 - the stage module, not the builtin

STAGES: tuple[Stage, ...] = (curate.STAGE, preprocess.STAGE, train.STAGE, eval.STAGE, serve.STAGE)


def names() -> list[str]:
    return [s.name for s in STAGES]


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise UserError(f"unknown stage {name!r}; stages are {', '.join(names())}")


def ordered(stages: list[str]) -> list[str]:
    """Pipeline order, whatever order the user typed: ``["train", "preprocess"]`` -> preprocess, train."""
    unknown = [s for s in stages if s not in names()]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown}; stages are {', '.join(names())}")
    return [s for s in names() if s in stages]


def plans(spec: ClusterSpec, spec_path: str) -> list[StagePlan]:
    """What the cluster renderers get for every stage: its entry point, demand and service, as data."""
    return [StagePlan(name=s.name, entrypoint=entrypoint(s, spec_path), demand=s.demand(spec), service=s.service)
            for s in STAGES if s.used(spec)]  # eval: only with eval.benchmarks; curate: with curate.som/ocr
