"""Say so when a stage is stuck waiting for resources, instead of hanging in silence.

    >>> with stall_watch("train"):       # a thread polls Ray's state API every few seconds
    ...     trainer.fit()                # after ~45 s of work pending on resources, a WARNING:
    # train: 2 actor(s) waiting for resources for 45 s (each wants {'CPU': 0.25}); the cluster has
    #   CPU 2/2 in use (total 2) — it may never start: free resources or ask for less

``cluster.connect.check_capacity`` refuses what can never fit before a stage starts; this
catches the rest (other work holding the resources, a node that never joins). It only reads
Ray's state; it never stops the stage.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator, Optional

log = logging.getLogger(__name__)

PENDING_ACTOR = "PENDING_CREATION"
PENDING_TASK = "PENDING_NODE_ASSIGNMENT"
JOIN_S = 15.0


def pending_work() -> list[dict]:
    """Actors and tasks Ray cannot place yet: ``[{"kind", "name", "wants"}]`` (wants: resources)."""
    import ray
    from ray.util.state import list_actors, list_tasks

    address = ray.get_runtime_context().gcs_address  # this process's Ray, never another on the machine
    found = []
    for a in list_actors(address=address, filters=[("state", "=", PENDING_ACTOR)], detail=True,
                         raise_on_missing_output=False, timeout=5):
        found.append({"kind": "actor", "name": a.class_name, "wants": dict(a.required_resources or {})})
    for t in list_tasks(address=address, filters=[("state", "=", PENDING_TASK)], detail=True,
                        raise_on_missing_output=False, timeout=5):
        if not t.func_or_class_name.endswith(".__init__"):  # an actor's creation: counted as the actor
            found.append({"kind": "task", "name": t.func_or_class_name, "wants": dict(t.required_resources or {})})
    return found


def describe(stage: str, pending: list[dict], waited_s: float) -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    wants = {}
    for p in pending:
        wants.setdefault(str(sorted(p["wants"].items())), p["wants"])
    kinds = ", ".join(f"{sum(1 for p in pending if p['kind'] == k)} {k}(s)" for k in ("actor", "task")
                      if any(p["kind"] == k for p in pending))
    usage = ", ".join(f"{k} {total[k] - free.get(k, 0):g}/{total[k]:g} in use" for k in sorted(total)
                      if k in ("CPU", "GPU") or any(k in w for w in wants.values()))
    return (f"{stage}: {kinds} waiting for resources for {waited_s:.0f} s (wanting "
            f"{' or '.join(str(w) for w in wants.values())}); the cluster has {usage} — it may never "
            "start: free resources, add nodes, or ask for less")


@contextlib.contextmanager
def stall_watch(stage: str, *, after_s: float = 45.0, every_s: float = 5.0) -> Iterator[None]:
    """Warn (once per stall, again every ``after_s``) while the stage's work waits on resources."""
    stop = threading.Event()

    def watch() -> None:
        since: Optional[float] = None
        warned = 0.0
        while not stop.wait(every_s):
            try:
                pending = pending_work()
            except Exception:  # noqa: BLE001 - no state API (no dashboard): nothing to say
                log.debug("stall watch: state API unavailable", exc_info=True)
                return
            now = time.monotonic()
            if not pending:
                since = None
                continue
            since = since or now
            if now - since >= after_s and now - warned >= after_s:
                warned = now
                log.warning(describe(stage, pending, now - since))

    thread = threading.Thread(target=watch, name=f"stall-watch-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # no call into Ray may still be running when the caller goes on to ``ray.shutdown``: a
        # thread inside Ray's core worker then ends the process (pipelines.upstream.fit_interruptibly);
        # the state API calls time out after 5 s each
        thread.join(timeout=JOIN_S)
