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


def test_a_som_sample_carries_the_teachers_answer_and_request(stub, tmp_path):
    import io

    from PIL import Image

    from actors.curate.som import TEACHER_QUESTION, SomConfig, curate_image
    from cluster.spec import SomCurate, StorageSection
    from cluster.storage import open_storage

    url, seen = stub
    storage = open_storage(StorageSection(uri=str(tmp_path), endpoint_url=None))
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(buf, format="PNG")
    storage.write_bytes(storage.path("s.png"), buf.getvalue())
    item = {"id": "s:1", "image": storage.path("s.png"), "width": 64, "height": 48,
            "annotations": [{"id": 1, "category_id": 1, "bbox": [8, 8, 30, 30]}]}

    def config(model):
        return SomConfig(section=SomCurate(annotations="a.json", images=".", teacher={"url": url, "model": model}),
                         categories={1: "dog"}, max_image_bytes=2**20, max_image_pixels=10**7)

    (out,) = curate_image(item, config("teacher"), storage)
    record = out.records[0]
    assert record["teacher"]["model"] == "teacher" and record["teacher"]["request"]["model"] == "teacher"
    assert record["conversations"][-2:] == [{"from": "human", "value": TEACHER_QUESTION},
                                            {"from": "gpt", "value": "Mark 1: a dog."}]
    sent = seen[-1]["body"]["messages"][0]["content"][1]["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,")  # the marked picture, not the source
    (out,) = curate_image(item, config("broken"), storage)
    assert out.reason == "teacher_error" and "500" in out.detail
