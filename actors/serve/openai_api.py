"""OpenAI chat-completions wire format: request schema, response/chunk builders, error JSON.

Only what `/v1/chat/completions` and `/v1/models` need, validated strictly: a field we do not
implement is a 400 naming it, never silently ignored.

    >>> req = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    >>> req.model, req.messages[0].content
    ('m', 'hi')
    >>> error_body(ApiError(404, "no such model", code="model_not_found", param="model"))["error"]["type"]
    'invalid_request_error'

Every user problem becomes an :class:`ApiError` with an HTTP status and OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``; every client error is a 400 (bad JSON,
integers over 4300 digits, nesting too deep, NaN/Infinity, lone surrogates, wrong types, a
seed outside int64, ``n > 1`` with greedy sampling), and :func:`error_body` strips heap
addresses (``0x7f...``) and traceback lines from every message.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error the API returns as OpenAI error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, code: Optional[str] = None, param: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")


_ADDRESS_RE = re.compile(r"\s*\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")
MAX_MESSAGE_CHARS = 1000


def clean_message(message: str) -> str:
    """An error message fit for a client: no heap addresses, no traceback, at most 1000 chars.

    >>> clean_message("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>")
    'cannot identify image file <_io.BytesIO object>'
    """
    text = _ADDRESS_RE.sub("", str(message))
    if "Traceback" in text:
        text = text.split("Traceback", 1)[0].rstrip() or "the request failed"
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def error_body(err: ApiError) -> dict:
    return {"error": {"message": clean_message(err.message), "type": err.type, "param": err.param,
                      "code": err.code}}


def check_json_content_type(content_type: Optional[str]) -> None:
    """POST bodies must be ``application/json`` (a cross-site form or text/plain POST is a 415).

    >>> check_json_content_type("application/json; charset=utf-8")
    """
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {mime or 'none'!r}",
                       code="unsupported_media_type")


# ---------------------------------------------------------------- request schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]], None]
    name: Optional[str] = None

    def parts(self) -> list[Union[TextPart, ImagePart]]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        return list(self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    # plain text is what this endpoint returns anyway (lmms-eval sends it); json_* would change it
    type: Literal["text"]


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's range (int64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=8)
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="vLLM's extension: decode max_tokens tokens (benchmarks)")
    # accepted for client compatibility only at their neutral values
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    presence_penalty: float = Field(0.0, ge=0, le=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        # the official API takes null for "the default" (evaluation clients send it)
        return value if value is not None else cls.model_fields[info.field_name].default

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed", param="stop", code="invalid_value")
        if any(s == "" for s in stops):
            raise ApiError(400, "stop sequences must not be empty", param="stop", code="invalid_value")
        return stops

    def check_logprobs(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")

    def check_sampling(self) -> None:
        """vLLM's own rule: greedy decoding (temperature < 1e-5) returns one choice."""
        if self.n > 1 and self.temperature < GREEDY_EPS:
            raise ApiError(400, f"n must be 1 when using greedy sampling (temperature 0), got {self.n}",
                           param="n", code="invalid_value")

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


GREEDY_EPS = 1e-5  # vllm.sampling_params._SAMPLING_EPS
MAX_JSON_DEPTH = 64


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_depth_and_text(value: Any) -> None:
    """Nesting over MAX_JSON_DEPTH or a string that is not valid Unicode (a lone surrogate
    such as "\\ud800") → 400. Iterative: a 10000-deep body cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request body has a string that is not valid Unicode (a lone surrogate)",
                               code="invalid_json") from None
        elif isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def parse_chat_request(body: bytes) -> ChatRequest:
    """Bytes of a request body → :class:`ChatRequest`, or a 400 :class:`ApiError` (CPU-bound
    on big bodies: the ingress calls it in a thread)."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    except ValueError as err:  # NaN / Infinity, integers over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {str(err).splitlines()[0][:200]}",
                       code="invalid_json") from None
    _check_depth_and_text(data)
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        param = ".".join(str(p) for p in e["loc"]) or None
        msg = "unknown or unsupported field" if e["type"] == "extra_forbidden" else e["msg"]
        raise ApiError(400, f"{param}: {msg}", param=param, code="invalid_value") from None


# ---------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def answer_boxes(text: str, size: tuple[int, int], spec: Any) -> list[dict]:
    """The boxes of an answer in pixels of the W×H image (``message.boxes``, docs/interfaces.md
    "Boxes in answers"): ``models.boxes.parse_boxes`` then ``from_canvas`` with the member's
    ``models.tiling.TileSpec``, rounded to 0.01 px.

    Before: ``"<p>the cat</p> [0.10,0.30,0.60,0.70]"``, 1000×500, a 1024 canvas padded ``centre``.
    After: ``[{"phrase": "the cat", "boxes": [[100.0, 50.0, 600.0, 450.0]]}]``.
    """
    from models.boxes import from_canvas, parse_boxes

    return [{"phrase": g.phrase, "boxes": [[round(v, 2) for v in from_canvas(b, size, spec)] for b in g.boxes]}
            for g in parse_boxes(text)]


def _message(c: dict) -> dict:
    message = {"role": "assistant", "content": c["text"]}
    if c.get("boxes") is not None:
        message["boxes"] = c["boxes"]
    return message


def completion(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole completion; ``choices`` as the replica returns them (``text``, ``finish_reason``,
    ``logprobs``: OpenAI's ``content`` list or None, ``boxes`` when the request had an image:
    :func:`answer_boxes`, the message's extra field)."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": _message(c),
                     "finish_reason": c.get("finish_reason", "stop"),
                     "logprobs": None if c.get("logprobs") is None else {"content": c["logprobs"]}}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, delta: dict, finish_reason: Optional[str] = None,
          usage_: Optional[dict] = None, choices: bool = True, index: int = 0,
          logprobs: Optional[list] = None) -> str:
    """One SSE event ``data: {...}\\n\\n`` of a streamed completion (choice ``index``)."""
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                     "logprobs": None if logprobs is None else {"content": logprobs}}] if choices else [],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(err: ApiError) -> str:
    return f"data: {json.dumps(error_body(err))}\n\n"


def model_list(names: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "sphinx-x"} for n in names]}
