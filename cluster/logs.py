"""What a user sees on the terminal: sphinx-x's own lines, one live progress line per long stage,
and the warnings and errors of everything else. The rest (Ray's, Ray Train's, Ray Data's,
DeepSpeed's own lines, and the workers' output) goes to the run's log file, whose path is printed.

    >>> path = setup("sphinx-x-local")      # ~/.sphinx-x/run/logs/sphinx-x-local-20261202-041700.log
    >>> with Progress("train", total=100, unit="steps") as bar:
    ...     bar.update(12, loss=3.2)        # "train  12/100 steps  loss 3.2  1.5 steps/s  ETA 59s"

Without :func:`setup` (tests, library use) nothing is redirected.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

# loggers that are ours: INFO reaches the terminal
OWN = ("cluster", "pipelines", "actors", "models", "__main__")
# libraries that install their own handlers: re-pointed at the log file (+ warnings to the terminal)
LIBRARIES = ("ray", "ray.train", "ray.data", "ray.serve", "ray.tune", "deepspeed", "DeepSpeed",
             "torch", "transformers", "filelock", "urllib3", "botocore", "werkzeug")
# a worker line that reaches the terminal, not only the file
_LOUD = re.compile(r"\b(ERROR|Error|Exception|Traceback|CRITICAL|FATAL|Killed|OOM)\b")
# what Ray reports while Serve and its actors are being stopped on purpose (the log keeps it)
_SHUTDOWN_NOISE = re.compile(r"graceful_shutdown failed|killed by `ray\.kill`")

_log_file: Optional[Path] = None
_terminal: Optional[TextIO] = None
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_file() -> Optional[Path]:
    return _log_file


def terminal() -> TextIO:
    """Where the user's terminal is: the original stderr (after :func:`setup`, fd 2 is the log file)."""
    return _terminal or sys.stderr


def setup(name: str, *, verbose: bool = False, directory: Optional[Path] = None,
          capture_fd: bool = True) -> Path:
    """Send everything to a new log file, and to the terminal only ours + warnings; returns the path.

    ``capture_fd``: also point file descriptor 2 at the log file, so what libraries and child
    processes write to stderr themselves (Ray's C++ core, raylets, DeepSpeed's builds, Python
    warnings) lands there too; the terminal keeps a duplicate of the original stderr.
    """
    global _log_file, _terminal
    if directory is None:
        from cluster.runtime import run_dir

        directory = run_dir() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _log_file = path
    if capture_fd:
        import os

        sys.stderr.flush()
        _terminal = os.fdopen(os.dup(2), "w", buffering=1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(logging.DEBUG)
    terminal_handler = logging.StreamHandler(terminal())
    terminal_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    terminal_handler.addFilter(_OwnOrLoud(logging.DEBUG if verbose else logging.INFO))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(file_handler)
    root.addHandler(terminal_handler)
    logging.captureWarnings(True)  # py.warnings: to the file (and, as warnings, the terminal)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_libraries()
    return path


class _OwnOrLoud(logging.Filter):
    def __init__(self, own_level: int):
        super().__init__()
        self.own_level = own_level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN
        if record.name == "py.warnings":  # libraries' deprecation notes and the like: the file only
            return False
        return record.levelno >= (self.own_level if own else logging.WARNING)


def quiet_libraries() -> None:
    """Libraries' loggers propagate to the root (file + filtered terminal) instead of printing."""
    if _log_file is None:
        return
    for name in LIBRARIES:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True


def after_ray_init() -> None:
    """With a log file: workers' output to it (loud lines also to stderr), no Ray Data bars."""
    if _log_file is None:
        return
    quiet_libraries()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker_stdstream_dispatcher.remove_handler("sphinx_x_logs")
        global_worker_stdstream_dispatcher.add_handler("sphinx_x_logs", _worker_lines)
        # Ray 2.60: the driver's error listener (worker.listen_error_messages) prints the raylet's
        # messages to stdout itself, past the dispatcher; they go the same way as the workers'
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: _worker_lines(data)
    except Exception:  # noqa: BLE001 - a Ray without this hook keeps printing as usual
        logging.getLogger(__name__).debug("worker log routing unavailable", exc_info=True)


def _worker_lines(data: dict) -> None:
    """Workers' (and the raylet's) output: all of it to the log file; to the terminal only loud
    lines, and never the noise of a shutdown this process asked for (:data:`_SHUTDOWN_NOISE`)."""
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}) " if data.get("pid") != "raylet" else "(raylet) "
    lines = data.get("lines") or []
    try:
        with open(_log_file, "a") as f:  # type: ignore[arg-type]
            f.writelines(prefix + line + "\n" for line in lines)
    except OSError:
        pass
    for line in lines:
        if _LOUD.search(line) and not _SHUTDOWN_NOISE.search(line):
            print(prefix + line, file=terminal(), flush=True)


class Progress:
    """One live line: ``label  done/total unit  k v ...  rate  ETA``.

    On a terminal it redraws in place (at most 4 times a second); otherwise (a pipe, a log) it
    prints a plain line at most every ``every_s`` seconds, and always at the end.
    """

    def __init__(self, label: str, *, total: Optional[int] = None, unit: str = "rows",
                 stream: Optional[TextIO] = None, every_s: float = 10.0):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or terminal()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.25 if self.tty else every_s
        self.t0 = time.monotonic()
        self._last = self.t0  # the first line after every_s (or at the end)
        self._started = False
        self._first: Optional[tuple[int, float]] = None  # (done, time) at the first update
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._drawn_text = ""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, done: int, **fields: Any) -> None:
        self._started = True
        now = time.monotonic()
        if self._first is None:
            self._first = (done, now)
        self.done, self.fields = done, {**self.fields, **fields}
        if now - self._last >= self.every_s:
            self._last = now
            self._draw()

    def line(self, final: bool = False) -> str:
        now = time.monotonic()
        d0, t0 = self._first or (0, self.t0)
        # the rate since the first update (start-up excluded); with one update, since the start
        if self.done > d0 and now > t0:
            rate = (self.done - d0) / (now - t0)
        elif final:  # one update in all: the rate since the start is all there is
            rate = self.done / max(1e-6, now - self.t0)
        else:  # too early to say (start-up is not a rate)
            rate = None
        parts = [self.label, f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items() if v is not None]
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def _draw(self, final: bool = False) -> None:
        text = self.line(final)
        self._drawn_text = text
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self._started:
            return
        self._draw(final=True)  # the final figures, always
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self._started = False


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
