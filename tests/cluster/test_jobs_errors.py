"""cluster.jobs with a fake Jobs client: the missing-dependency hint and the wait for the head's job
agent (no cluster needed; docs/security.md item 15)."""

from __future__ import annotations

import pytest

from cluster import jobs
from cluster.spec import parse_spec
from models.errors import UserError

NO_AGENT = RuntimeError("Request failed with status code 500: No available agent to submit job, "
                        "please try again later.")


class FakeClient:
    """``submit_job`` fails with each of ``errors`` in turn, then answers ``raysubmit_1``."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def submit_job(self, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        assert kwargs["entrypoint"] == "echo hi" and "working_dir" in kwargs["runtime_env"]
        return "raysubmit_1"


class Clock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(jobs.time, "monotonic", c.monotonic)
    monkeypatch.setattr(jobs.time, "sleep", c.sleep)
    return c


@pytest.fixture
def spec(tmp_path, monkeypatch):
    fake = tmp_path / "project"
    (fake / "cluster").mkdir(parents=True)
    (fake / "cluster" / "x.py").write_text("x")
    monkeypatch.setattr(jobs, "PROJECT_ROOT", fake)
    return parse_spec({"name": "j", "storage": {"uri": str(tmp_path / "store")}})


def test_submit_retries_while_the_job_agent_starts(clock, spec):
    client = FakeClient([NO_AGENT] * 5)
    assert jobs.submit(client, entrypoint="echo hi", spec=spec, env_vars={}) == "raysubmit_1"
    assert client.calls == 6 and clock.now == pytest.approx(5 * jobs.AGENT_POLL_S)


def test_submit_gives_up_after_a_minute_with_a_clear_error(clock, spec):
    client = FakeClient([NO_AGENT] * 1000)
    with pytest.raises(UserError, match=r"job agent did not start within 60s"):
        jobs.submit(client, entrypoint="echo hi", spec=spec, env_vars={})
    assert clock.now <= jobs.AGENT_WAIT_S and client.calls == int(jobs.AGENT_WAIT_S / jobs.AGENT_POLL_S) + 1


def test_submit_other_errors_are_not_retried(clock, spec):
    client = FakeClient([RuntimeError("Request failed with status code 400: bad runtime_env")])
    with pytest.raises(UserError, match=r"^submit: .*bad runtime_env"):
        jobs.submit(client, entrypoint="echo hi", spec=spec, env_vars={})
    assert client.calls == 1 and clock.now == 0


def test_missing_module_names_the_module_and_the_setting():
    message = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
               "Traceback (most recent call last):\n  File \"pipelines/cli.py\", line 3, in <module>\n"
               "    import pyarrow\nModuleNotFoundError: No module named 'pyarrow'\n")
    text = jobs.error_summary(jobs.JobResult("raysubmit_2", "FAILED", message))
    first = text.splitlines()[0]
    assert "no module 'pyarrow'" in first and "cluster.dependencies: runtime_env" in first
    assert text.endswith("ModuleNotFoundError: No module named 'pyarrow'")  # the original tail kept


def test_missing_module_found_in_logs_too_and_plain_failures_unchanged():
    text = jobs.error_summary(jobs.JobResult("r", "FAILED", "exit code 1"),
                              logs="ModuleNotFoundError: No module named 'ray.train'\n")
    assert "no module 'ray.train'" in text
    assert jobs.error_summary(jobs.JobResult("r", "FAILED", "ValueError: x")) == "ValueError: x"
    assert jobs.error_summary(jobs.JobResult("r", "STOPPED", "")) == "job ended STOPPED"
