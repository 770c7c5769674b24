"""Where a stage's outputs came from: the code version written into manifests and fingerprints."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def code_version() -> str:
    """``<package version>+<git short sha>`` (the sha only when run from a git checkout)."""
    try:
        pkg = version("sphinx-x")
    except PackageNotFoundError:
        pkg = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pkg}+{sha}" if sha else pkg
