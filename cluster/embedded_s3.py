"""moto's S3 server on 127.0.0.1: the "embedded" storage of the local default (docs/architecture.md "Connecting").

    >>> with EmbeddedS3() as server:            # a free port on 127.0.0.1, in a thread
    ...     env = embedded_worker_env(server.endpoint_url)   # for Ray runtime_env
    >>> with EmbeddedS3Process() as server:     # the same, in a child process (its own GIL)
    ...     ...

As a separate process (what `sphinx-x up` runs): ``python -m cluster.storage serve --port 9000``
(``--port 0`` picks a free one; ``--ready-file F`` receives the endpoint URL once it answers).
Objects live in the server's memory, as long as its process.

The checksum settings below are applied to this process on import: new AWS SDKs send checksums
that non-AWS servers mishandle.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from models.errors import UserError

log = logging.getLogger(__name__)

ENDPOINT_ENV = "SPHINX_X_S3_ENDPOINT"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}
for _k, _v in CHECKSUM_ENV.items():
    os.environ.setdefault(_k, _v)


class EmbeddedS3:
    """moto's S3 server on 127.0.0.1 (never 0.0.0.0), in a thread of this process.

    ``port=None`` lets the OS pick a free port. ``start()`` returns once the server answers.
    """

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None):
        self.host, self.port = host, port
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("EmbeddedS3 is not started")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30) -> "EmbeddedS3":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = _GuardedMotoServer(self.host, self.port or 0)
        self._server.start()
        self.port = self._server.port
        deadline = time.monotonic() + timeout_s
        while True:  # the socket is bound; wait until the app really answers
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=2):
                    break
            except OSError as err:
                if time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"storage: embedded S3 on {self.host} did not start: {err}") from None
                time.sleep(0.05)
        log.info("embedded S3 server on %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------- the guard in front of moto

def is_loopback_origin(origin: str) -> bool:
    """An ``Origin`` header naming this machine: ``http(s)://localhost|127.x.x.x|[::1][:port]``.

        >>> is_loopback_origin("http://127.0.0.1:8000"), is_loopback_origin("https://evil.example")
        (True, False)
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https"):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackGuard:
    """WSGI middleware in front of moto's app (docs/security.md, "Embedded S3").

    - ``/moto-api/...`` (moto's admin routes: ``reset``, ``data.json``, the dashboard) and the fake
      instance-metadata routes answer 404: nothing but S3 is served.
    - A request with an ``Origin`` header that is not loopback (a web page the user visits on
      another site, or ``null``) answers 403 before moto sees it: a browser's cross-site form POST
      cannot write or delete; SDKs send no ``Origin``.
    - CORS answers name the loopback origin that asked (never ``*``); without an ``Origin`` the
      ``Access-Control-*`` headers are dropped.
    """

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if isinstance(path, bytes):
            path = path.decode("utf-8", "replace")
        origin = environ.get("HTTP_ORIGIN")
        if path.startswith(("/moto-api", "/latest/meta-data", "/latest/api")) or path == "/favicon.ico":
            return _answer(start_response, "404 Not Found", b"not served by the embedded S3\n")
        if origin is not None and not is_loopback_origin(origin):
            return _answer(start_response, "403 Forbidden", b"cross-origin requests are refused\n")

        def guarded_start(status, headers, exc_info=None):
            headers = [(k, v) for k, v in headers if not k.lower().startswith("access-control-")
                       or (origin is not None and k.lower() != "access-control-allow-origin")]
            if origin is not None:
                headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return self.app(environ, guarded_start)


def _answer(start_response, status: str, body: bytes):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class _GuardedMotoServer:
    """moto's app behind :class:`LoopbackGuard`, served by werkzeug in a daemon thread."""

    def __init__(self, host: str, port: int):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = LoopbackGuard(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-s3", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


class EmbeddedS3Process:
    """The same server in a child process (``python -m cluster.storage serve``), so that its
    request handling does not share this process's GIL: a driver that uploads thousands of
    objects from threads while the server parses them in-process runs at about one core.

    ``start()`` returns once the server answers; ``stop()`` terminates the child.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._proc: Any = None
        self._log: Any = None
        self._endpoint: Optional[str] = None

    @property
    def endpoint_url(self) -> str:
        if self._endpoint is None:
            raise RuntimeError("EmbeddedS3Process is not started")
        return self._endpoint

    def start(self, timeout_s: float = 60) -> "EmbeddedS3Process":
        import subprocess
        import tempfile

        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._log = tempfile.TemporaryFile()  # the child's output (a pipe could fill and block it)
        with tempfile.TemporaryDirectory(prefix="sx-s3-") as tmp:
            ready = Path(tmp, "endpoint")
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cluster.storage", "serve", "--host", self.host, "--port", "0",
                 "--ready-file", str(ready)], stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                if self._proc.poll() is not None:
                    self._log.seek(0)
                    err = self._log.read().decode(errors="replace")[-2000:]
                    raise UserError(f"storage: embedded S3 process exited with {self._proc.returncode}: {err}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"storage: embedded S3 process did not answer within {timeout_s:.0f}s")
                time.sleep(0.05)
            self._endpoint = ready.read_text().strip()
        log.info("embedded S3 server (process %d) on %s", self._proc.pid, self._endpoint)
        return self

    def stop(self) -> None:
        proc, self._proc, self._endpoint = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - it would not stop: kill it
                proc.kill()
                proc.wait(timeout=10)
        log_file, self._log = self._log, None
        if log_file is not None:
            log_file.close()

    def __enter__(self) -> "EmbeddedS3Process":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def embedded_worker_env(endpoint_url: str, region: str = "us-east-1") -> dict[str, str]:
    """The env a Ray worker needs to reach the embedded server (dummy credentials only)."""
    return {ENDPOINT_ENV: endpoint_url, "AWS_REGION": region, "AWS_DEFAULT_REGION": region,
            **DUMMY_CREDENTIALS, **CHECKSUM_ENV}


# ---------------------------------------------------------------- `python -m cluster.storage serve`


def serve_main(argv: list[str]) -> int:
    """`python -m cluster.storage serve [--host H] [--port P] [--ready-file F]` (also this module)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m cluster.storage", description="run the embedded S3 server")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("serve", help="serve moto S3 on HOST:PORT until SIGTERM/SIGINT")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: a free port")
    s.add_argument("--ready-file", default=None, help="write the endpoint URL here once it answers")
    args = p.parse_args(argv)

    server = EmbeddedS3(args.host, args.port or None).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.ready_file:
        tmp = Path(f"{args.ready_file}.tmp")
        tmp.write_text(server.endpoint_url)
        tmp.replace(args.ready_file)
    print(f"embedded S3 ready at {server.endpoint_url}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
