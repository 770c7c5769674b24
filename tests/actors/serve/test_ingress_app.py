"""The ingress's FastAPI app with stub model handles (no Ray): order of checks, 415, 429, pixels.

The routes are the Serve ingress's own (``actors.serve.ingress.app``); Serve finds the
instance through ``serve.get_replica_context().servable_object``, which the fixture points at
an Ingress built with stub DeploymentHandles.
"""

from __future__ import annotations

import asyncio
import base64
import io
import types

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from actors.serve.ingress import Ingress, app, hash_key
from cluster.spec import parse_spec

KEY = "sk-test"


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, payload):
        return self.fn(payload)


class StubHandle:
    """A DeploymentHandle stand-in: ``complete`` answers one fixed choice; records payloads."""

    def __init__(self):
        self.payloads: list[dict] = []
        self.complete = _Method(self._complete)
        self.chat = _Method(self._chat)

    async def _complete(self, payload):
        self.payloads.append(payload)
        return {"prompt_tokens": 3, "choices": [{"text": "ok", "finish_reason": "stop", "logprobs": None}],
                "completion_tokens": 1, "batch_size": 1}

    async def _chat(self, payload):
        self.payloads.append(payload)
        yield {"prompt_tokens": 3}
        yield {"index": 0, "delta": "ok", "logprobs": None, "finish_reason": "stop", "completion_tokens": 1}
        yield {"done": True, "completion_tokens": 1, "batch_size": 1}

    def options(self, **_):
        return self


def make_ingress(serve: dict, keys: list[str] = ()):
    spec = parse_spec({"storage": {"uri": "s3://bkt/run", "endpoint_url": "embedded"}, "serve": serve})
    cls = Ingress.func_or_class
    inst = object.__new__(cls)
    handle = StubHandle()
    cls.__mro__[1].__init__(inst, spec.serve, spec.storage, {"m": handle}, [hash_key(k) for k in keys])
    return inst, handle


@pytest.fixture
def served(monkeypatch):
    """(TestClient, set(serve section dict, keys) → (ingress, stub handle))."""
    import ray.serve

    current = {}

    def use(serve: dict | None = None, keys: list[str] = ()):
        current["inst"], handle = make_ingress(serve or {}, keys)
        return current["inst"], handle

    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: types.SimpleNamespace(
        servable_object=current["inst"]))
    use()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, use


def _png(w, h) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(content, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "0x" not in err["message"] and "Traceback" not in err["message"]
    return err


def test_json_answers_and_streams(served):
    client, _ = served
    out = client.post("/v1/chat/completions", json=_chat("hi"))
    assert out.status_code == 200 and out.json()["choices"][0]["message"]["content"] == "ok"
    text = client.post("/v1/chat/completions", json=_chat("hi", stream=True)).text
    assert "data: [DONE]" in text
    assert client.get("/healthz").json()["status"] == "ok"


def test_only_json_posts(served):
    client, use = served
    _, handle = use()
    for ct, body in [("application/x-www-form-urlencoded", "model=m"), ("text/plain", '{"model": "m"}')]:
        err = _error(client.post("/v1/chat/completions", content=body, headers={"content-type": ct}), 415)
        assert err["code"] == "unsupported_media_type"
    assert handle.payloads == []


def test_bad_bodies_are_400(served):
    client, _ = served
    h = {"content-type": "application/json"}
    for body in [b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3, "temperature": 0}',
                 b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}',
                 b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"7" * 5000 + b"}",
                 b"[" * 10000 + b"]" * 10000, b'{"model": "m", "temperature": NaN}',
                 b'{"model": "m", "messages": [{"role": "user", "content": "\\udc80"}]}']:
        _error(client.post("/v1/chat/completions", content=body, headers=h), 400)


def test_auth_before_anything_and_queue_full_is_429(served):
    client, use = served
    inst, handle = use({"ingress_max_ongoing_requests": 1, "ingress_max_queued_requests": 0}, keys=[KEY])
    assert _error(client.post("/v1/chat/completions", json=_chat("hi")), 401)["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}
    held = asyncio.run(inst.gate.acquire())  # the one slot is taken
    resp = client.post("/v1/chat/completions", json=_chat("hi"), headers=auth)
    assert _error(resp, 429)["code"] == "queue_full" and resp.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 200  # health is not behind the gate
    held.release()
    assert client.post("/v1/chat/completions", json=_chat("hi"), headers=auth).status_code == 200
    assert inst.gate.ongoing == 0
    client.post("/v1/chat/completions", json=_chat("hi", stream=True), headers=auth)
    assert inst.gate.ongoing == 0 and len(handle.payloads) == 2


def test_cheap_checks_before_any_fetch(served, monkeypatch):
    client, use = served
    inst, handle = use({"max_images_per_request": 2})

    def no_fetch(url):
        raise AssertionError("fetched an image of a request that cheap checks refuse")

    monkeypatch.setattr(inst, "_image", no_fetch)
    img = {"type": "image_url", "image_url": {"url": _png(4, 4)}}
    s3 = {"type": "image_url", "image_url": {"url": "s3://bkt/run/train/export/llm/model.safetensors"}}
    assert _error(client.post("/v1/chat/completions", json=_chat([img, img, img])), 400)["code"] == "too_many_images"
    assert _error(client.post("/v1/chat/completions", json=_chat([img], max_tokens=10**9)), 400)["param"] \
        == "max_tokens"
    assert _error(client.post("/v1/chat/completions", json=_chat([img, s3])), 400)["code"] == "image_host_not_allowed"
    assert handle.payloads == []


def test_total_pixel_budget(served):
    client, use = served
    _, handle = use({"max_image_pixels": 10_000, "max_request_pixels": 15_000})
    one = {"type": "image_url", "image_url": {"url": _png(100, 100)}}
    assert client.post("/v1/chat/completions", json=_chat([one, {"type": "text", "text": "?"}])).status_code == 200
    err = _error(client.post("/v1/chat/completions", json=_chat([one, one])), 400)
    assert err["code"] == "image_too_large" and "max_request_pixels" in err["message"]
    assert _error(client.post("/v1/chat/completions", json=_chat([
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}])), 400)["code"] \
        == "invalid_image"
    assert len(handle.payloads) == 1


def test_open_endpoint_warns(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="actors.serve.ingress"):
        make_ingress({"http": {"host": "0.0.0.0"}})
    assert "NO API keys" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actors.serve.ingress"):
        make_ingress({"http": {"host": "0.0.0.0"}}, keys=[KEY])
        make_ingress({"http": {"host": "127.0.0.1"}})
    assert "NO API keys" not in caplog.text


def test_boxes_ride_on_the_message_and_on_the_finish_chunk(served):
    """The replica's ``boxes`` reach the client unchanged: ``message.boxes`` in a JSON answer,
    ``delta.boxes`` in the choice's finish chunk of a stream (docs/interfaces.md "Boxes in answers")."""
    import json

    client, use = served
    _, handle = use()
    boxes = [{"phrase": "the cat", "boxes": [[10.0, 5.0, 60.0, 20.0]]}]

    async def complete(payload):
        return {"prompt_tokens": 3, "completion_tokens": 1, "batch_size": 1, "choices": [
            {"text": "<p>the cat</p> [0.10,0.30,0.60,0.45]", "finish_reason": "stop", "logprobs": None,
             "boxes": boxes}]}

    async def chat(payload):
        yield {"prompt_tokens": 3}
        yield {"index": 0, "delta": "<p>the cat</p> [0.10,0.30,0.60,0.45]", "logprobs": None}
        yield {"index": 0, "delta": "", "logprobs": None, "finish_reason": "stop", "completion_tokens": 1,
               "boxes": boxes}
        yield {"done": True, "completion_tokens": 1, "batch_size": 1}

    handle.complete, handle.chat = _Method(complete), _Method(chat)
    ask = _chat([{"type": "image_url", "image_url": {"url": _png(100, 50)}}, {"type": "text", "text": "where?"}])
    message = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]
    assert message["boxes"] == boxes and message["content"].startswith("<p>the cat</p>")
    events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json={**ask, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    (finish,) = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finish["delta"] == {"boxes": boxes}
    assert all("boxes" not in e["choices"][0]["delta"] for e in events if e["choices"] and e["choices"][0] is not finish)
