"""cluster.runtime: `sphinx-x up / down / status`, and cluster.connect joining the `up` head.

The up head runs without its dashboard here (the slowest part to start); the CLI `up` verb
is exercised on an already-up state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster import runtime
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    monkeypatch.setenv("SPHINX_X_HOME", str(directory))
    return directory


def _gone(pids) -> list[int]:
    """PIDs still alive (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_status_and_down_when_nothing_is_up(home, capsys):
    assert main(["status"]) == 1
    assert "nothing is up" in capsys.readouterr().out
    assert main(["down"]) == 0
    assert "nothing is up" in capsys.readouterr().out


def test_down_never_kills_what_it_did_not_start(home):
    # a stale state whose PIDs now belong to someone else (PID reuse): this very process
    # and a sleeper in its own process group, both with a different start time
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        home.mkdir(parents=True)
        state = {"ray": {"pid": os.getpid(), "pgid": os.getpgid(0), "create_time": 1.0, "gcs_address": "x:1"},
                 "s3": {"pid": sleeper.pid, "pgid": sleeper.pid, "create_time": 1.0, "endpoint_url": "http://x"}}
        (home / runtime.STATE_FILE).write_text(json.dumps(state))
        assert runtime.up_state(alive_only=True) is None
        assert runtime.stop()["stopped_pids"] == []
        assert sleeper.poll() is None and not (home / runtime.STATE_FILE).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


_PROBE = """
import json, os, ray
from cluster.connect import connect, storage_for
from cluster.spec import parse_spec
spec = parse_spec({"storage": {"uri": "s3://probe-bucket/x", "endpoint_url": "embedded"}})
connect(spec)
env = ray.get(ray.remote(lambda: os.environ.get("SPHINX_X_S3_ENDPOINT")).remote())
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "worker_s3": env,
                  "driver_s3": storage_for(spec).endpoint_url}))
ray.shutdown()
"""


def test_up_then_connect_reuses_it_then_down_leaves_nothing(home, ray_local, capsys):
    # the session's own Ray (its GCS and raylet), which `down` must leave alone
    other = {p.pid for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")}
    assert len(other) == 2
    try:
        state = runtime.start(dashboard=False, num_cpus=2)
        assert (home / runtime.STATE_FILE).exists()
        members = {p.pid for c in ("ray", "s3") for p in runtime._members(state[c])}
        assert state["ray"]["pid"] in members and state["s3"]["pid"] in members
        assert not members & other

        assert main(["up"]) == 0 and "already up" in capsys.readouterr().out
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "ray head  alive" in out and "s3 server alive" in out

        # a fresh driver (no endpoint in its env) finds both through the state file
        env = {k: v for k, v in os.environ.items() if k not in ("SPHINX_X_S3_ENDPOINT", "RAY_ADDRESS")}
        probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=180)
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert seen["gcs"].rsplit(":", 1)[1] == state["ray"]["gcs_address"].rsplit(":", 1)[1]
        assert seen["worker_s3"] == seen["driver_s3"] == state["s3"]["endpoint_url"]
        members |= {p.pid for c in ("ray", "s3") for p in runtime._members(state[c])}
    finally:
        assert main(["down"]) == 0
    assert "stopped" in capsys.readouterr().out
    deadline = time.monotonic() + 10
    while _gone(members) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(members) == []
    assert not (home / runtime.STATE_FILE).exists()
    assert not Path(state["ray"]["temp_dir"]).exists()
    # the Ray this process started itself is untouched
    assert set(_gone(other)) == other
    assert ray_local.get(ray_local.remote(lambda: 41 + 1).remote()) == 42
