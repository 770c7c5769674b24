"""The local runtime: `sphinx-x up | down | status` (connecting is cluster.connect's).

`sphinx-x up` keeps two things alive in the background, each a child in its own process group:

- a local Ray head (``ray start --head --block`` on 127.0.0.1, free ports, its own temp dir so
  that nobody else's ``ray.init()`` finds it by accident, and nobody else's is touched);
- the embedded S3 server (``python -m cluster.storage serve``).

Their PIDs, the GCS address, the dashboard URL and the S3 endpoint go to ``state.json`` in the
run directory (``$SPHINX_X_HOME``, default ``~/.sphinx-x/run``). ``cluster.connect`` reads it,
so every later stage reuses them:

    $ sphinx-x up
    $ sphinx-x run cluster/examples/local.yaml   # uses the head and the S3 server above
    $ sphinx-x down                              # stops only what `up` started (never `ray stop`)

Without `up`, ``cluster.connect`` starts a private local Ray for the process (``address="local"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from cluster.embedded_s3 import ENDPOINT_ENV, embedded_worker_env
from cluster.placement import group_resources
from cluster.ports import free_port
from cluster.spec import ClusterSpec, load_spec
from cluster.storage import open_storage
from models.errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "state.json"
COMPONENTS = ("ray", "s3")


def run_dir() -> Path:
    """``$SPHINX_X_HOME`` or ``~/.sphinx-x/run``: where `up` keeps its state and logs."""
    return Path(os.environ.get("SPHINX_X_HOME") or "~/.sphinx-x/run").expanduser()


# ---------------------------------------------------------------- state


def _proc(pid: int, create_time: Optional[float]):
    """The psutil.Process for a recorded PID, or None if it is gone or the PID was reused."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        return None


def is_alive(component: dict[str, Any]) -> bool:
    return _proc(component["pid"], component.get("create_time")) is not None


def up_state(alive_only: bool = False, directory: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """What `sphinx-x up` recorded, or None. ``alive_only`` drops components that died."""
    path = (directory or run_dir()) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if alive_only:
        state = {k: v for k, v in state.items() if k not in COMPONENTS or is_alive(v)}
        if not any(k in state for k in COMPONENTS):
            return None
    return state


# ---------------------------------------------------------------- joining the `up` head


def join_up_head(state: dict[str, Any], runtime_env: dict[str, Any]) -> None:
    """``ray.init`` on the head `sphinx-x up` recorded (cluster.connect decides when)."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    log.info("using the Ray head started by `sphinx-x up` at %s", state["ray"]["gcs_address"])
    # the head's private token. The env stays set for this process: Ray's config and token
    # cache must agree for the life of the connection (and any later ray.init here).
    os.environ.update(_auth_env(Path(state["ray"]["auth_token_path"])))
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray.init(address=state["ray"]["gcs_address"], runtime_env=runtime_env)


# ---------------------------------------------------------------- up


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, env=env, start_new_session=True)


def _record(proc: subprocess.Popen) -> dict[str, Any]:
    import psutil

    return {"pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time()}


def _wait(what: str, ready, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise UserError(f"up: {what} exited with {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise UserError(f"up: {what} did not start within {timeout_s:.0f}s; log {log_path}")
        time.sleep(0.2)


def _auth_token(directory: Path) -> Path:
    """A private Ray auth token for the `up` head (Ray 2.60 enables token auth on `ray start`;
    the head listens on the node's address, not only on loopback). Kept across down/up."""
    import secrets

    path = directory / "ray_auth_token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path


def _auth_env(token_path: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _ray_temp_dir(directory: Path) -> Path:
    # Unix socket paths must stay short (< 108 bytes), so not under a deep run directory.
    import hashlib

    tag = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"sphinx-x-ray-{os.getuid()}-{tag}"


def start(spec: Optional[ClusterSpec] = None, *, directory: Optional[Path] = None, dashboard: bool = True,
          num_cpus: Optional[int] = None, timeout_s: float = 120) -> dict[str, Any]:
    """Start the S3 server and the Ray head in the background; return the recorded state.

    Already up: returns the existing state with ``"already_up": True``.
    """
    directory = directory or run_dir()
    directory.mkdir(parents=True, exist_ok=True)
    existing = up_state(alive_only=True, directory=directory)
    if existing:
        return {**existing, "already_up": True}
    stop(directory=directory)  # clean up a stale state (something died)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p), "RAY_USAGE_STATS_ENABLED": "0"}
    state: dict[str, Any] = {"run_dir": str(directory), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        # 1. the embedded S3 server; it writes its endpoint once it answers
        ready_file, s3_log = directory / "s3.endpoint", directory / "s3.log"
        ready_file.unlink(missing_ok=True)
        s3 = _spawn([sys.executable, "-m", "cluster.storage", "serve", "--port", "0",
                     "--ready-file", str(ready_file)], s3_log, env)
        state["s3"] = {**_record(s3), "log": str(s3_log)}
        _wait("the S3 server", ready_file.exists, s3, s3_log, 60)
        state["s3"]["endpoint_url"] = ready_file.read_text().strip()

        # 2. the Ray head; `ray start` gives up after a fixed 30 s if the raylet is slow to
        # register (a busy machine), so a head that died that way gets one more try
        for attempt in (1, 2):
            try:
                state["ray"] = _start_head(spec, directory, env, state["s3"]["endpoint_url"], dashboard,
                                           num_cpus, timeout_s)
                break
            except _HeadStartTimeout as err:
                _stop_components({"ray": err.component}, timeout_s=15)
                if attempt == 2:
                    raise UserError(str(err)) from None
                log.warning("up: the Ray head timed out during startup; trying once more")
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    except BaseException:
        _stop_components(state, timeout_s=15)
        raise

    if spec is not None and spec.storage.is_s3 and spec.storage.endpoint_url == "embedded":
        old = os.environ.get(ENDPOINT_ENV)
        os.environ[ENDPOINT_ENV] = state["s3"]["endpoint_url"]
        try:
            open_storage(spec.storage)  # creates the spec's bucket on the new server
        finally:
            if old is None:
                os.environ.pop(ENDPOINT_ENV, None)
            else:
                os.environ[ENDPOINT_ENV] = old
    return state


class _HeadStartTimeout(Exception):
    def __init__(self, message: str, component: dict[str, Any]):
        super().__init__(message)
        self.component = component


def _start_head(spec: Optional[ClusterSpec], directory: Path, env: dict[str, str], s3_endpoint: str,
                dashboard: bool, num_cpus: Optional[int], timeout_s: float) -> dict[str, Any]:
    """Start `ray start --head --block` in its own temp dir, every port chosen here (no clash
    with other Rays); return its state entry once the head is fully up."""
    region = spec.storage.region if spec else "us-east-1"
    ray_exe = Path(sys.executable).with_name("ray")
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = _ray_temp_dir(directory)
    address_file = temp_dir / "ray_current_cluster"
    address_file.unlink(missing_ok=True)
    resources = group_resources(spec) if spec else {}
    cmd = [str(ray_exe) if ray_exe.exists() else "ray", "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", str(temp_dir), "--disable-usage-stats",
           # logical CPUs: what the spec's head declares (cluster.head.cpus), else at least 4
           "--num-cpus", str(num_cpus or (spec.cluster.head.cpus if spec else max(4, os.cpu_count() or 1))),
           "--include-dashboard", "true" if dashboard else "false"]
    if dashboard:
        cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    ray_log, token = directory / "ray.log", _auth_token(directory)
    head = _spawn(cmd, ray_log, {**env, **embedded_worker_env(s3_endpoint, region), **_auth_env(token)})
    component = {**_record(head), "log": str(ray_log), "temp_dir": str(temp_dir),
                 "gcs_address": f"127.0.0.1:{gcs_port}", "auth_token_path": str(token),
                 "dashboard_url": f"http://127.0.0.1:{dash_port}" if dashboard else None}
    # `ray start` writes this file once the head (GCS, raylet, dashboard) is fully up
    try:
        _wait("the Ray head", address_file.exists, head, ray_log, timeout_s)
    except UserError as err:
        if "timed out during startup" in _tail(ray_log, 40):
            raise _HeadStartTimeout(str(err), component) from None
        raise
    return component


# ---------------------------------------------------------------- down


def _members(component: dict[str, Any]) -> list:
    """Every live process of a component: the recorded PID, its descendants, its process group,
    and (for Ray) any process naming our private temp dir. Nothing else."""
    import psutil

    root = _proc(component["pid"], component.get("create_time"))
    found = {}
    if root is not None:
        found[root.pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    temp_dir = component.get("temp_dir")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid in found or proc.pid == os.getpid():
                continue
            if root is not None and os.getpgid(proc.pid) == component["pgid"]:
                found[proc.pid] = proc
            elif temp_dir and any(temp_dir in arg for arg in (proc.info["cmdline"] or [])):
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def _stop_components(state: dict[str, Any], timeout_s: float = 30) -> list[int]:
    import psutil

    stopped: list[int] = []
    for name in ("ray", "s3"):  # Ray first: its workers may still talk to S3
        component = state.get(name)
        if not component:
            continue
        procs = _members(component)
        root = _proc(component["pid"], component.get("create_time"))
        if root is not None:  # `ray start --block` stops its own processes on SIGTERM
            root.send_signal(signal.SIGTERM)
            psutil.wait_procs([root], timeout=timeout_s / 2)
        initial = {p.pid for p in procs}
        procs = [p for p in procs + _members(component) if p.is_running()]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(procs, timeout=timeout_s / 2)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        stopped += sorted(initial | {p.pid for p in procs})
        if component.get("temp_dir"):
            shutil.rmtree(component["temp_dir"], ignore_errors=True)
    return sorted(set(stopped))


def stop(*, directory: Optional[Path] = None, timeout_s: float = 30) -> Optional[dict[str, Any]]:
    """Stop only what `up` recorded, by PID / process group; remove the state. None if not up."""
    directory = directory or run_dir()
    state = up_state(directory=directory)
    if state is None:
        return None
    state["stopped_pids"] = _stop_components(state, timeout_s)
    (directory / STATE_FILE).unlink(missing_ok=True)
    (directory / "s3.endpoint").unlink(missing_ok=True)
    return state


# ---------------------------------------------------------------- the CLI


def _describe(state: dict[str, Any]) -> list[str]:
    lines = []
    if "ray" in state:
        ray_ = state["ray"]
        alive = "alive" if is_alive(ray_) else "DEAD"
        lines.append(f"ray head  {alive:5}  pid {ray_['pid']}  address {ray_['gcs_address']}"
                     + (f"  dashboard {ray_['dashboard_url']}" if ray_.get("dashboard_url") else ""))
    if "s3" in state:
        s3 = state["s3"]
        alive = "alive" if is_alive(s3) else "DEAD"
        lines.append(f"s3 server {alive:5}  pid {s3['pid']}  endpoint {s3.get('endpoint_url')}")
    return lines


def command(args: argparse.Namespace) -> int:
    if args.verb == "up":
        spec = load_spec(args.spec) if getattr(args, "spec", None) else None
        state = start(spec)
        print("already up:" if state.get("already_up") else "up:")
        print("\n".join(_describe(state)))
        print(f"state in {run_dir() / STATE_FILE}. Specs with cluster.address: local and "
              "storage.endpoint_url: embedded now use these (objects in the S3 server live until "
              "`sphinx-x down`).\n"
              f"Other tools: RAY_ADDRESS={state['ray']['gcs_address']} RAY_AUTH_MODE=token "
              f"RAY_AUTH_TOKEN_PATH={state['ray']['auth_token_path']} "
              f"{ENDPOINT_ENV}={state['s3']['endpoint_url']}\nStop with `sphinx-x down`.")
        return 0
    if args.verb == "down":
        state = stop()
        if state is None:
            print("nothing is up")
            return 0
        print(f"stopped {len(state['stopped_pids'])} processes started by `sphinx-x up` "
              f"(ray head pid {state.get('ray', {}).get('pid')}, s3 pid {state.get('s3', {}).get('pid')})")
        return 0
    if args.verb == "status":
        state = up_state()
        if state is None:
            print("nothing is up (start with `sphinx-x up`)")
            return 1
        print(f"started {state.get('started')} (state in {run_dir() / STATE_FILE})")
        print("\n".join(_describe(state)))
        return 0 if all(is_alive(state[c]) for c in COMPONENTS if c in state) else 1
    raise UserError(f"cluster.runtime has no verb {args.verb!r}")
