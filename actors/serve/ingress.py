"""The HTTP front door: one FastAPI ingress deployment routing OpenAI requests by ``model``.

Routes: ``POST /v1/chat/completions`` (JSON or SSE with ``stream``), ``GET /v1/models``,
``GET /v1/stats`` (batch sizes seen per model), ``GET /healthz``.

The ingress does everything that needs no model, cheapest first: API keys (SHA-256 hashes of
the keys are its only knowledge of them), a JSON Content-Type (415 otherwise: no cross-site
form POST), a slot in its bounded queue (:mod:`actors.serve.request_gate`, 429 past it), the
body-size limit, JSON/schema validation (in a thread), the image count, max_tokens and every
image URL's policy; only then fetches images (:mod:`actors.serve.image_source`), reads their
headers and caps the request's total pixels (``serve.max_request_pixels``), then streams from
the member's :class:`actors.serve.replica.ModelReplica` through a ``DeploymentHandle`` (a non-streamed
request is one unary ``complete`` call; a stream iterates ``chat``).

What it sends a replica (plain data, one dict per request)::

    {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               {"type": "image", "index": 0}]}],
     "images": [b"\\x89PNG..."], "max_tokens": 16 | None, "temperature": 0.0, "top_p": 1.0,
     "stop": ["Q:"], "seed": 0 | None, "n": 1, "logprobs": False, "top_logprobs": 0}

(the replica adds the template's turn separator ``###`` to every request's stops). With an
image, each choice comes back with its answer's ``boxes`` in pixels of the first image: the
JSON answer's ``message.boxes``, a stream's finish chunk ``delta.boxes`` (docs/interfaces.md
"Boxes in answers").

Status codes: 400 bad input, 401 bad key, 404 unknown model, 413 body too large, 415 not JSON,
429 the ingress's or the member's queue is full, 503 no replica can take it. The body is always
OpenAI's error JSON, with no heap address or traceback.
"""


import asyncio
import hashlib
import hmac
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.serve import openai_api as oa
from actors.serve.image_source import (ImagePolicy, check_image_header, check_image_url, check_pixel_budget,
                                       fetch_image)
from actors.serve.openai_api import ApiError
from actors.serve.request_gate import RETRY_AFTER_S, RequestGate
from cluster.spec import ServeSection, StorageSection

log = logging.getLogger(__name__)

_PAGE = Path(__file__).resolve().parent / "static" / "index.html"
app = FastAPI(title="sphinx-x", docs_url=None, redoc_url=None)


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    return JSONResponse(oa.error_body(err), status_code=err.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(oa.error_body(ApiError(err.status_code, str(err.detail), code="not_found"
                                               if err.status_code == 404 else None)), status_code=err.status_code)


@app.exception_handler(Exception)
async def _server_error(_: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return JSONResponse(oa.error_body(ApiError(500, f"internal error: {type(err).__name__}", code="internal_error")),
                        status_code=500)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost`` (0.0.0.0 and a LAN address are not)."""
    import ipaddress

    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_endpoint_warning(host: str) -> str:
    return (f"serve: the endpoint listens on {host} (not loopback) with NO API keys: anyone who can reach it "
            "can use the models; set serve.api_keys_env to an env var holding comma-separated keys")


def _handle_error(err: BaseException) -> ApiError:
    """A DeploymentHandle failure → 429 / 503 / 500 (never a crash)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(err, BackPressureError):
        return ApiError(429, f"the model's request queue is full, retry later ({err})", code="queue_full")
    if isinstance(err, (DeploymentUnavailableError, ReplicaUnavailableError, ActorDiedError,
                        ActorUnavailableError, RayActorError)):
        return ApiError(503, "the model is temporarily unavailable, retry later", code="model_unavailable")
    log.error("replica call failed: %s: %s", type(err).__name__, err)
    return ApiError(500, f"generation failed: {type(err).__name__}", code="internal_error")


def _raise_replica_error(item: dict) -> None:
    if "error" in item:
        e = item["error"]
        raise ApiError(e.get("status", 400), e["message"], code=e.get("code"), param=e.get("param"))


class _ReplicaStream:
    """Items of a replica's ``chat`` stream; replica errors and handle failures become ApiError."""

    def __init__(self, gen):
        self._gen, self._done = gen, False

    async def _next(self) -> dict:
        try:
            item = await self._gen.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise
        except Exception as err:  # noqa: BLE001 - mapped to an HTTP status
            raise _handle_error(err) from None
        _raise_replica_error(item)
        return item

    async def first(self) -> dict:
        try:
            return await self._next()
        except StopAsyncIteration:
            raise ApiError(500, "the replica returned nothing", code="internal_error") from None

    async def aclose(self) -> None:
        """Stop the replica's generator (its request is aborted there) unless it finished."""
        if not self._done:
            try:
                self._gen.cancel()
            except Exception:  # noqa: BLE001 - already done
                pass

    def __aiter__(self) -> "_ReplicaStream":
        return self

    async def __anext__(self) -> dict:
        return await self._next()


@serve.deployment(max_ongoing_requests=1000, max_queued_requests=-1)
@serve.ingress(app)
class Ingress:
    """Args: the spec's ``serve`` and ``storage`` sections (typed), ``models`` (name →
    DeploymentHandle), ``key_hashes`` (SHA-256 hex of accepted API keys; empty: no auth).
    Its actor options (CPUs) come from ``pipelines.stages.serve`` (``INGRESS_CPUS``)."""

    def __init__(self, serve_section: ServeSection, storage: StorageSection, models: dict[str, Any],
                 key_hashes: list[str]):
        self.section = serve_section
        self.storage_section = storage
        self.models = models
        self.key_hashes = list(key_hashes)
        self.policy = ImagePolicy(bucket=storage.bucket, allowed_hosts=list(serve_section.allowed_image_hosts),
                                  max_bytes=serve_section.max_request_bytes,
                                  max_pixels=serve_section.max_image_pixels,
                                  s3_prefixes=list(serve_section.allowed_image_s3_prefixes),
                                  max_request_pixels=serve_section.max_request_pixels)
        self.gate = RequestGate(serve_section.ingress_max_ongoing_requests, serve_section.ingress_max_queued_requests)
        if not self.key_hashes and not is_loopback(serve_section.http.host):
            log.warning(open_endpoint_warning(serve_section.http.host))
        self.created = int(time.time())
        self.batch_sizes: dict[str, Counter] = {name: Counter() for name in models}
        self.requests: Counter = Counter()
        self._fs = None

    # ------------------------------------------------------------ plumbing

    def _auth(self, request: Request) -> None:
        if not self.key_hashes:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        digest = hash_key(key)
        if not key or not any(hmac.compare_digest(digest, h) for h in self.key_hashes):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           code="invalid_api_key", type="authentication_error")

    async def _body(self, request: Request) -> bytes:
        limit = self.section.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(part)
        return b"".join(chunks)

    def _filesystem(self):
        if self._fs is None:
            from cluster.storage import open_storage

            self._fs = open_storage(self.storage_section).filesystem
        return self._fs

    async def _payload(self, req: oa.ChatRequest) -> dict:
        """Messages → the replica's plain-data request; images fetched and header-checked."""
        urls: list[str] = []
        messages = []
        for m in req.messages:
            content = []
            for part in m.parts():
                if isinstance(part, oa.TextPart):
                    content.append({"type": "text", "text": part.text})
                else:
                    if m.role != "user":
                        raise ApiError(400, f"images are only accepted in user messages, not {m.role!r}",
                                       param="messages", code="invalid_value")
                    content.append({"type": "image", "index": len(urls)})
                    urls.append(part.image_url.url)
            messages.append({"role": m.role, "content": content})
        limit = self.section.max_images_per_request
        if len(urls) > limit:
            raise ApiError(400, f"{len(urls)} images in one request, the limit is {limit}",
                           param="messages", code="too_many_images")
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and max_tokens > self.section.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this endpoint's limit of "
                           f"{self.section.max_tokens_limit}", param="max_tokens", code="invalid_value")
        stops = req.stop_list()
        for u in urls:  # every cheap check before the first fetch
            check_image_url(u, self.policy)
        fetched = await asyncio.gather(*(asyncio.to_thread(self._image, u) for u in urls))
        check_pixel_budget([size for _, size in fetched], self.policy.max_request_pixels)
        images = [data for data, _ in fetched]
        return {"messages": messages, "images": list(images), "max_tokens": max_tokens,
                "max_tokens_limit": self.section.max_tokens_limit, "temperature": req.temperature,
                "top_p": req.top_p, "stop": stops, "seed": req.seed, "ignore_eos": req.ignore_eos,
                "stream": req.stream, "n": req.n, "logprobs": bool(req.logprobs),
                "top_logprobs": req.top_logprobs or 0}

    def _image(self, url: str) -> tuple[bytes, tuple[int, int]]:
        """(bytes, (W, H) from the header): nothing is decoded here."""
        data = fetch_image(url, self.policy, self._filesystem)
        _, w, h = check_image_header(data, self.policy.max_pixels)
        return data, (w, h)

    # ------------------------------------------------------------ routes

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        """The web page (actors/serve/static/index.html): pick a model, attach an image, ask."""
        if not _PAGE.is_file():
            raise ApiError(404, "no web page is installed", code="not_found")
        return HTMLResponse(_PAGE.read_text())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request)
        return oa.model_list(sorted(self.models), self.created)

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        """Per member: requests served and a histogram {batch size: requests that shared their
        replica's vLLM engine with at most that many requests (themselves included)}."""
        self._auth(request)
        return {"models": {name: {"requests": self.requests[name],
                                  "batch_size_histogram": {str(k): v for k, v in sorted(c.items())},
                                  "max_batch_size": max(c, default=0)}
                           for name, c in self.batch_sizes.items()}}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._auth(request)
        oa.check_json_content_type(request.headers.get("content-type"))
        slot = await self.gate.acquire()  # 429 when the ingress's queue is full, before the body is read
        try:
            return await self._chat(request, slot)
        except BaseException:
            slot.release()
            raise

    async def _chat(self, request: Request, slot):
        """The request inside its gate slot: a JSON answer releases it here, a stream at its end."""
        req = await asyncio.to_thread(oa.parse_chat_request, await self._body(request))
        req.check_logprobs()
        req.check_sampling()
        handle = self.models.get(req.model)
        if handle is None:
            raise ApiError(404, f"the model {req.model!r} does not exist; available: {sorted(self.models)}",
                           param="model", code="model_not_found")
        payload = await self._payload(req)
        cid = oa.completion_id()
        if not req.stream:  # one Ray message back, no stream protocol
            try:
                out = await handle.complete.remote(payload)
            except Exception as err:  # noqa: BLE001 - mapped to an HTTP status
                raise _handle_error(err) from None
            _raise_replica_error(out)
            self._record(req.model, out)
            slot.release()
            return JSONResponse(oa.completion(cid, req.model, out["choices"], out["prompt_tokens"],
                                              out.get("completion_tokens", 0)))
        stream = _ReplicaStream(handle.options(stream=True).chat.remote(payload))
        head = await stream.first()  # errors surface here, before any byte is sent
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._sse(req.model, cid, head, stream, include_usage, req.n, slot),
                                 media_type="text/event-stream", background=BackgroundTask(slot.release))

    async def _sse(self, model: str, cid: str, head: dict, stream: "_ReplicaStream",
                   include_usage: bool, n: int, slot=None) -> AsyncIterator[str]:
        """OpenAI's chunks: a role chunk per choice, content deltas, a finish chunk per choice,
        usage (if asked), [DONE]. A client that leaves closes ``stream``: the replica aborts."""
        for i in range(n):
            yield oa.chunk(cid, model, {"role": "assistant", "content": ""}, index=i)
        final: dict = {}
        try:
            async for item in stream:
                if "done" in item:
                    final = item
                    continue
                if item.get("delta") or item.get("logprobs"):
                    yield oa.chunk(cid, model, {"content": item["delta"]}, index=item["index"],
                                   logprobs=item.get("logprobs"))
                if "finish_reason" in item:  # the answer's boxes ride on its finish chunk
                    delta = {"boxes": item["boxes"]} if item.get("boxes") is not None else {}
                    yield oa.chunk(cid, model, delta, finish_reason=item["finish_reason"], index=item["index"])
        except ApiError as err:
            yield oa.sse_error(err)
            return
        finally:
            await stream.aclose()
            if slot is not None:
                slot.release()
        self._record(model, final)
        if include_usage:
            yield oa.chunk(cid, model, {}, usage_=oa.usage(head["prompt_tokens"], final.get("completion_tokens", 0)),
                           choices=False)
        yield oa.SSE_DONE

    def _record(self, model: str, final: dict) -> None:
        self.requests[model] += 1
        if final.get("batch_size"):
            self.batch_sizes[model][int(final["batch_size"])] += 1


def key_hashes_from_env(env_name: Optional[str]) -> list[str]:
    """Hashes of the comma-separated keys in ``$env_name``; [] when no env var is configured."""
    import os

    from models.errors import UserError

    if not env_name:
        return []
    keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
    if not keys:
        raise UserError(f"serve.api_keys_env names ${env_name}, but it is unset or empty: "
                        "set it to comma-separated API keys (or remove serve.api_keys_env)")
    return [hash_key(k) for k in keys]
