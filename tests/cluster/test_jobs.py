"""cluster.jobs without a cluster: what a submission carries, address resolution, clear errors.
(The real Ray Jobs round trip — submit, logs, status, failure — is in tests/pipelines/test_run.py.)"""

from __future__ import annotations

import socket

import pytest

from cluster import jobs
from cluster.spec import load_spec, parse_spec
from models.errors import UserError
from pipelines.cli import main


def test_working_dir_has_the_project_and_the_spec_but_no_venv_or_git(tmp_path, monkeypatch):
    fake = tmp_path / "project"
    for rel in ["cluster/spec.py", "pipelines/cli.py", "models/x.py", ".venv/bin/python", ".git/HEAD",
                "runs/demo/report.md", "pipelines/__pycache__/cli.cpython-311.pyc", "sphinx_x.egg-info/PKG-INFO",
                "cluster/weights.safetensors"]:
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text("x")
    monkeypatch.setattr(jobs, "PROJECT_ROOT", fake)
    spec = parse_spec({"name": "wd", "cluster": {"worker_groups": [{"name": "cpu"}]}, "data": {"group": "cpu"}})
    out = jobs.stage_working_dir(spec, tmp_path / "staged")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["cluster/spec.py", "job-spec.yaml", "models/x.py", "pipelines/cli.py"]
    assert load_spec(out / "job-spec.yaml") == spec


def test_runtime_env_names_working_dir_excludes_and_env():
    env = jobs.runtime_env(jobs.PROJECT_ROOT, {"AWS_REGION": "eu-west-1"})
    assert env["working_dir"] == str(jobs.PROJECT_ROOT)
    assert {".venv", ".git", "runs", "__pycache__"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_REGION": "eu-west-1"}


def test_worker_env_has_endpoint_but_no_secret(make_spec, monkeypatch, s3):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-xyz")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "very-secret-token-xyz")
    env = jobs.worker_env(make_spec())
    assert env["SPHINX_X_S3_ENDPOINT"] == s3.endpoint_url
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_REQUIRED"
    assert not {"very-secret-value-xyz", "very-secret-token-xyz"} & set(env.values())


def test_worker_env_for_aws_contacts_nothing(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-xyz")
    spec = parse_spec({"storage": {"uri": "s3://no-such-bucket-anywhere/x", "endpoint_url": None,
                                   "region": "eu-west-1"}})
    env = jobs.worker_env(spec)
    assert env["AWS_REGION"] == "eu-west-1" and "very-secret-value-xyz" not in env.values()


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    remote = parse_spec({"cluster": {"address": "http://head:8265"}})
    local = parse_spec({})
    assert jobs.resolve_address("http://a:8265/", local) == "http://a:8265"
    assert jobs.resolve_address(None, remote) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert jobs.resolve_address(None, remote) == "http://env:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a Jobs address
    assert jobs.resolve_address(None, remote) == "http://head:8265"
    with pytest.raises(UserError, match="no Ray Jobs address"):
        jobs.resolve_address(None, local)
    with pytest.raises(UserError, match="dashboard"):
        jobs.resolve_address("ray://head:10001", local)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_dashboard_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["jobs", "list", "--address", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the Ray Jobs API at {url}") and err.count("\n") == 1


@pytest.mark.parametrize("text, token", [
    ("Failed to connect to Ray at address: http://127.0.0.1:40197.", False),  # a port, not a status
    ("Failed to connect to Ray at address: http://10.0.4.1:8265.", False),
    ("Request failed with status code 401: Unauthorized", True),
    ("HTTP 401", True),
    ("missing auth token", True),
])
def test_only_a_refusal_reads_as_needing_a_token(text, token):
    assert jobs._needs_token(RuntimeError(text)) is token


def test_jobs_needs_a_job_id_and_an_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs", "status"]) == 1
    assert "no Ray Jobs address" in capsys.readouterr().err


def test_error_summary_keeps_the_end_of_the_message():
    result = jobs.JobResult("raysubmit_1", "FAILED", "\n".join(f"line {i}" for i in range(100)) + "\nerror: boom")
    summary = jobs.error_summary(result, limit_lines=5)
    assert summary.splitlines()[-1] == "error: boom" and len(summary.splitlines()) == 5
    assert jobs.error_summary(jobs.JobResult("x", "STOPPED")) == "job ended STOPPED"


def test_a_head_that_needs_a_token_is_answered_with_how_to_give_it(monkeypatch):
    import ray.job_submission

    def refuse(address):
        raise RuntimeError("Request failed with status code 401: Unauthorized: missing auth token")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    with pytest.raises(UserError, match="RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH"):
        jobs.connect("http://127.0.0.1:8265")


# ---------------------------------------------------------------- what a job brings to a stock cluster


def test_a_stock_cluster_gets_the_pins_as_the_jobs_pip_and_the_image_gets_none():
    from cluster import pins

    image = parse_spec({})
    stock = parse_spec({"cluster": {"dependencies": "runtime_env"}})
    assert jobs.job_pip(image) is None
    assert jobs.job_pip(stock) == pins.job_pip()
    env = jobs.runtime_env(jobs.PROJECT_ROOT, {}, pip=jobs.job_pip(stock))
    assert env["pip"]["packages"][0] == "torch==2.13.0"
    assert env["config"]["setup_timeout_seconds"] == jobs.SETUP_TIMEOUT_S > 600  # Ray's default is 600
    assert "pip" not in jobs.runtime_env(jobs.PROJECT_ROOT, {}, pip=jobs.job_pip(image))


class _Client:
    def __init__(self, ray_version=None, states=()):
        self._server_ray_version = ray_version
        self.states = list(states)

    def get_job_info(self, job_id):
        import types

        return types.SimpleNamespace(status=self.states.pop(0) if len(self.states) > 1 else self.states[0],
                                     message="")


def test_a_stock_cluster_on_another_ray_is_refused_before_anything_is_submitted(caplog):
    stock = parse_spec({"cluster": {"dependencies": "runtime_env"}})
    with pytest.raises(UserError, match=r"cluster runs Ray 2\.55\.0.*ray\[default\]==2\.60\.0"):
        jobs.check_ray_version(_Client("2.55.0"), stock)
    assert jobs.check_ray_version(_Client("2.60.0"), stock) == "2.60.0"
    assert jobs.check_ray_version(_Client(None), stock) is None
    # with the image, the image decides: a warning only
    assert jobs.check_ray_version(_Client("2.55.0"), parse_spec({})) == "2.55.0"
    assert "the cluster runs Ray 2.55.0" in caplog.text


def test_wait_started_says_once_why_a_job_is_pending(monkeypatch):
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    clock = iter(range(0, 100, 2))
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    told = []
    result, waited = jobs.wait_started(_Client(states=["PENDING"] * 5 + ["RUNNING"]), "raysubmit_x",
                                       on_wait=told.append)
    assert result.status == "RUNNING" and waited == 12 and told == [6]
    with pytest.raises(UserError, match="still PENDING after 3s"):
        jobs.wait_started(_Client(states=["PENDING"]), "raysubmit_y", timeout_s=3)
