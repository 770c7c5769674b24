"""cluster.logs: what reaches the terminal (ours, warnings, progress) and what only the log file."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

from cluster.logs import Progress

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import logging, os, sys, warnings
from pathlib import Path
from cluster.logs import setup, terminal
path = setup("probe", directory=Path(sys.argv[1]))
print("LOGFILE", path, file=terminal(), flush=True)
logging.getLogger("pipelines.x").info("ours info")
logging.getLogger("ray.train").info("TrainingReport(checkpoint=...)")
logging.getLogger("deepspeed").warning("a library warning")
warnings.warn("a deprecation note", DeprecationWarning, stacklevel=1)
os.write(2, b"raw C++ core line on fd 2\\n")
print("plain stderr print", file=sys.stderr, flush=True)
from cluster import logs
# what Ray's driver listeners hand over (workers' lines; the raylet's error messages)
logs._worker_lines({"pid": 7, "actor_name": "TrainWorker", "lines": ["step 3 ok", "Traceback (most recent call last):"]})
logs._worker_lines({"pid": "raylet", "lines": ["Task ServeController.graceful_shutdown failed. Error: The actor "
                                              "is dead because it was killed by `ray.kill`."]})
"""


def test_terminal_gets_ours_and_warnings_the_file_gets_everything(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shown = out.stderr
    log = Path(next(l.split(" ", 1)[1] for l in shown.splitlines() if l.startswith("LOGFILE"))).read_text()
    assert "ours info" in shown and "a library warning" in shown
    for hidden in ("TrainingReport(", "deprecation note", "raw C++ core line", "plain stderr print", "step 3 ok",
                   "graceful_shutdown failed"):
        assert hidden not in shown and hidden in log, hidden
    # a worker's error reaches the terminal; Serve's own shutdown noise stays in the log (#28)
    assert "(TrainWorker pid=7) Traceback (most recent call last):" in shown and "(raylet) Task ServeController" in log
    assert "ours info" in log and "a library warning" in log


def test_progress_line_counts_rate_from_the_first_update_and_always_ends_with_the_totals():
    stream = io.StringIO()
    bar = Progress("train", total=10, unit="steps", stream=stream, every_s=3600)
    bar.update(1, loss=2.5)
    time.sleep(0.05)
    bar.update(5, loss=1.25)
    assert stream.getvalue() == ""  # not a terminal: at most one line every every_s
    bar.close()
    line = stream.getvalue().strip()
    assert line.startswith("train  5/10 steps  loss 1.25") and "steps/s" in line and "ETA" in line
    rate = float(line.split("steps/s")[0].split()[-1])
    assert rate > 10  # 4 steps in ~0.05 s, start-up before the first update excluded
