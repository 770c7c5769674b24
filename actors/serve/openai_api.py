"""OpenAI chat-completions wire format: request schema, response/chunk builders, error JSON.

Only what `/v1/chat/completions` and `/v1/models` need, validated strictly: a field we do not
implement is a 400 naming it, never silently ignored.

    >>> req = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    >>> req.model, req.messages[0].content
    ('m', 'hi')
    >>> error_body(ApiError(404, "no such model", code="model_not_found", param="model"))["error"]["type"]
    'invalid_request_error'

Every user problem becomes an :class:`ApiError` with an HTTP status and OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
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


def error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


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


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
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

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_chat_request(body: bytes) -> ChatRequest:
    """Bytes of a request body → :class:`ChatRequest`, or a 400 :class:`ApiError`."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
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


def completion(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole completion; ``choices`` as the replica returns them (``text``, ``finish_reason``,
    ``logprobs``: OpenAI's ``content`` list or None)."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
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
