"""A long command leaves no process behind, however it is stopped (docs/architecture.md "Connecting").

A command that runs its own Ray (a private local head, the embedded S3 server, Serve replicas
with their vLLM engine processes) owns a tree of processes. Ctrl-C reaches the whole tree (the
terminal signals the process group) but Ray's processes block SIGINT and the command stops them
in order. A SIGTERM sent to the whole group (``kill -- -PGID``, a service manager) kills Ray's
head and workers at once instead: their children are orphaned (a vLLM engine core whose replica
died keeps running, re-parented to init) and the command's own clean-up talks to a dead cluster.

So a long command:

1. :func:`adopt_orphans` at start: on Linux it becomes a *child subreaper*
   (``prctl(PR_SET_CHILD_SUBREAPER)``), so its orphaned descendants are re-parented to it, not
   to init, and stay findable;
2. :func:`reap` at exit: stops Ray (``ray.shutdown``, bounded: a dead head must not hang the
   exit), then terminates every descendant still alive, SIGKILL after ``grace_s``.

Only the command's own descendants are touched: a shared head (`sphinx-x up`, a remote cluster)
is not a child of the command, and neither are its workers.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
RAY_SHUTDOWN_WAIT_S = 10.0


def adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def bounded(fn, timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread, waiting at most ``timeout_s``: False if it is still running
    then (it is left behind); its exception, if it raised one in time, is raised here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            errors.append(err)

    worker = threading.Thread(target=target, daemon=True, name="bounded")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return False
    if errors:
        raise errors[0]
    return True


def stop_ray(timeout_s: float = RAY_SHUTDOWN_WAIT_S) -> None:
    """``ray.shutdown()`` if this process runs Ray, without waiting more than ``timeout_s``."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        finished = bounded(ray.shutdown, timeout_s)
    except Exception:  # noqa: BLE001 - a dead cluster may raise anything here; we stop it anyway
        log.debug("while stopping Ray", exc_info=True)
        finished = True
    if not finished:
        log.warning("Ray did not shut down within %.0f s (its processes were already stopping); "
                    "stopping what is left of them", timeout_s)


def reap(grace_s: float = 5.0) -> list[int]:
    """Stop Ray, then terminate this process's live descendants (SIGKILL after ``grace_s``).

    Returns the PIDs that had to be signalled (logged; an empty list after a clean shutdown).
    """
    import psutil

    stop_ray()
    try:
        left = [p for p in psutil.Process().children(recursive=True) if _alive(p)]
    except psutil.Error:
        return []
    if not left:
        return []
    log.info("stopping %d leftover process(es): %s", len(left), ", ".join(f"{p.pid} {_name(p)}" for p in left))
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in left]


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(p) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001
        return "?"
