"""What a stage asks of the cluster at once, and the check that it fits (docs/architecture.md
"Connecting").

A stage describes its demand as data (:class:`Demand`: kinds of :class:`Work`, each ``count``
units of ``per_unit`` resources on a worker group); this module never knows which stage it is.
The same demand answers three questions: does it fit now (:func:`check_capacity`), what does the
sum look like in an error (:meth:`Demand.how`), and which worker groups must a cluster bring up
for it (:func:`groups_for`, used by the rendered RayJobs and RayService).

    >>> d = Demand("train", (Work("train workers", 2, {"CPU": 1.0}),
    ...                      Work("data readers", 2, {"CPU": 0.25}, reserve_only=False)))
    >>> d.total()
    {'CPU': 2.5}
    >>> d.how()
    '2 train workers x 1 CPU + 2 data readers x 0.25 CPU'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from cluster.placement import node_resources
from cluster.spec import ClusterSpec, WorkerGroup
from models.errors import UserError


@dataclass(frozen=True)
class Work:
    """``count`` units of one kind of work, each holding ``per_unit`` resources at once.

    ``per_unit`` is what Ray is asked for (CPU, GPU, custom resources, the placement resource of
    ``group`` included). ``group`` is the worker group the work is placed on (``None``: any group
    of its kind: GPU work the GPU groups, other work the CPU-only groups). ``reserve_only``: the
    work does not need a group of its own to be brought up (it runs wherever Ray finds room, the
    head included), so it counts for capacity but not for :func:`groups_for`.
    """

    what: str
    count: int
    per_unit: Mapping[str, float]
    group: Optional[str] = None
    uses_gpu: bool = False
    reserve_only: bool = False

    def total(self) -> dict[str, float]:
        return {k: v * self.count for k, v in self.per_unit.items() if v}

    def how(self) -> str:
        gpu = self.per_unit.get("GPU", 0.0)
        return (f"{self.count} {self.what} x {self.per_unit.get('CPU', 0.0):g} CPU"
                + (f" x {gpu:g} GPU" if gpu else ""))


@dataclass(frozen=True)
class Demand:
    """Everything a stage holds at once: its :class:`Work` kinds (``stage`` names it in messages)."""

    stage: str
    work: tuple[Work, ...] = field(default_factory=tuple)

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in self.work:
            for k, v in w.total().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def how(self) -> str:
        return " + ".join(w.how() for w in self.work)


def spec_capacity(spec: ClusterSpec) -> dict[str, float]:
    """What the spec's cluster can grow to: the head plus every group at ``max_workers``."""
    c = spec.cluster
    total = {"CPU": float(c.head.cpus), "GPU": float(c.head.gpus), **c.head.resources}
    for g in c.worker_groups:
        for k, v in {"CPU": g.cpus, "GPU": g.gpus, **node_resources(g)}.items():
            total[k] = total.get(k, 0.0) + v * g.max_workers
    return total


def shortfall(spec: ClusterSpec, demand: Demand, have: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Resource -> (needed, available) for every resource the demand lacks.

    On a local Ray the cluster is what it is (``have``). On a cluster whose worker groups can
    grow, the bound is what the spec lets them grow to (the autoscaler adds the rest).
    """
    growable = spec.cluster.address != "local" and spec.cluster.worker_groups
    bound = {k: max(have.get(k, 0.0), v) for k, v in spec_capacity(spec).items()} if growable else dict(have)
    return {k: (v, bound.get(k, 0.0)) for k, v in demand.total().items() if v > bound.get(k, 0.0) + 1e-9}


def check_capacity(spec: ClusterSpec, demand: Demand) -> None:
    """Fail at once, naming the numbers, when ``demand`` cannot fit on the connected Ray."""
    import ray

    short = shortfall(spec, demand, {k: float(v) for k, v in ray.cluster_resources().items()})
    if short:
        lacking = ", ".join(f"{k}: needs {need:g}, the cluster has {got:g}" for k, (need, got) in sorted(short.items()))
        hint = (" Raise cluster.head.cpus (logical CPUs of the local Ray) or ask for less."
                if spec.cluster.address == "local" else " Add nodes to the spec's worker groups or ask for less.")
        raise UserError(f"{demand.stage}: the cluster cannot hold this stage ({demand.how()}) — {lacking}.{hint}")


def groups_for(spec: ClusterSpec, demand: Demand) -> list[WorkerGroup]:
    """The worker groups ``demand``'s work can land on, in spec order: what its cluster brings up.

    Work placed on a group needs that group. Unplaced work needs the groups whose kind fits it:
    GPU work the groups with GPUs, other work the CPU-only groups; a spec without groups of that
    kind falls back to every group. The head is always there.
    """
    groups = spec.cluster.worker_groups
    gpu = [g for g in groups if g.gpus]
    cpu_only = [g for g in groups if not g.gpus]
    names: set[str] = set()
    for w in demand.work:
        if w.reserve_only:
            continue
        chosen = [spec.cluster.group(w.group)] if w.group is not None else ((gpu if w.uses_gpu else cpu_only) or groups)
        names.update(g.name for g in chosen)
    return [g for g in groups if g.name in names]
