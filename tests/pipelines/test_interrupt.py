"""Ctrl-C (and SIGTERM) stop every long verb within seconds, at any stage, leaving no process.

Each verb runs as a user runs it: the console script in a child of its own process group, with
SIGINT at its default disposition, outside the test session's shared Ray and S3 (its own Ray,
its own embedded S3). The signal goes to the whole process group, as a terminal sends it. The
test records every descendant of the command (Ray's head processes and agents, Ray workers,
vLLM engine processes, the embedded S3 server) before the signal, and checks that none is left
once the command has exited.
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
import yaml

VENV_BIN = Path(sys.executable).parent
STOP_WITHIN_S = 30


class Command:
    """A sphinx-x command in its own process group; its terminal output is collected live."""

    def __init__(self, args: list[str], cwd: Path, env_extra: dict | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SPHINX_X_S3"))}
        env.update({"SPHINX_X_HOME": str(cwd / "home"), "PYTHONUNBUFFERED": "1", **(env_extra or {})})
        self.proc = subprocess.Popen([str(VENV_BIN / "sphinx-x"), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
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
            self._kill_all(before)
            pytest.fail(f"{' '.join(self.proc.args)} still running {STOP_WITHIN_S} s after {sig.name}:\n"
                        + "\n".join(self.lines[-30:]))
        took = time.monotonic() - t0
        deadline = time.monotonic() + 10  # processes that are exiting get a moment
        while True:
            left = [p for p in before if _alive(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        names = [f"{p.pid} {_cmd(p)}" for p in left]
        self._kill_all(left)
        return took, names

    @staticmethod
    def _kill_all(procs: list[psutil.Process]) -> None:
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def _spec(tmp_path: Path, **sections) -> Path:
    data = {"name": "ctrlc", "storage": {"uri": str(tmp_path / "store"), "endpoint_url": None},
            "cluster": {"head": {"cpus": 4}}, **sections}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def _no_shared_ray():
    """These commands start their own Ray: the session's shared one is stopped first (its CPUs)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_while_it_trains(tmp_path):
    cmd = Command(["demo", "--quick", "--samples", "40", "4", "--run-dir", str(tmp_path / "run")], tmp_path)
    cmd.wait_for("[demo] train + export ...", timeout_s=400)
    time.sleep(15)  # inside Ray Train's fit: the workers run steps
    took, left = cmd.interrupt(signal.SIGINT)
    assert cmd.proc.returncode != 0 and took < STOP_WITHIN_S
    assert not left, f"left running after Ctrl-C: {left}"
    assert "interrupted" in "\n".join(cmd.lines)


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_that_keeps_serving(tmp_path):
    cmd = Command(["demo", "--quick", "--samples", "40", "4", "--steps", "10", "--keep-serving", "--run-dir",
                   str(tmp_path / "run")], tmp_path)
    cmd.wait_for("Ctrl-C stops", timeout_s=600)
    report = "\n".join(cmd.lines)
    assert "web page    http://" in report  # the address is shown while the page is served
    took, left = cmd.interrupt(signal.SIGINT)
    assert took < STOP_WITHIN_S and not left, f"left running after Ctrl-C: {left}"


@pytest.mark.slow
def test_ctrl_c_stops_run_in_any_stage(tmp_path):
    from pipelines.demo import synthetic

    synthetic.write(synthetic.generate(40, 0, 0), tmp_path / "store" / "data")
    spec = _spec(tmp_path, data={"sources": [{"name": "synthetic", "path": "data/train.jsonl", "image_root": "data",
                                              "dedup": "off"}]},
                 train={"workers": 2, "steps": 400, "micro_batch": 2, "packing": False})  # 40 rows: one sample each
    cmd = Command(["run", str(spec), "--stages", "preprocess,train"], tmp_path)
    cmd.wait_for_log("train: running", timeout_s=400)
    time.sleep(20)  # Ray Train's workers are up and stepping
    took, left = cmd.interrupt(signal.SIGINT)
    assert took < STOP_WITHIN_S and not left, f"left running after Ctrl-C: {left}"


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_serve(tmp_path):
    """SIGTERM to the whole group (a service manager's stop) reaches Ray's own processes too: the
    command must not hang on a dead Serve, and no vLLM engine of a killed replica may survive it
    (cluster.reaper adopts and stops them)."""
    spec = _spec(tmp_path, serve={"http": {"port": _free_port()},
                                  "models": [{"name": "m", "flavour": "debug", "cpu_kv_cache_gb": 0.25,
                                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]})
    cmd = Command(["serve", str(spec)], tmp_path)
    cmd.wait_for("Ctrl-C to stop", timeout_s=400)
    assert any("VLLM" in _cmd(p) for p in cmd.descendants()), "no vLLM engine process to check"
    took, left = cmd.interrupt(signal.SIGTERM)
    assert took < STOP_WITHIN_S and not left, f"left running after SIGTERM: {left}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
