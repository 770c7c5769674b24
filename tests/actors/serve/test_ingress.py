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


# ---------------------------------------------------------------- client errors are 400s (issue 24)

_OK = b'"model": "m", "messages": [{"role": "user", "content": "hi"}]'


def _status(body: bytes) -> tuple[int, str]:
    try:
        req = oa.parse_chat_request(body)
        req.check_logprobs()
        req.check_sampling()
    except oa.ApiError as err:
        message = oa.error_body(err)["error"]["message"]
        assert "0x" not in message and "Traceback" not in message
        return err.status, message
    return 200, ""


@pytest.mark.parametrize("body", [
    b"{" + _OK + b', "n": 2, "temperature": 0}',
    b"{" + _OK + b', "seed": 18446744073709551616}',
    b"{" + _OK + b', "seed": 9223372036854775808}',
    b"{" + _OK + b', "max_tokens": ' + b"9" * 5000 + b"}",
    b"{" + _OK + b', "temperature": 1e400}',
    b"{" + _OK + b', "temperature": NaN}',
    b"{" + _OK + b', "top_p": Infinity}',
    b"{" + _OK + b', "user": ' + b"[" * 10000 + b"]" * 10000 + b"}",
    b"[" * 100000 + b"]" * 100000,
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "m", "messages": "hi"}',
    b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]}',
    b"{" + _OK + b', "n": "2"x}',
    b"\xff\xfe",
])
def test_client_errors_are_400_without_addresses(body):
    status, message = _status(body)
    assert status == 400 and message


def test_valid_edge_values_pass():
    assert _status(b"{" + _OK + b', "n": 2, "temperature": 0.7, "seed": 9223372036854775807}')[0] == 200
    assert _status(b"{" + _OK + b', "seed": -1}')[0] == 200


def test_error_messages_lose_heap_addresses_and_tracebacks():
    body = oa.error_body(oa.ApiError(400, "bad <_io.BytesIO object at 0x7f3a2c1b9e50> and 0xdeadbeef00"))
    assert "0x" not in body["error"]["message"]
    body = oa.error_body(oa.ApiError(500, "boom\nTraceback (most recent call last):\n  File ..."))
    assert body["error"]["message"] == "boom"


def test_only_json_content_type():
    oa.check_json_content_type("application/json")
    oa.check_json_content_type("Application/JSON; charset=utf-8")
    for ct in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None):
        with pytest.raises(oa.ApiError) as info:
            oa.check_json_content_type(ct)
        assert info.value.status == 415


def test_loopback_hosts():
    from actors.serve.ingress import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "my-head", "::"))


def test_answer_boxes_are_pixels_of_the_image_and_ride_on_the_message():
    from models.tiling import TileSpec

    text = "<p>the cat</p> [0.10,0.30,0.60,0.70] and [0.00,0.00,1.00,1.00]"
    release = TileSpec(grid=2, tile_size=512, pad="centre", skip_tokens=False)  # 1000×500 -> 1024×512 at y0 256
    assert oa.answer_boxes(text, (1000, 500), release) == [
        {"phrase": "the cat", "boxes": [[100.0, 50.0, 600.0, 450.0]]},
        {"phrase": None, "boxes": [[0.0, 0.0, 1000.0, 500.0]]}]        # the padding is clipped away
    paper = TileSpec(grid=2, tile_size=224)                             # 1000×500 -> 448×224 at (0, 0)
    # y1 = 0.3·448·500/224 = 300; y2 = 0.7·448·500/224 = 700, below the image: clipped to 500
    assert oa.answer_boxes(text, (1000, 500), paper)[0]["boxes"] == [[100.0, 300.0, 600.0, 500.0]]
    body = oa.completion("c1", "m", [{"text": text, "boxes": [{"phrase": None, "boxes": [[1.0, 2.0, 3.0, 4.0]]}]},
                                     {"text": "no image"}], 7, 3)
    assert body["choices"][0]["message"]["boxes"] == [{"phrase": None, "boxes": [[1.0, 2.0, 3.0, 4.0]]}]
    assert "boxes" not in body["choices"][1]["message"]
