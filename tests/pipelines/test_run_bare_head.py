"""`sphinx-x run --address` against a stock Ray head: the jobs bring the project and its pins.

The head runs from a virtualenv of its own that holds only ``ray[default]`` at the pinned version
(no torch, no sphinx-x). The spec says ``cluster.dependencies: runtime_env``, so each job's
runtime_env carries the project (working dir) and ``cluster/requirements.txt`` (pip). One
``sphinx-x run`` submits preprocess then a short train stage: the first job waits while Ray builds
the environment, the second reuses it (cached by content). Status and logs come back through
``sphinx-x jobs``.

Cost on the 2-core CI machine (measured): the head's virtualenv ~75 s the first time (kept, keyed
by the Ray pin, under ``$SPHINX_X_TEST_CACHE`` or ``~/.cache/sphinx-x/tests``; built beside the
first tests, tests/early.py); the runtime env
install 66-140 s (printed: 140 s with a cold pip cache, DeepSpeed built from its sdist; ~70 s once
pip's cache holds the wheels; 73 s with PIP_NO_COMPILE, 96 s compiling .pyc files); the two stages
~80 s. The whole test: 2.5-5 min, plus 3-4 min to delete the head's temp dir (the runtime env's
virtualenv) inline: a detached ``rm`` does that now (tests/remove_later.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import pins
from cluster.ports import free_port
from cluster.spec import dump_spec
from pipelines.cli import main
import early
from remove_later import remove_without_waiting

pytestmark = pytest.mark.slow


def _cache_dir() -> Path:
    return Path(os.environ.get("SPHINX_X_TEST_CACHE", Path.home() / ".cache" / "sphinx-x" / "tests"))


def _bare_env() -> dict[str, str]:
    """This process's environment without the project's virtualenv in it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS")}
    ours = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != ours)
    return env


def _bare_venv_path() -> Path:
    return _cache_dir() / f"bare-ray-{pins.ray_version()}"


def _build_bare_venv(popen) -> tuple[int, str]:
    """A virtualenv with only ``ray[default]==<pin>``, unless the cached one is that already: started
    when the suite is collected (tests/early.py), its pip beside the other tests."""
    venv = _bare_venv_path()
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import ray, importlib.util as u; "
             "assert ray.__version__ == %r and not u.find_spec('torch') and not u.find_spec('cluster')"
             % pins.ray_version()]
    if python.exists() and early.run_command(popen, probe, cwd="/", env=_bare_env())[0] == 0:
        return 0, "cached"
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    out = ""
    for argv in ([base, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", f"ray[default]=={pins.ray_version()}"], probe):
        rc, more = early.run_command(popen, argv, cwd="/", env=_bare_env())
        out += more
        if rc:
            return rc, out
    return 0, out


early.register(early.Job("bare-ray", f"tests/pipelines/{Path(__file__).name}::", _build_bare_venv))


@pytest.fixture(scope="module")
def bare_venv() -> Path:
    """A virtualenv with only ``ray[default]==<pin>`` (built once, then reused)."""
    rc, out = early.result("bare-ray", timeout_s=600)
    assert rc == 0, out[-3000:]
    return _bare_venv_path()


@pytest.fixture(scope="module")
def bare_head(bare_venv, s3):
    """`ray start --head --block` from the bare virtualenv, in its own process group and temp dir."""
    from ray.job_submission import JobSubmissionClient

    dash, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")
    env = {**_bare_env(), "PATH": f"{bare_venv / 'bin'}{os.pathsep}{_bare_env()['PATH']}",
           "VIRTUAL_ENV": str(bare_venv), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           # the runtime env's pip (started by the head's agent, with its environment) writes no .pyc
           # files: the jobs' imports compile what they load; the pins are installed all the same
           "PIP_NO_COMPILE": "1"}
    cmd = [str(bare_venv / "bin" / "ray"), "start", "--head", "--block", "--num-cpus", "3",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed: {log_path.read_text()[-2000:]}")
                time.sleep(1)
        yield url, Path(temp_dir)
    finally:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        log.close()
        remove_without_waiting(Path(temp_dir))  # the jobs' runtime env: ~35k files, minutes to delete


def test_stock_head_runs_preprocess_and_train_with_shipped_dependencies(bare_venv, bare_head, make_spec,
                                                                        tmp_path, capsys):
    from pipelines.demo import synthetic
    from pipelines.stages import preprocess, train

    url, temp_dir = bare_head
    where = synthetic.write(synthetic.generate(6, 0, seed=5), tmp_path / "data")
    spec = make_spec(
        cluster={"dependencies": "runtime_env"},
        data={"sources": [{"name": "syn", "path": where["train"], "image_root": where["image_root"]}],
              "max_seq_len": 512, "concurrency": 1},
        train={"workers": 1, "steps": 2, "checkpoint_every": 2, "micro_batch": 2, "max_failures": 0,
               "packing": False},  # 6 rows: one sample per row
    )
    spec_file = tmp_path / "bare-spec.yaml"
    spec_file.write_text(dump_spec(spec))

    t0 = time.monotonic()
    assert main(["run", str(spec_file), "--address", url, "--stages", "preprocess,train"]) == 0, \
        capsys.readouterr().out[-4000:]
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    ids = dict(re.findall(r"\[sphinx-x\] (\w+): submitted job (\S+)", out))
    assert set(ids) == {"preprocess", "train"}
    for stage, job_id in ids.items():
        assert f"{stage}: job {job_id} SUCCEEDED" in out
    waits = {s: float(w) for s, w in re.findall(r"\[sphinx-x\] (\w+): job \S+ \w+ after (\d+)s", out)}
    install_s = waits.get("preprocess", 0.0)
    print(f"\nruntime env (cluster/requirements.txt on the bare head): {install_s:.0f}s; "
          f"train waited {waits.get('train', 0.0):.0f}s; whole run {took:.0f}s", file=sys.__stderr__)
    assert "installs the pinned dependencies" in out  # the user is told why the first job waits
    assert waits.get("train", 0.0) < 60, out[-3000:]  # the second job reuses the cached environment

    # the outputs are in storage, written by the jobs
    assert preprocess.is_complete(spec) and train.is_complete(spec)

    # the head's own environment still lacks torch and sphinx-x; the jobs' environment has the pins,
    # and its torch is the local CPU wheel this machine's pip config offers (not PyPI's CUDA build)
    probe = "import importlib.util as u; print(bool(u.find_spec('torch')), bool(u.find_spec('cluster')))"
    head_has = subprocess.run([str(bare_venv / "bin" / "python"), "-c", probe], cwd="/", capture_output=True,
                              text=True, env=_bare_env()).stdout.split()
    assert head_has == ["False", "False"]
    torch_infos = list(temp_dir.glob("session_latest/runtime_resources/pip/*/virtualenv/lib/python*/site-packages/"
                                     "torch-*.dist-info"))
    assert [p.name for p in torch_infos] == ["torch-2.13.0+cpu.dist-info"], torch_infos

    # status, logs and the list through `sphinx-x jobs`
    for stage, job_id in ids.items():
        assert main(["jobs", "status", job_id, "--address", url]) == 0
        assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
        assert main(["jobs", "logs", job_id, "--address", url]) == 0
        logs = capsys.readouterr().out
        assert f"--stages {stage} --address local" in logs and f"{stage}: done in" in logs, logs[-2000:]
    assert "train: step=2" in logs  # the job's own summary line
    assert main(["jobs", "list", "--address", url]) == 0
    listed = capsys.readouterr().out
    assert all(job_id in listed for job_id in ids.values())
