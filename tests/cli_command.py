"""A sphinx-x console command run as a user runs it, for the tests that stop one (Ctrl-C, SIGTERM).

The command runs in a child of its own process group with SIGINT at its default disposition,
outside the test session's shared Ray and S3 (``RAY_ADDRESS`` / ``SPHINX_X_S3*`` removed: its
own Ray, its own embedded S3, its own ``SPHINX_X_HOME``). Its terminal output is collected live.
:meth:`Command.interrupt` signals the whole group, as a terminal does, and returns how long the
command took to exit and which of the processes it had started (Ray's head and agents, Ray
workers, vLLM engines, the embedded S3 server) are still alive.

Imported by tests as ``from cli_command import Command`` (``tests/`` is on the path: conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

VENV_BIN = Path(sys.executable).parent
STOP_WITHIN_S = 30


class Command:
    """A sphinx-x command in its own process group; its terminal output is collected live."""

    def __init__(self, args: list[str], cwd: Path, env_extra: dict | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SPHINX_X_S3"))}
        env.update({"SPHINX_X_HOME": str(cwd / "home"), "PYTHONUNBUFFERED": "1", **(env_extra or {})})
        self.proc = subprocess.Popen([str(VENV_BIN / "sphinx-x"), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=_default_sigint)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"{text!r} did not appear (rc {self.proc.poll()}):\n" + "\n".join(self.lines[-40:]))

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        """Wait for ``text`` in the command's log file (its path is the first line it prints)."""
        self.wait_for("log file:", timeout_s=60)
        path = Path(next(line for line in self.lines if "log file:" in line).split("log file:", 1)[1].strip())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        pytest.fail(f"{text!r} not in {path} (rc {self.proc.poll()}):\n" + "\n".join(self.lines[-40:]))

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def interrupt(self, sig: int = signal.SIGINT) -> tuple[float, list[str]]:
        """Signal the process group; (seconds until the command exited, processes still alive)."""
        before = self.descendants()
        assert before, "the command started no process (Ray, S3): nothing to check"
        t0 = time.monotonic()
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.kill_all(before)
            pytest.fail(f"{' '.join(self.proc.args)} still running {STOP_WITHIN_S} s after {sig.name}:\n"
                        + "\n".join(self.lines[-30:]))
        took = time.monotonic() - t0
        deadline = time.monotonic() + 10  # processes that are exiting get a moment
        while True:
            left = [p for p in before if alive(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        names = [f"{p.pid} {cmdline(p)}" for p in left]
        self.kill_all(left)
        return took, names

    @staticmethod
    def kill_all(procs: list[psutil.Process]) -> None:
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _default_sigint() -> None:
    """SIGINT at its default in the child, as a terminal's foreground job has it: a test session
    started in the background of a non-interactive shell ignores SIGINT, and exec keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"
