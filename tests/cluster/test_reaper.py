"""cluster.reaper: a long command adopts the orphans of its process tree and stops them at exit.

Run in a child interpreter (becoming a subreaper is for the rest of a process's life: not the
test session's). The child starts a process that starts a sleeper and exits at once, the way a
Ray replica killed by a group SIGTERM leaves its vLLM engine core behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, subprocess, sys, time
    import psutil
    from cluster.reaper import adopt_orphans, reap

    adopted = adopt_orphans() if sys.argv[1] == "adopt" else False
    # a middle process starts a long sleeper and exits: the sleeper is orphaned
    mid = subprocess.Popen([sys.executable, "-c",
                            "import subprocess as s; p = s.Popen(['sleep', '300'], stdout=s.DEVNULL, stderr=s.DEVNULL); "
                            "print(p.pid)"],
                           stdout=subprocess.PIPE, text=True)
    orphan = int(mid.stdout.readline())
    mid.wait()
    time.sleep(0.5)
    parent = psutil.Process(orphan).ppid()
    t0 = time.monotonic()
    reaped = reap(grace_s=2)
    print(json.dumps({"adopted": adopted, "orphan": orphan, "parent": parent, "me": __import__("os").getpid(),
                      "reaped": reaped, "alive": psutil.pid_exists(orphan) and
                      psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE, "took": time.monotonic() - t0}))
""")


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_orphans_are_adopted_and_stopped_at_exit():
    r = _run("adopt")
    assert r["adopted"] and r["parent"] == r["me"]  # re-parented to the command, not to init
    assert r["reaped"] == [r["orphan"]] and not r["alive"] and r["took"] < 5


def test_without_adopting_an_orphan_escapes_the_command():
    """Why adopt_orphans is there: without it the orphan belongs to init and reap cannot see it."""
    r = _run("keep")
    try:
        assert r["parent"] != r["me"] and r["reaped"] == [] and r["alive"]
    finally:
        try:
            psutil.Process(r["orphan"]).kill()
        except psutil.NoSuchProcess:
            pass



def test_bounded_waits_at_most_its_timeout_and_hands_errors_back():
    import threading
    import time

    from cluster.reaper import bounded

    assert bounded(lambda: None, 1.0) is True
    with pytest.raises(ValueError, match="boom"):
        bounded(lambda: (_ for _ in ()).throw(ValueError("boom")), 1.0)
    release = threading.Event()
    t0 = time.monotonic()
    assert bounded(lambda: release.wait(10), 0.2) is False  # a call on a dead head: given up on
    assert time.monotonic() - t0 < 2
    release.set()
