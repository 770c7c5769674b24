"""`sphinx-x run`: stage order and idempotency; Ray Jobs against a real `ray start --head`
(shards land in the embedded S3, status and logs come back through `sphinx-x jobs`, a failing
stage exits non-zero with the job's error); placement on a 3-node cluster with one custom
resource per node group."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from cluster.ports import free_port
from cluster.spec import dump_spec
from models.errors import UserError
from pipelines import run
from pipelines.cli import main

VENV_BIN = Path(sys.executable).parent
FAKE_SECRET = "fake-secret-never-in-a-submission-123"


# ---------------------------------------------------------------- in-process order and skipping


def _fake_stage(name: str, complete: bool, calls: list):
    return types.SimpleNamespace(
        name=name, service=None,
        is_complete=lambda ctx: complete,
        run=lambda ctx: calls.append((name, ctx.force)) or {"stage": name},
    )


def test_run_local_orders_stages_and_skips_complete_ones(monkeypatch):
    from pipelines import stages

    calls: list = []
    fakes = (_fake_stage("preprocess", True, calls), _fake_stage("train", False, calls), _fake_stage("serve", False, calls))
    monkeypatch.setattr(stages, "STAGES", fakes)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    out = run.run_local(None, ["train", "preprocess"], ctx=types.SimpleNamespace(force=False))
    assert out == {"preprocess": {"skipped": True}, "train": {"stage": "train"}}
    assert calls == [("train", False)]
    calls.clear()
    run.run_local(None, ["serve", "train", "preprocess"], ctx=types.SimpleNamespace(force=True))
    assert calls == [("preprocess", True), ("train", True), ("serve", True)]
    with pytest.raises(UserError, match="unknown stage"):
        run.run_local(None, ["deploy"], ctx=types.SimpleNamespace(force=False))


def test_run_on_a_cluster_submits_no_job_for_a_stage_the_spec_gives_nothing_to_do(monkeypatch, tmp_path):
    from cluster.spec import parse_spec

    submitted: list = []
    monkeypatch.setattr(run, "run_jobs", lambda spec, stages, address, force=False: submitted.append(stages))
    path = tmp_path / "s.yaml"
    path.write_text(dump_spec(parse_spec({})))  # no curate:, no eval.benchmarks
    assert main(["run", str(path), "--address", "http://head:8265"]) == 0
    path.write_text(dump_spec(parse_spec({"curate": {"ocr": {"input": "docs"}}})))
    assert main(["run", str(path), "--address", "http://head:8265", "--stages", "curate,preprocess"]) == 0
    assert submitted == [["preprocess", "train", "serve"], ["curate", "preprocess"]]


# ---------------------------------------------------------------- a real Ray head


@pytest.fixture(scope="module")
def ray_head(s3):
    """`ray start --head --block` in its own process group, on its own ports and temp dir."""
    import ray
    from ray.job_submission import JobSubmissionClient

    ray.shutdown()  # the shared session Ray is not needed while a head of our own runs
    dash, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh7-", dir="/tmp")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}  # independent of a ~/.ray/auth_token someone else created
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "3",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:  # the Jobs API answering (token auth, when ~/.ray/auth_token exists, is the SDK's job)
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        # our process group only (never `ray stop`): SIGTERM, then SIGKILL whatever lingers
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _synthetic_sources(root: Path) -> list[dict]:
    from pipelines.demo import synthetic

    where = synthetic.write(synthetic.generate(6, 0, seed=3), root)
    return [{"name": "syn", "path": where["train"], "image_root": where["image_root"]}]


def _spec_file(tmp_path: Path, spec) -> str:
    path = tmp_path / "my-spec.yaml"
    path.write_text(dump_spec(spec))
    return str(path)


def test_run_submits_preprocess_as_a_ray_job(ray_head, make_spec, tmp_path, monkeypatch, capsys):
    from cluster.jobs import connect
    from cluster.storage import open_storage
    from pipelines.stages import preprocess

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    spec = make_spec(data={"sources": _synthetic_sources(tmp_path / "data"), "output": "shards",
                           "max_seq_len": 512, "concurrency": 1})
    assert main(["run", _spec_file(tmp_path, spec), "--address", ray_head, "--stages", "preprocess"]) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"preprocess: submitted job (\S+)", out).group(1)
    assert f"preprocess: job {job_id} SUCCEEDED" in out
    # the shards are in the embedded S3, written by the job
    assert preprocess.is_complete(spec)
    assert any(k.endswith(".parquet") for k in open_storage(spec.storage).list("shards"))
    # the submission carried the storage env, no secret value
    info = connect(ray_head).get_job_info(job_id)
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["SPHINX_X_S3_ENDPOINT"] == os.environ["SPHINX_X_S3_ENDPOINT"]
    assert FAKE_SECRET not in repr(info.runtime_env) and FAKE_SECRET not in info.entrypoint
    # status, logs and list through `sphinx-x jobs`
    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", ray_head]) == 0
    logs = capsys.readouterr().out
    assert "joined the job's Ray cluster" in logs or "preprocess" in logs
    assert main(["jobs", "list", "--address", ray_head]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "status", "raysubmit_nosuchjob", "--address", ray_head]) == 1
    assert "no such job" in capsys.readouterr().err


def test_failing_stage_exits_nonzero_with_the_jobs_error(ray_head, make_spec, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "missing-source.jsonl"
    spec = make_spec(data={"sources": [{"name": "gone", "path": str(missing)}]})
    assert main(["run", _spec_file(tmp_path, spec), "--address", ray_head, "--stages", "preprocess,train"]) == 1
    captured = capsys.readouterr()
    assert "stage preprocess failed" in captured.err and "FAILED" in captured.err
    assert "missing-source.jsonl" in captured.err  # the job's own error, not just "failed"
    assert "train: submitted" not in captured.out  # stopped at the first failure


class _FakeJobs:
    """A Ray Jobs client that records submissions; each job is PENDING for ``pending`` polls."""

    def __init__(self, ray_version: str, pending: int = 0):
        self._server_ray_version = ray_version
        self.pending, self.submitted, self.polls = pending, [], {}

    def submit_job(self, *, entrypoint, runtime_env, metadata):
        self.submitted.append({"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata})
        return f"raysubmit_{len(self.submitted)}"

    def get_job_info(self, job_id):
        n = self.polls[job_id] = self.polls.get(job_id, 0) + 1
        first = job_id == "raysubmit_1"
        state = "PENDING" if first and n <= self.pending else "SUCCEEDED"
        return types.SimpleNamespace(status=state, message="")

    async def tail_job_logs(self, job_id):
        yield f"log of {job_id}\n"


def test_run_jobs_on_a_stock_cluster_ships_the_pins_and_says_why_the_first_job_waits(monkeypatch):
    import io

    from cluster import jobs, pins
    from cluster.spec import parse_spec

    spec = parse_spec({"cluster": {"dependencies": "runtime_env"},
                       "storage": {"uri": "s3://some-bucket/x", "endpoint_url": None}})
    fake = _FakeJobs(pins.ray_version(), pending=4)
    monkeypatch.setattr(jobs, "connect", lambda address: fake)
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    out = io.StringIO()
    results = run.run_jobs(spec, ["train", "preprocess"], "http://head:8265", out=out)
    assert [r.status for r in results.values()] == ["SUCCEEDED", "SUCCEEDED"]
    first, second = fake.submitted
    assert "--stages preprocess" in first["entrypoint"] and "--stages train" in second["entrypoint"]
    for sub in fake.submitted:  # every job brings the same pin list: Ray builds the env once
        assert sub["runtime_env"]["pip"] == pins.job_pip()
        assert sub["runtime_env"]["env_vars"]["AWS_REGION"] == "us-east-1"
    text = out.getvalue()
    assert text.count("waiting for the job's runtime environment: Ray installs the pinned dependencies") == 1
    assert "preprocess: job raysubmit_1 SUCCEEDED after 15s" in text and "log of raysubmit_2" in text, text
    # the image path: no pip; a stock cluster on another Ray: refused before any submission
    image_fake = _FakeJobs(pins.ray_version())
    monkeypatch.setattr(jobs, "connect", lambda address: image_fake)
    run.run_jobs(spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"dependencies": "image"})}),
                 ["preprocess"], "http://head:8265", out=io.StringIO())
    assert "pip" not in image_fake.submitted[0]["runtime_env"]
    other = _FakeJobs("2.41.0")
    monkeypatch.setattr(jobs, "connect", lambda address: other)
    with pytest.raises(UserError, match="cluster runs Ray 2.41.0"):
        run.run_jobs(spec, ["preprocess"], "http://head:8265", out=io.StringIO())
    assert other.submitted == []


# ---------------------------------------------------------------- placement on node groups


def test_each_stage_runs_on_its_node_group(s3, make_spec, tmp_path):
    """Head + a `cpu` node + a `gpu` node (distinct custom resources): preprocess actors land on
    `cpu`, train workers and serve replicas on `gpu` — as the spec's groups say.

    The cluster lives in a child process: a Ray `Cluster` started and shut down in the test
    worker can leave a GCS client behind that ends the worker ~60 s later ("Failed to connect to
    GCS within 60 seconds", BENCHMARKS.md), whichever test it runs then."""
    import json

    import ray

    from child_python import last_line

    ray.shutdown()  # the session's Ray gives its CPUs to the three nodes
    spec = make_spec(
        cluster={"worker_groups": [{"name": "cpu", "cpus": 2}, {"name": "gpu", "cpus": 3}]},
        data={"sources": _synthetic_sources(tmp_path / "data"), "max_seq_len": 512, "group": "cpu",
              "concurrency": 1},
        train={"group": "gpu", "workers": 2, "steps": 2, "micro_batch": 2, "checkpoint_every": 2, "zero_stage": 2,
               "packing": False},  # a handful of rows: one sample per row
        serve={"models": [{"name": "placed", "checkpoint": "@train", "group": "gpu",
                           "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]},
    )
    path = _spec_file(tmp_path, spec)
    three_nodes = f"""
import json
import ray
from ray import serve
from ray._private.state import actors
from ray.cluster_utils import Cluster
from cluster.spec import load_spec
from cluster.storage import embedded_worker_env
from pipelines import run

spec = load_spec({path!r})
cpu_group, gpu_group = spec.cluster.worker_groups
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
try:
    cpu_node = cluster.add_node(num_cpus=2, resources={{cpu_group.placement_resource: 1000}})
    gpu_node = cluster.add_node(num_cpus=3, resources={{gpu_group.placement_resource: 1000}})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={{"env_vars": embedded_worker_env({s3.endpoint_url!r})}})
    summaries = run.run_local(spec, ["preprocess", "train", "serve"])
    where = {{}}
    for info in actors().values():
        cls = info["ActorClassName"]
        kind = ("data" if "Tiler" in cls else "train" if "TrainWorker" in cls
                else "serve" if cls.startswith(f"ServeReplica:{{spec.name}}:placed") else None)
        if kind:
            where.setdefault(kind, set()).add(
                {{cpu_node.node_id: "cpu", gpu_node.node_id: "gpu"}}.get(info["Address"]["NodeID"], "head"))
    serve.shutdown()
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps({{"stages": sorted(summaries), "where": {{k: sorted(v) for k, v in where.items()}}}}))
"""
    got = json.loads(last_line(three_nodes, timeout=900))
    assert got["stages"] == ["preprocess", "serve", "train"]
    assert got["where"] == {"data": ["cpu"], "train": ["gpu"], "serve": ["gpu"]}


# ---------------------------------------------------------------- Ctrl-C, as a user presses it


def test_ctrl_c_stops_run_while_serving_after_training(tmp_path):
    """`sphinx-x run --stages train,serve` in a child with SIGINT at its default (a background
    job of a non-interactive shell ignores it): after training, while serving, one SIGINT ends
    the command within seconds (Ray Train's own SIGINT handler must not outlive the stage)."""
    import threading
    import urllib.request

    from cluster.connect import storage_for
    from cluster.layout import Layout
    from cluster.spec import parse_spec
    from pipelines.demo.synthetic_shards import write_shards

    port = free_port()
    spec = parse_spec({
        "name": "ctrl-c", "storage": {"uri": str(tmp_path / "store")},
        "cluster": {"head": {"cpus": 3}},
        "model": {"flavour": "debug"},
        "train": {"workers": 1, "steps": 2, "checkpoint_every": 2, "micro_batch": 2, "max_failures": 0,
                  "packing": False},  # 8 synthetic rows: one sample per row
        "serve": {"http": {"port": port}, "models": [{
            "name": "m", "checkpoint": "@train", "ray_actor_options": {"num_cpus": 0.5},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]},
    })
    storage = storage_for(spec)
    write_shards(storage, Layout.from_spec(spec, storage.uri), "debug", n_rows=8)
    path = _spec_file(tmp_path, spec)
    env = {**os.environ, "SPHINX_X_HOME": str(tmp_path / "home"), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    for var in ("RAY_ADDRESS", "SPHINX_X_S3_ENDPOINT"):
        env.pop(var, None)
    child = subprocess.Popen([str(VENV_BIN / "sphinx-x"), "run", path, "--stages", "train,serve"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        for line in child.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                serving.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert serving.wait(480), "never served:\n" + "".join(lines[-40:])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
            assert resp.status == 200
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(timeout=30)
        took = time.monotonic() - t0
        assert child.returncode in (0, 130), "".join(lines[-40:])
        assert took < 30
        out = "".join(lines)
        assert "Gracefully aborting" not in out, out[-3000:]
        assert "log file:" in out and "train " in out  # the log path and the progress line
        assert "TrainingReport(" not in out  # Ray Train's own dicts go to the log file
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
