"""Ingress pieces that need no live app: request schema, error mapping, API-key hashes."""

from __future__ import annotations

import pytest

from actors.serve import openai_api as oa
from actors.serve.ingress import _handle_error, hash_key, key_hashes_from_env
from models.errors import UserError


def test_request_schema_rejects_what_it_does_not_implement():
    req = oa.parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "x"}')
    assert req.stop_list() == ["x"] and req.requested_max_tokens() is None
    req = oa.parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2, '
                                b'"logprobs": true, "top_logprobs": 3, "seed": 5}')
    assert (req.n, req.logprobs, req.top_logprobs, req.seed) == (2, True, 3, 5)
    req.check_logprobs()
    with pytest.raises(oa.ApiError, match="logprobs"):
        oa.parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                              b'"top_logprobs": 3}').check_logprobs()
    for body, param in [(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}', "n"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}',
                         "top_logprobs"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}', "tools"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p")]:
        with pytest.raises(oa.ApiError) as info:
            oa.parse_chat_request(body)
        assert info.value.status == 400 and info.value.param == param
    body = oa.error_body(oa.ApiError(429, "busy", code="queue_full"))
    assert body == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}


def test_completion_and_chunks_carry_every_choice_and_logprobs():
    lp = [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]
    body = oa.completion("c1", "m", [{"text": "a", "finish_reason": "stop", "logprobs": lp},
                                     {"text": "bb", "finish_reason": "length", "logprobs": None}], 7, 3)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["logprobs"] == {"content": lp} and body["choices"][1]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    import json

    event = json.loads(oa.chunk("c1", "m", {"content": "a"}, index=1, logprobs=lp).removeprefix("data: "))
    assert event["choices"][0]["index"] == 1 and event["choices"][0]["logprobs"] == {"content": lp}


def test_handle_failures_map_to_429_and_503():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    assert _handle_error(BackPressureError(num_queued_requests=3, max_queued_requests=2)).status == 429
    assert _handle_error(RayActorError()).status == 503
    assert _handle_error(ValueError("boom")).status == 500


def test_api_keys_are_only_kept_as_hashes(monkeypatch):
    assert key_hashes_from_env(None) == []
    monkeypatch.setenv("SPHINX_X_KEYS_T", " a1 , b2 ")
    hashes = key_hashes_from_env("SPHINX_X_KEYS_T")
    assert hashes == [hash_key("a1"), hash_key("b2")] and "a1" not in "".join(hashes)
    monkeypatch.setenv("SPHINX_X_KEYS_T", "")
    with pytest.raises(UserError, match="SPHINX_X_KEYS_T"):
        key_hashes_from_env("SPHINX_X_KEYS_T")
