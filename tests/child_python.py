"""Python code run in a fresh interpreter at the repository root, for the checks that need a
process of their own (a Ray `Cluster`, DeepSpeed's process-wide state, a Ray that must start clean).

    got = json.loads(last_line(script, str(tmp_path / "one.parquet"), timeout=300))

Imported by tests as ``from child_python import last_line`` (``tests/`` is on the path).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def last_line(code: str, *args: str, timeout: float = 300) -> str:
    """Run ``python -c code args...`` at the repository root; its last line of output (the
    assertion names the exit status with the tails of both outputs when it fails)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip(), \
        f"rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1]
