"""Placement on worker groups (docs/architecture.md "Placement"): one fraction, one capacity.

Every node of worker group ``gpu`` declares the custom resource ``sphinx_group_gpu`` with
:data:`GROUP_CAPACITY` units (rendered manifests, the launcher config, a local head standing in
for every group); work placed on that group asks for :data:`PLACEMENT_FRACTION` of one, so the
resource only steers work to the group and never limits how much of it fits there.

    >>> placement(spec, "gpu")           # {'sphinx_group_gpu': 0.001}
    >>> placement(spec, None)            # {} — not placed
"""

from __future__ import annotations

from typing import Optional

from cluster.spec import ClusterSpec, WorkerGroup

GROUP_CAPACITY = 1000.0
PLACEMENT_FRACTION = 0.001


def group_resources(spec: ClusterSpec) -> dict[str, float]:
    """The custom resources of a node standing in for every worker group (a local head)."""
    return {g.placement_resource: GROUP_CAPACITY for g in spec.cluster.worker_groups}


def node_resources(group: WorkerGroup) -> dict[str, float]:
    """Custom resources one node of ``group`` declares: its placement resource + the spec's."""
    return {group.placement_resource: GROUP_CAPACITY, **group.resources}


def placement(spec: ClusterSpec, group_name: Optional[str]) -> dict[str, float]:
    """What work placed on ``group_name`` asks for: ``{}`` when the work is not placed."""
    group = spec.cluster.group(group_name)
    return {group.placement_resource: PLACEMENT_FRACTION} if group else {}
