"""actors.curate.teacher against a tiny OpenAI-compatible stub on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from actors.curate.teacher import TeacherError, describe
from cluster.spec import TeacherSection


@pytest.fixture
def stub():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status, answer = (500, {"error": "boom"}) if body["model"] == "broken" else \
                (200, {"model": "stub-teacher-7b", "choices": [{"message": {"role": "assistant",
                                                                             "content": " Mark 1: a dog. "}}]})
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_the_request_and_the_teacher_are_recorded(stub, monkeypatch):
    url, seen = stub
    monkeypatch.setenv("TEACHER_KEY", "k-123")
    out = describe(TeacherSection(url=url, model="teacher", api_key_env="TEACHER_KEY"), b"\x89PNG fake", "images/a.png")
    assert out["answer"] == "Mark 1: a dog." and out["model"] == "teacher" and out["answered_by"] == "stub-teacher-7b"
    assert out["request"]["messages"][0]["content"][1]["image_url"]["url"] == "images/a.png"  # no pixels in the record
    (req,) = seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k-123"
    assert req["body"]["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert req["body"]["temperature"] == 0


def test_a_failing_or_absent_teacher_is_a_teacher_error(stub):
    url, _ = stub
    with pytest.raises(TeacherError, match="answered 500"):
        describe(TeacherSection(url=url, model="broken"), b"png", "images/a.png")
    with pytest.raises(TeacherError, match="unreachable"):
        describe(TeacherSection(url="http://127.0.0.1:9/v1", model="m", timeout_s=2), b"png", "images/a.png")
