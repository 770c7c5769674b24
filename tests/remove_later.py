"""Delete a large directory without waiting for it, for the tests that build a whole Python environment.

Deleting files costs ~3 ms each on the CI box's disk (measured: ~350 files/s), so an inline
``shutil.rmtree`` of a virtualenv holding torch and the pins (35-60k files) holds the suite for
3-4 minutes after its test has passed; left in a ``tmp_path``, the same tree is deleted by pytest
itself when a later session ends (it keeps the newest three base temp dirs). The directory is
renamed first (its name is free at once) and a detached ``rm`` deletes it.

Imported by tests as ``from remove_later import remove_without_waiting`` (``tests/`` is on the path).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def remove_without_waiting(path: Path) -> None:
    """Rename ``path`` aside and delete it in a detached ``rm`` (this call returns at once)."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + "-deleting")
    path.rename(doomed)
    # `sh` returns at once; its background `rm` outlives it (adopted by init), outside the session
    subprocess.run(["sh", "-c", 'rm -rf -- "$0" >/dev/null 2>&1 &', str(doomed)], check=True, cwd="/")
