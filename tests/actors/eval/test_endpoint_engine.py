"""The endpoint engine against an in-process fake OpenAI endpoint (httpx.MockTransport: no server)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from actors.eval.endpoint_engine import (Answer, AnswerRequest, EndpointEngine, EndpointOptions, api_base,
                                         openai_messages)
from models.errors import UserError


def _png(colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, "PNG")
    return buf.getvalue()


def _completion(text: str) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _req(i: int, images=()) -> AnswerRequest:
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"question {i}"}]
    return AnswerRequest(id=f"q{i}", messages=[{"role": "user", "content": parts}], images=list(images),
                         max_tokens=4)


def test_messages_carry_images_as_data_urls_in_order():
    a, b = _png((1, 2, 3)), _png((4, 5, 6))
    msgs = openai_messages([{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"},
                                                         {"type": "image_url", "image_url": {"url": "ignored"}}]}],
                           [a, b])
    assert msgs[0] == {"role": "system", "content": "be brief"}
    urls = [p["image_url"]["url"] for p in msgs[1]["content"] if p["type"] == "image_url"]
    assert urls == [f"data:image/png;base64,{base64.b64encode(x).decode()}" for x in (a, b)]
    with pytest.raises(UserError, match="more image parts"):
        openai_messages([{"role": "user", "content": [{"type": "image"}]}], [])


def test_api_base_accepts_the_common_spellings():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/chat/completions") == "http://h:8000/v1"


def test_greedy_requests_bounded_concurrency_and_order(monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", "secret")
    seen, active, peak = [], [0], [0]

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.headers["authorization"] == "Bearer secret"
        seen.append(body)
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.01)
        active[0] -= 1
        return httpx.Response(200, json=_completion(body["messages"][0]["content"][-1]["text"].upper()))

    engine = EndpointEngine(EndpointOptions(url="http://fake:1", model="m", api_key_env="EVAL_TEST_KEY",
                                            concurrency=3), transport=httpx.MockTransport(handler))
    reqs = [_req(i, images=[_png()] if i % 2 else []) for i in range(10)]
    out = engine.answer(reqs)
    assert [(a.id, a.text, a.error) for a in out] == [(f"q{i}", f"QUESTION {i}", None) for i in range(10)]
    assert all(a.latency_s >= 0.01 and a.finish_reason == "stop" and a.prompt_tokens == 1 and a.tokens is None
               for a in out)
    assert peak[0] == 3
    assert all(b["temperature"] == 0 and b["max_tokens"] == 4 and b["model"] == "m" for b in seen)
    with_image = [b for b in seen if b["messages"][0]["content"][0]["type"] == "image_url"]
    assert len(with_image) == 5 and with_image[0]["messages"][0]["content"][0]["image_url"]["url"].startswith(
        "data:image/png;base64,")


def test_429_and_503_are_retried_with_backoff_other_errors_are_the_answer():
    calls: dict[str, int] = {}
    stamps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][0]["content"][-1]["text"]
        calls[text] = calls.get(text, 0) + 1
        if text == "question 0" and calls[text] <= 2:
            stamps.append(time.monotonic())
            return httpx.Response(429 if calls[text] == 1 else 503, json={"error": {"message": "busy"}})
        if text == "question 1":
            return httpx.Response(400, json={"error": {"message": "image too large"}})
        if text == "question 2":
            return httpx.Response(503, json={"error": {"message": "down"}})
        return httpx.Response(200, json=_completion("ok"))

    engine = EndpointEngine(EndpointOptions(url="http://fake:1/v1", model="m", retries=2, backoff_s=0.05),
                            transport=httpx.MockTransport(handler))
    out = engine.answer([_req(0), _req(1), _req(2), _req(3)])
    assert (out[0].text, out[0].error) == ("ok", None) and calls["question 0"] == 3
    assert out[0].latency_s >= 0.05 and out[0].attempts == 3  # the answered request's time, its retries included
    assert out[3].attempts == 1
    assert stamps[1] - stamps[0] >= 0.05
    assert out[1].text == "" and "400" in out[1].error and "image too large" in out[1].error
    assert out[2].error and "503" in out[2].error and calls["question 2"] == 3  # 1 + 2 retries
    assert (out[3].id, out[3].text, out[3].error) == ("q3", "ok", None)
    assert out[1].latency_s is None and out[1].extras() == {}


def test_logprobs_ask_for_and_keep_the_answer_tokens():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        completion = _completion(" 3\n")
        completion["choices"][0]["logprobs"] = {"content": [
            {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []} for t in (" 3", "\n", "###")]}
        completion["choices"][0]["finish_reason"] = "length"
        completion["usage"]["prompt_tokens"] = 37
        return httpx.Response(200, json=completion)

    engine = EndpointEngine(EndpointOptions(url="http://fake:1", model="m", logprobs=True),
                            transport=httpx.MockTransport(handler))
    (a,) = engine.answer([_req(0)])
    assert seen[0]["logprobs"] is True
    assert a.tokens == (" 3", "\n", "###") and a.prompt_tokens == 37 and a.finish_reason == "length"
    assert a.completion_tokens == 1 and a.attempts == 1
    assert set(a.extras()) == {"latency_s", "attempts", "finish_reason", "prompt_tokens", "completion_tokens", "tokens"}


def test_a_missing_key_or_unknown_model_is_a_user_error(monkeypatch):
    monkeypatch.delenv("EVAL_TEST_NO_KEY", raising=False)
    with pytest.raises(UserError, match="EVAL_TEST_NO_KEY"):
        EndpointEngine(EndpointOptions(url="http://fake:1", model="m", api_key_env="EVAL_TEST_NO_KEY"))
    engine = EndpointEngine(EndpointOptions(url="http://fake:1", model="nope"), transport=httpx.MockTransport(
        lambda r: httpx.Response(404, json={"error": {"message": "the model 'nope' does not exist"}})))
    with pytest.raises(UserError, match="nope"):
        engine.answer([_req(0)])
