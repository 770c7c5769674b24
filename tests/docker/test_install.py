"""The image's install lines work: docker/install.sh in a fresh virtualenv, as the Dockerfile runs it.

No container engine runs here, so the test runs the script the Dockerfile runs, on a copy of the
build context, into a new virtualenv:

- torch, every pin of cluster/requirements.txt and the project are installed for real. The torch
  line is the image's own (``torch==2.13.0``): on PyPI that is the CUDA build, here pip's
  find-links offer the local CPU wheel 2.13.0+cpu, which pip prefers — so CI never downloads CUDA
  torch and still runs the very line the image runs.
- vLLM (``SPHINX_X_VLLM=check``) is resolved, not installed: ``pip install --dry-run --report``
  against the installed environment, then docker/check_env.py fails if the plan would move a pin.
  Its CUDA dependencies are resolved from metadata; the CPU torch already satisfies its torch pin.
- then check_env.py: every pin holds, sphinx-x's requirements are met; the installed copy imports.

About two minutes of pip on the 2-core CI machine (pip's cache is shared with `make install`, so
DeepSpeed's sdist is built once), single-threaded: the install starts when the suite is collected
and runs beside the tests before this one (tests/early.py); the test checks its outcome.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster import pins

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "docker"))
import check_env  # noqa: E402  (docker/check_env.py: a script, not a package)
import early  # noqa: E402  (tests/early.py)
from remove_later import remove_without_waiting  # noqa: E402


def _build_context(dest: Path) -> Path:
    """The files `docker build .` would send: tracked and unignored ones, minus .dockerignore'd."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith((".venv/", ".git/", "runs/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _install_in_fresh_venv(popen) -> tuple[int, str]:
    """docker/install.sh on a copy of the build context into a new virtualenv (``_RUN`` keeps the
    paths): started when the suite is collected (tests/early.py), its pip beside the other tests."""
    root = Path(tempfile.mkdtemp(prefix="sphinx-x-install-"))
    context, venv = _build_context(root / "context"), root / "venv"
    _RUN.update(root=root, venv=venv)
    base = getattr(sys, "_base_executable", sys.executable)
    rc, out = early.run_command(popen, [base, "-m", "venv", str(venv)])
    if rc:
        return rc, out
    # pip's own cache (the one `make install` filled): DeepSpeed's wheel, built from its sdist once
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()),
           "PYTHON": str(venv / "bin" / "python"), "SPHINX_X_VLLM": "check",
           "PIP_CACHE_DIR": str(Path.home() / ".cache" / "pip")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") and k != "PIP_CACHE_DIR"})
    # no .pyc files at install (the image's build compiles them; nothing here checks them): the
    # step-5 imports compile only the modules they load
    env["PIP_NO_COMPILE"] = "1"
    return early.run_command(popen, ["bash", "docker/install.sh"], cwd=context, env=env)


_RUN: dict[str, Path] = {}
early.register(early.Job("install", f"tests/docker/{Path(__file__).name}::test_install_script", _install_in_fresh_venv))


@pytest.mark.slow
def test_install_script_builds_the_pinned_environment_in_a_fresh_virtualenv():
    rc, out = early.result("install", timeout_s=900)
    print("\n" + "\n".join(re.findall(r"\[install\.sh [\d:]+\] .*", out)), file=sys.__stderr__)  # where the time went
    assert rc == 0, out[-6000:]
    venv = _RUN["venv"]
    python = venv / "bin" / "python"
    assert "the plan" in out and out.count("keeps every pin") == 2, out[-3000:]
    assert re.search(rf"sphinx-x \S+ imports from {re.escape(str(venv))}/lib/python3\.\d+/site-packages/", out), out[-2000:]
    # the image's torch line took the local CPU wheel here (the image gets PyPI's CUDA build)
    version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, cwd=_RUN["root"]).stdout.strip()
    assert version == f"{pins.pinned_version('torch')}+cpu"
    # every step announced itself, in order (the image build log reads the same)
    steps = re.findall(r"\[install\.sh [\d:]+\] (\d)/5", out)
    assert steps == ["1", "2", "3", "4", "5"]
    remove_without_waiting(_RUN["root"])  # passed: ~2 GB that would otherwise stay in /tmp


def test_dockerfile_builds_on_the_pinned_ray_and_runs_the_install_script():
    text = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base == f"rayproject/ray:{pins.ray_version()}-py311-gpu"
    runs = re.findall(r"^RUN\s+(.+)$", text, flags=re.M)
    assert "bash docker/install.sh" in runs
    assert not any("pip install" in r for r in runs), "install lines belong in docker/install.sh (CI runs it)"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


# ---------------------------------------------------------------- check_env on its own


def test_a_plan_that_moves_a_pin_is_refused(tmp_path):
    report = tmp_path / "plan.json"
    report.write_text(json.dumps({"install": [
        {"metadata": {"name": "vllm", "version": "0.32.0"}, "requested": True},
        {"metadata": {"name": "numpy", "version": "2.2.0"}, "requested": False},
        {"metadata": {"name": "Torch", "version": "2.13.0+cu130"}, "requested": False},  # same version, a build
    ]}))
    problems = check_env.plan_problems(report)
    assert problems == [f"numpy: pinned {pins.pinned_version('numpy')}, the plan installs 2.2.0 "
                        "(pulled in as a dependency)"]
    assert check_env.main(["--plan", str(report)]) == 1


def test_pins_must_hold_exactly_but_local_builds_count():
    have = {name: str(version) for name, version in check_env.pins().items()}
    have["torch"] = f"{pins.pinned_version('torch')}+cu130"
    assert check_env.pin_problems(have) == []
    have["transformers"] = "5.21.1"
    del have["deepspeed"]
    assert check_env.pin_problems(have) == [f"deepspeed: pinned {pins.pinned_version('deepspeed')}, not installed",
                                            f"transformers: pinned {pins.pinned_version('transformers')}, "
                                            "installed 5.21.1"]
