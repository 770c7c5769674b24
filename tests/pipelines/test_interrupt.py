"""Ctrl-C (and SIGTERM) stop every long verb within seconds, at any stage, leaving no process.

Each verb runs as a user runs it: the console script in a child of its own process group, with
SIGINT at its default disposition, outside the test session's shared Ray and S3 (its own Ray,
its own embedded S3). The signal goes to the whole process group, as a terminal sends it. The
test records every descendant of the command (Ray's head processes and agents, Ray workers,
vLLM engine processes, the embedded S3 server) before the signal, and checks that none is left
once the command has exited (tests/cli_command.py). `demo --keep-serving` is stopped this way at
the end of the demo's own end-to-end test (tests/pipelines/demo/test_demo.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from cli_command import STOP_WITHIN_S, Command, cmdline

from cluster.ports import free_port


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
    cmd.wait_for("steps  loss", timeout_s=400)  # the first step's progress line: inside Ray Train's fit
    took, left = cmd.interrupt(signal.SIGINT)
    assert cmd.proc.returncode != 0 and took < STOP_WITHIN_S
    assert not left, f"left running after Ctrl-C: {left}"
    assert "interrupted" in "\n".join(cmd.lines)


@pytest.mark.slow
def test_ctrl_c_stops_run_in_any_stage(tmp_path):
    from pipelines.demo import synthetic

    synthetic.write(synthetic.generate(40, 0, 0), tmp_path / "store" / "data")
    spec = _spec(tmp_path, data={"sources": [{"name": "synthetic", "path": "data/train.jsonl", "image_root": "data",
                                              "dedup": "off"}]},
                 train={"workers": 2, "steps": 400, "micro_batch": 2, "packing": False})  # 40 rows: one sample each
    cmd = Command(["run", str(spec), "--stages", "preprocess,train"], tmp_path)
    cmd.wait_for_log("train: running", timeout_s=400)
    cmd.wait_for("steps  loss", timeout_s=400)  # the first step's progress line: the workers are stepping
    took, left = cmd.interrupt(signal.SIGINT)
    assert took < STOP_WITHIN_S and not left, f"left running after Ctrl-C: {left}"


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_serve(tmp_path):
    """SIGTERM to the whole group (a service manager's stop) reaches Ray's own processes too: the
    command must not hang on a dead Serve, and no vLLM engine of a killed replica may survive it
    (cluster.reaper adopts and stops them)."""
    spec = _spec(tmp_path, serve={"http": {"port": free_port()},
                                  "models": [{"name": "m", "flavour": "debug", "cpu_kv_cache_gb": 0.25,
                                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]})
    cmd = Command(["serve", str(spec)], tmp_path)
    cmd.wait_for("Ctrl-C to stop", timeout_s=400)
    assert any("VLLM" in cmdline(p) for p in cmd.descendants()), "no vLLM engine process to check"
    took, left = cmd.interrupt(signal.SIGTERM)
    assert took < STOP_WITHIN_S and not left, f"left running after SIGTERM: {left}"
