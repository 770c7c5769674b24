"""The endpoint answer engine: benchmark requests to any OpenAI-compatible chat endpoint.

Both answer engines (this one and :mod:`actors.eval.batch_engine`) take the same requests and
return the same answers, so the scorer never knows which produced them::

    >>> engine = EndpointEngine(EndpointOptions(url="http://127.0.0.1:8000/v1", model="debug",
    ...                                         api_key_env="SPHINX_X_KEY", concurrency=8))
    >>> engine.answer([AnswerRequest(id="q0", messages=[{"role": "user", "content": [
    ...     {"type": "image"}, {"type": "text", "text": "What colour?"}]}], images=[png], max_tokens=8)])
    [Answer(id='q0', text='red', error=None)]

A request's messages are OpenAI-style; each image part (``{"type": "image"}``,
``{"type": "image", "index": i}`` or ``{"type": "image_url", ...}``) stands for the next of
``images`` (bytes), which travel as ``data:`` URLs. Greedy (``temperature: 0``). At most
``concurrency`` requests are in flight (an asyncio semaphore); a 429, 503 or a dropped
connection is retried with exponential backoff (``retries`` times); any other failure is that
request's ``error`` (never an exception for the whole run).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from models.errors import UserError

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 503)


@dataclass(frozen=True)
class AnswerRequest:
    """One prompt to answer: OpenAI-style ``messages`` whose image parts stand for ``images`` in order."""

    id: str
    messages: list[dict]
    images: list[bytes] = field(default_factory=list)
    max_tokens: int = 32


@dataclass(frozen=True)
class Answer:
    """The model's text for request ``id``; ``error`` (and text "") when it could not be answered.

    The endpoint engine also fills ``latency_s`` (the answered request, retries included),
    ``attempts`` (1 + the retries after a 429/5xx/lost connection), ``finish_reason``,
    ``prompt_tokens`` and ``completion_tokens``, and with ``EndpointOptions.logprobs`` the answer's
    per-token strings (``tokens``, OpenAI ``logprobs.content[i].token``; the demo's parity check)."""

    id: str
    text: str
    error: Optional[str] = None
    latency_s: Optional[float] = None
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    attempts: Optional[int] = None
    tokens: Optional[tuple[str, ...]] = None

    def extras(self) -> dict:
        """The optional fields that are set, for a predictions row."""
        return {k: v for k, v in (("latency_s", self.latency_s), ("attempts", self.attempts),
                                  ("finish_reason", self.finish_reason), ("prompt_tokens", self.prompt_tokens),
                                  ("completion_tokens", self.completion_tokens), ("tokens", self.tokens))
                if v is not None}


@dataclass(frozen=True)
class EndpointOptions:
    """Where and how to ask (``eval.endpoint`` of the spec, or the one-off verb's flags)."""

    url: str  # the API base, e.g. http://host:8000/v1 (a bare http://host:8000 gets /v1)
    model: str
    api_key_env: Optional[str] = None  # the environment variable holding the key
    concurrency: int = 8
    retries: int = 5
    backoff_s: float = 0.5  # first retry delay; doubles each time (plus jitter)
    timeout_s: float = 300.0
    logprobs: bool = False  # ask for the answer's tokens (Answer.tokens)


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, by magic number (PNG, JPEG, GIF, WebP, BMP)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM":
        return "image/bmp"
    return "application/octet-stream"


def data_url(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def openai_messages(messages: list[dict], images: list[bytes]) -> list[dict]:
    """The request's messages with every image part replaced by an ``image_url`` part holding the
    next image as a ``data:`` URL (an ``image`` part with an ``index`` takes that image)."""
    out, k = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(dict(m))
            continue
        parts = []
        for part in content:
            if _is_image(part):
                i = part.get("index", k) if part.get("type") == "image" else k
                if i >= len(images):
                    raise UserError(f"a message has more image parts than the request's {len(images)} image(s)")
                parts.append({"type": "image_url", "image_url": {"url": data_url(images[i])}})
                k += 1
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out


def api_base(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    return base if base.endswith("/v1") else base + "/v1"


def api_key(env: Optional[str]) -> str:
    if not env:
        return "none"  # the client insists on a key; an open endpoint ignores it
    key = os.environ.get(env)
    if not key:
        raise UserError(f"eval.endpoint.api_key_env names {env!r}, which is not set in the environment")
    return key


class EndpointEngine:
    """Answers through an OpenAI-compatible endpoint with the official ``openai`` client."""

    def __init__(self, options: EndpointOptions, *, on_answer: Optional[Callable[[Answer], None]] = None,
                 transport: Any = None):
        if options.concurrency < 1:
            raise UserError(f"endpoint concurrency must be at least 1, got {options.concurrency}")
        self.options = options
        self.on_answer = on_answer
        self._key = api_key(options.api_key_env)
        self._transport = transport  # an httpx transport (tests); None: the network

    def answer(self, requests: list[AnswerRequest]) -> list[Answer]:
        """Answers in the order of ``requests``."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._answer_all(requests))
        # called from inside an event loop (a notebook, an async caller): run in a thread of our own
        result: list = []
        thread = threading.Thread(target=lambda: result.append(asyncio.run(self._answer_all(requests))))
        thread.start()
        thread.join()
        return result[0]

    async def _answer_all(self, requests: list[AnswerRequest]) -> list[Answer]:
        import httpx
        import openai

        from cluster.logs import Progress

        limits = httpx.Limits(max_connections=self.options.concurrency + 2)
        async with httpx.AsyncClient(limits=limits, timeout=self.options.timeout_s, transport=self._transport) as http:
            client = openai.AsyncOpenAI(base_url=api_base(self.options.url), api_key=self._key, max_retries=0,
                                        timeout=self.options.timeout_s, http_client=http)
            gate = asyncio.Semaphore(self.options.concurrency)
            with Progress("eval answers", total=len(requests), unit="prompts") as progress:
                done = [0]

                async def one(req: AnswerRequest) -> Answer:
                    async with gate:
                        ans = await self._ask(client, req)
                    done[0] += 1
                    progress.update(done[0])
                    if self.on_answer is not None:
                        self.on_answer(ans)
                    return ans

                return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _ask(self, client: Any, req: AnswerRequest) -> Answer:
        import openai

        try:
            messages = openai_messages(req.messages, req.images)
        except UserError as err:
            return Answer(req.id, "", str(err))
        delay = self.options.backoff_s
        extra = {"logprobs": True} if self.options.logprobs else {}
        t0 = time.perf_counter()
        for attempt in range(self.options.retries + 1):
            try:
                out = await client.chat.completions.create(model=self.options.model, messages=messages,
                                                           max_tokens=req.max_tokens, temperature=0, **extra)
                choice = out.choices[0]
                content = choice.logprobs.content if self.options.logprobs and choice.logprobs else None
                return Answer(req.id, choice.message.content or "", latency_s=time.perf_counter() - t0,
                              attempts=attempt + 1, finish_reason=choice.finish_reason,
                              prompt_tokens=out.usage.prompt_tokens if out.usage else None,
                              completion_tokens=out.usage.completion_tokens if out.usage else None,
                              tokens=tuple(t.token for t in content or ()) if self.options.logprobs else None)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
                status = getattr(err, "status_code", None)
                retriable = status is None or status in RETRY_STATUS
                if not retriable or attempt == self.options.retries:
                    return Answer(req.id, "", _describe(err))
                log.debug("request %s: %s, retry %d in %.1fs", req.id, _describe(err), attempt + 1, delay)
                await asyncio.sleep(delay * (1 + 0.25 * random.random()))
                delay *= 2
            except openai.APIStatusError as err:  # 400, 401, 404, ...: the request's own answer
                if err.status_code in (401, 403, 404):
                    raise UserError(f"the endpoint {self.options.url} refused model {self.options.model!r}: "
                                    f"{_describe(err)}") from None
                return Answer(req.id, "", _describe(err))
        raise AssertionError("unreachable")


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    message = getattr(err, "message", None) or str(err)
    return f"HTTP {status}: {message}" if status else f"{type(err).__name__}: {message}"
