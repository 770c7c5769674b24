"""What one command hands every stage it runs: the spec, its storage and its run layout, built
once (docs/architecture.md "Stages").

    >>> ctx = RunContext.build(spec, force=False)
    >>> ctx.layout.manifest                       # 's3://sphinx-x/runs/local/shards/_manifest.json'
    >>> ctx.storage.exists(ctx.layout.manifest)
    >>> ctx.option("export_from")                 # a stage's own command-line value, or None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cluster.connect import storage_for
from cluster.layout import Layout
from cluster.spec import ClusterSpec
from cluster.storage import Storage


@dataclass(frozen=True)
class RunContext:
    """``force``: redo stages whose outputs are complete. ``options``: the values of a stage's own
    command-line arguments (``Stage.add_arguments``), by destination name."""

    spec: ClusterSpec
    storage: Storage
    layout: Layout
    force: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: ClusterSpec, *, force: bool = False, options: Mapping[str, Any] | None = None) -> "RunContext":
        storage = storage_for(spec)
        return cls(spec=spec, storage=storage, layout=Layout.from_spec(spec, storage.uri), force=force,
                   options=dict(options or {}))

    def option(self, name: str) -> Any:
        """A stage option's value; ``None`` when the command did not declare it (e.g. under `run`)."""
        return self.options.get(name)
