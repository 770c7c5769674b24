"""One family member behind the endpoint: a Serve deployment that batches concurrent requests.

A request (the plain dict :mod:`actors.ingress` sends) is prepared with exactly the training
code — ``models.tiling.load_and_tile`` for images, ``models.conversation.build_prompt`` for
the template — then joins the replica's running batch (:mod:`actors.decode_loop`, continuous
batching: at the next decode step, up to ``max_batch_size`` rows; an idle loop waits
``batch_wait_timeout_s`` for others to share the first prefill). Rows decode together with the
KV cache, each with its own max_tokens, stop strings, temperature, top_p and seed, and every
request streams its tokens as they come.

``chat(payload)`` yields, in order::

    {"prompt_tokens": 137}                                         # accepted (image tokens counted)
    {"delta": "The", "batch_size": 4}     # text as decoded (streams: flushed every decode_loop.STREAM_FLUSH_S)
    ...
    {"delta": "", "finish_reason": "stop" | "length", "completion_tokens": 9, "batch_size": 4}

or a single ``{"error": {"status": 400, "message", "code", "param"}}`` for a bad request
(undecodable image, prompt over the context, ...). ``complete(payload)`` is the same request in
one reply, ``{"prompt_tokens", "text", "finish_reason", "completion_tokens", "batch_size"}``, for
non-streamed requests (one Ray message instead of a stream). ``batch_size`` is the largest
running batch the request was decoded in; it is recorded per request in the Serve metric
``sphinx_x_batch_size`` and in :meth:`ModelReplica.stats` (with the mean rows per decode step).

Per request, the hot path does no per-token work it can skip: non-streamed text without stop
strings is decoded once at the end, and the decode thread hands items to the event loop once per
step and only when a request finishes or a stream is due a flush.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import numpy as np
from ray import serve

from actors.decode_loop import DecodeLoop, Request
from actors.model_loader import MemberWeights, load_member
from cluster.spec import StorageSection
from models.errors import UserError

log = logging.getLogger(__name__)

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


@dataclass
class Prepared:
    """A request ready for the model: input_ids with images expanded, views uint8 [V, S, S, 3],
    kept bool [I, G*G] (None without images), image_tokens per image."""

    input_ids: list[int]
    views: Optional[np.ndarray]
    kept: Optional[np.ndarray]
    image_tokens: list[int]


def prepare_chat(messages: list[dict], images: list[bytes], tokenizer: Any, flavour: Any, *,
                 max_pixels: int) -> Prepared:
    """OpenAI-style messages (image parts ``{"type": "image", "index": i}`` or ``image_url``) and
    the images' bytes → :class:`Prepared`, through the same functions preprocess uses."""
    from models.conversation import build_prompt
    from models.tiling import TileSpec, image_token_count, load_and_tile

    spec = TileSpec.from_flavour(flavour)
    tiled = [load_and_tile(data, spec, max_pixels=max_pixels) for data in images]
    image_tokens = [image_token_count(*t.original_size, spec, flavour.tokens_per_view) for t in tiled]
    input_ids = build_prompt(messages, tokenizer, image_tokens)
    if not tiled:
        return Prepared(input_ids, None, None, [])
    views = np.concatenate([t.views for t in tiled])
    kept = np.stack([t.kept for t in tiled])
    return Prepared(input_ids, views, kept, image_tokens)


class TextStream:
    """Token ids → text deltas, cut at the first stop string (never emitting part of one).

    ``incremental=False`` (a non-streamed request without stop strings: nobody reads the
    text before the end) only collects ids and decodes once, in :meth:`flush`.
    """

    def __init__(self, tokenizer: Any, stops: list[str], incremental: bool = True):
        self.tokenizer, self.stops = tokenizer, stops
        self.incremental = incremental or bool(stops)
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
        if not self.incremental:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = text[:min(cuts)], True
            return self.flush()
        self.text = text
        upto = len(text.rstrip("\ufffd")) - self._hold  # wait for whole characters / possible stops
        delta = text[self.sent:upto] if upto > self.sent else ""
        self.sent += len(delta)
        return delta

    def flush(self) -> str:
        if not self.incremental:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = self.text[self.sent:].rstrip("\ufffd")
        self.sent += len(delta)
        return delta


@dataclass
class _Job:
    prepared: Prepared
    max_new: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False


def _user_error(err: UserError, status: int = 400) -> dict:
    return {"error": {"status": status, "message": str(err), "code": getattr(err, "reason", None) or "invalid_request",
                      "param": "messages"}}


@dataclass(frozen=True)
class ReplicaConfig:
    """One member's replica, built once by ``pipelines.serve`` from the spec."""

    weights: MemberWeights
    storage: StorageSection
    max_image_pixels: int  # serve.max_image_pixels
    max_batch_size: int  # serve.models[].max_batch_size (1: every request alone)
    batch_wait_s: float  # serve.models[].batch_wait_timeout_s
    threads: int  # torch threads: the CPUs the replica reserves (ray_actor_options.num_cpus)


@serve.deployment
class ModelReplica:
    """Args: a :class:`ReplicaConfig`."""

    def __init__(self, config: ReplicaConfig):
        import torch

        torch.set_num_threads(max(1, config.threads))
        self.name = config.weights.name
        self.max_pixels = config.max_image_pixels
        self.model, self.tokenizer = load_member(config.weights, config.storage)
        self.flavour = self.model.flavour
        self.context = min(int(self.flavour.max_seq_len),
                           int(self.flavour.llm.get("max_position_embeddings", self.flavour.max_seq_len)))
        # the decode thread owns the model (torch state stays on it); another prepares inputs.
        # It holds the GIL between torch ops: a short switch interval lets the event loop take in
        # new requests while it decodes (default 5 ms per hand-off).
        sys.setswitchinterval(0.0005)
        self._event_loop: Optional[asyncio.AbstractEventLoop] = None
        self._decoder = DecodeLoop(self.model, max_batch_size=config.max_batch_size,
                                   wait_s=config.batch_wait_s, deliver=self._deliver,
                                   name=f"decode-{self.name}")
        self._prep_thread = ThreadPoolExecutor(1, thread_name_prefix="prep")
        self.batch_sizes: Counter = Counter()
        from ray.serve.metrics import Histogram

        self._batch_metric = Histogram("sphinx_x_batch_size",
                                       description="per request: the largest running batch it was decoded in",
                                       boundaries=BATCH_BOUNDARIES, tag_keys=("model",))
        self._batch_metric.set_default_tags({"model": self.name})
        log.info("serve model %s ready (%s, context %d)", self.name, self.flavour.name, self.context)

    # ------------------------------------------------------------ requests

    def _prepare(self, payload: dict) -> _Job:
        prepared = prepare_chat(payload["messages"], payload["images"], self.tokenizer, self.flavour,
                                max_pixels=self.max_pixels)
        prompt = len(prepared.input_ids)
        room = self.context - prompt
        wanted = payload.get("max_tokens")
        if room <= 0 or (wanted is not None and wanted > room):
            raise ContextError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                               f"{prompt} tokens (images included)" + (f" and {wanted} more were requested"
                                                                       if wanted is not None else ""))
        max_new = wanted if wanted is not None else min(room, int(payload.get("max_tokens_limit") or room))
        return _Job(prepared, max_new, float(payload.get("temperature", 1.0)), float(payload.get("top_p", 1.0)),
                    payload.get("seed"), list(payload.get("stop") or []), bool(payload.get("ignore_eos")),
                    bool(payload.get("stream")))

    async def chat(self, payload: dict) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        try:  # images are decoded and tiled off the event loop; text alone is quicker than a hop
            job = (await loop.run_in_executor(self._prep_thread, self._prepare, payload) if payload["images"]
                   else self._prepare(payload))
        except UserError as err:
            yield _user_error(err)
            return
        yield {"prompt_tokens": len(job.prepared.input_ids)}
        # Every item crossing to the ingress is a Ray message: the decode loop hands a request
        # text only when it finishes or (streams) at most every STREAM_FLUSH_S.
        async for item in self._generate(job):
            yield item

    async def complete(self, payload: dict) -> dict:
        """A non-streamed request in ONE Ray message (no stream protocol): ``{"prompt_tokens",
        "text", "finish_reason", "completion_tokens", "batch_size"}`` or ``{"error": ...}``."""
        out: dict = {"text": ""}
        async for item in self.chat({**payload, "stream": False}):
            if "error" in item:
                return item
            if "prompt_tokens" in item:
                out["prompt_tokens"] = item["prompt_tokens"]
            elif "finish_reason" in item:
                out.update(item, text=item["delta"])
                del out["delta"]
        return out

    def prepare(self, payload: dict) -> dict:
        """What the replica would feed the model (for checks against preprocess output)."""
        p = self._prepare(payload).prepared
        return {"input_ids": p.input_ids, "views": p.views, "kept": p.kept, "image_tokens": p.image_tokens}

    def stats(self) -> dict:
        """``batch_size_histogram``: requests by the largest batch they decoded in; the decode
        loop's ``steps`` and ``mean_rows_per_step``."""
        return {"model": self.name, "batch_size_histogram": dict(self.batch_sizes), **self._decoder.stats()}

    # ------------------------------------------------------------ the decode loop

    async def _generate(self, job: _Job) -> AsyncIterator[dict]:
        """Decode ``job`` in the running batch: text items as the loop hands them over, then the
        final one (``finish_reason``, ``completion_tokens``, ``batch_size``)."""
        if self._event_loop is None:
            self._event_loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        eos = self.tokenizer.eos_token_id
        request = Request(job.prepared.input_ids, job.max_new, TextStream(self.tokenizer, job.stops, job.stream),
                          sink=queue, views=job.prepared.views, kept=job.prepared.kept,
                          temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                          stop_token_ids=frozenset() if job.ignore_eos else frozenset([eos]), stream=job.stream)
        self._decoder.submit(request)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if "finish_reason" in item:
                    self.batch_sizes[item["batch_size"]] += 1
                    self._batch_metric.observe(item["batch_size"])
                    yield item
                    return
                yield item
        finally:
            request.cancelled = True  # a no-op once finished; a client gone mid-stream frees its row

    def _deliver(self, items: list) -> None:
        """On the decode thread: hand a step's items to the event loop in one hop."""
        self._event_loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list) -> None:
    for request, item in items:
        request.sink.put_nowait(item)


class ContextError(UserError):
    """The prompt (images included) plus max_tokens does not fit the model's context."""

    reason = "context_length_exceeded"
