"""Slow, single-threaded preparations, started as soon as the suite is collected, one after the
other in a background thread, so that their pip installs use the core the tests leave idle.

Registered by the test modules that need them (at import, i.e. at collection):

- tests/docker/test_install.py: ``docker/install.sh`` into a fresh virtualenv, ~2 min of pip;
- tests/pipelines/test_run_bare_head.py: a virtualenv with only ``ray[default]`` at the pin,
  when the cached one is missing or stale (a fresh CI machine), ~75 s.

A job runs only when its test was collected (selected); the test asks ``early.result(name)``, which
waits for it, or runs it on the spot when nothing started it. Whatever still runs when the
session ends is stopped (tests/conftest.py calls ``start`` and ``stop``).

    early.register(early.Job("install", "tests/docker/test_install.py::test_install_script", run))
    rc, output = early.result("install")

Imported by tests as ``import early`` (``tests/`` is on the path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Job:
    """``run(popen)`` does the work, starting its processes with ``popen`` (a ``subprocess.Popen``
    that ``stop`` can kill), and returns (exit status, output)."""

    name: str
    test: str  # node id prefix of the test that needs it
    run: Callable[[Callable[..., subprocess.Popen]], tuple[int, str]]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Optional[tuple[int, str]] = None
    started: bool = False


_JOBS: dict[str, Job] = {}
_CURRENT: list[subprocess.Popen] = []
_STOPPING = threading.Event()


def register(job: Job) -> None:
    _JOBS.setdefault(job.name, job)


def start(items) -> None:
    """Run, in one background thread, every registered job whose test is among ``items``."""
    wanted = [j for j in _JOBS.values() if any(i.nodeid.startswith(j.test) for i in items)]
    for job in wanted:
        job.started = True
    if wanted:
        threading.Thread(target=_run_all, args=(wanted,), name="early", daemon=True).start()


def result(name: str, timeout_s: float = 900) -> tuple[int, str]:
    """(exit status, output) of job ``name``: waits for the background run, or runs it now."""
    job = _JOBS[name]
    if not job.started:
        job.started = True
        _run(job)
    if not job.done.wait(timeout_s):
        raise TimeoutError(f"early job {name!r} not done after {timeout_s:.0f} s")
    assert job.outcome is not None
    return job.outcome


def stop() -> None:
    """Stop what still runs (the session ends, e.g. early under -x)."""
    _STOPPING.set()
    for proc in list(_CURRENT):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _run_all(jobs: list[Job]) -> None:
    for job in jobs:
        _run(job)


def _run(job: Job) -> None:
    def popen(*args, **kwargs) -> subprocess.Popen:
        if _STOPPING.is_set():
            raise RuntimeError("the session is ending")
        proc = subprocess.Popen(*args, start_new_session=True, **kwargs)
        _CURRENT.append(proc)
        return proc

    try:
        job.outcome = job.run(popen)
    except BaseException as exc:  # the test reports it
        job.outcome = (-1, f"{type(exc).__name__}: {exc}")
    finally:
        job.done.set()


def run_command(popen, argv, **kwargs) -> tuple[int, str]:
    """One command through ``popen``: (exit status, its stdout and stderr together)."""
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    out, _ = proc.communicate()
    return proc.returncode, out
