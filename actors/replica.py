"""One family member behind the endpoint: a Serve deployment that batches concurrent requests.

A request (the plain dict :mod:`actors.ingress` sends) is prepared with exactly the training
code — ``models.tiling.load_and_tile`` for images, ``models.conversation.build_prompt`` for
the template — then waits (at most ``batch_wait_timeout_s``) for others to share a batch of
up to ``max_batch_size``. A batch decodes together with the KV cache
(``SphinxX.generate_stream``), each sequence with its own max_tokens, stop strings,
temperature, top_p and seed, and every request streams its tokens as they come.

``chat(payload)`` yields, in order::

    {"prompt_tokens": 137}                                         # accepted (image tokens counted)
    {"delta": "The", "batch_size": 4}     # text as decoded (streams: flushed every STREAM_FLUSH_S)
    ...
    {"delta": "", "finish_reason": "stop" | "length", "completion_tokens": 9, "batch_size": 4}

or a single ``{"error": {"status": 400, "message", "code", "param"}}`` for a bad request
(undecodable image, prompt over the context, ...). Batch sizes are recorded in the Serve
metric ``sphinx_x_batch_size`` and in :meth:`ModelReplica.stats`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import numpy as np
from ray import serve

from models.errors import UserError

log = logging.getLogger(__name__)

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
STREAM_FLUSH_S = 0.02


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
    """Token ids → text deltas, cut at the first stop string (never emitting part of one)."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
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


def _user_error(err: UserError, status: int = 400) -> dict:
    return {"error": {"status": status, "message": str(err), "code": getattr(err, "reason", None) or "invalid_request",
                      "param": "messages"}}


@serve.deployment
class ModelReplica:
    """Args: ``member`` (a ``serve.models`` entry as a dict), ``storage`` (the storage section),
    ``train_output`` (``train.output``), ``max_image_pixels``."""

    def __init__(self, member: dict, storage: dict, train_output: str, max_image_pixels: int):
        import torch

        from actors.model_loader import load_member

        cpus = float(member.get("ray_actor_options", {}).get("num_cpus") or 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.name = member["name"]
        self.max_pixels = max_image_pixels
        self.model, self.tokenizer = load_member(member, storage, train_output)
        self.flavour = self.model.flavour
        self.context = min(int(self.flavour.max_seq_len),
                           int(self.flavour.llm.get("max_position_embeddings", self.flavour.max_seq_len)))
        self.generate_batch.set_max_batch_size(int(member.get("max_batch_size", 16)))
        self.generate_batch.set_batch_wait_timeout_s(float(member.get("batch_wait_timeout_s", 0.01)))
        # one thread owns the model (torch state stays on it); another prepares inputs meanwhile
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._prep_thread = ThreadPoolExecutor(1, thread_name_prefix="prep")
        self.batch_sizes: Counter = Counter()
        from ray.serve.metrics import Histogram

        self._batch_metric = Histogram("sphinx_x_batch_size", description="requests decoded together per batch",
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
                    payload.get("seed"), list(payload.get("stop") or []), bool(payload.get("ignore_eos")))

    async def chat(self, payload: dict) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        try:
            job = await loop.run_in_executor(self._prep_thread, self._prepare, payload)
        except UserError as err:
            yield _user_error(err)
            return
        yield {"prompt_tokens": len(job.prepared.input_ids)}
        # Every item crossing to the ingress is a Ray message: a non-streamed request gets one,
        # a stream gets the text of at most STREAM_FLUSH_S at a time (tokens arrive faster).
        pending, last = [], time.monotonic()
        async for item in self.generate_batch(job):
            pending.append(item)
            now = time.monotonic()
            if "finish_reason" in item or (payload.get("stream") and now - last >= STREAM_FLUSH_S):
                yield {**item, "delta": "".join(p["delta"] for p in pending)}
                pending, last = [], now

    def prepare(self, payload: dict) -> dict:
        """What the replica would feed the model (for checks against preprocess output)."""
        p = self._prepare(payload).prepared
        return {"input_ids": p.input_ids, "views": p.views, "kept": p.kept, "image_tokens": p.image_tokens}

    def stats(self) -> dict:
        return {"model": self.name, "batch_size_histogram": dict(self.batch_sizes)}

    # ------------------------------------------------------------ the batch

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, jobs: list[_Job]) -> AsyncIterator[list]:
        import torch

        n = len(jobs)
        eos = self.tokenizer.eos_token_id
        self.batch_sizes[n] += 1
        self._batch_metric.observe(n)
        views = [j.prepared.views for j in jobs if j.prepared.views is not None]
        kept = [j.prepared.kept for j in jobs if j.prepared.kept is not None]
        gen = self.model.generate_stream(
            [j.prepared.input_ids for j in jobs],
            torch.from_numpy(np.concatenate(views)) if views else None,
            torch.from_numpy(np.concatenate(kept)) if kept else None,
            max_new_tokens=[j.max_new for j in jobs], temperature=[j.temperature for j in jobs],
            top_p=[j.top_p for j in jobs], seed=[j.seed for j in jobs],
            eos_token_id=-1,  # eos is per sequence (ignore_eos), through stop_token_ids
            stop_token_ids=[[] if j.ignore_eos else [eos] for j in jobs],
        )
        texts = [TextStream(self.tokenizer, j.stops) for j in jobs]
        produced = [0] * n
        done = [False] * n
        loop = asyncio.get_running_loop()
        try:
            while not all(done):
                step = await loop.run_in_executor(self._model_thread, next, gen, None)
                if step is None:
                    break
                out: list = []
                for i, token in enumerate(step):
                    if done[i]:
                        out.append(StopIteration)
                        continue
                    if token is None:  # the model finished it without our noticing: close it
                        out.append(self._final(texts[i], produced[i], "length", n))
                        done[i] = True
                        continue
                    produced[i] += 1
                    if token == eos and not jobs[i].ignore_eos:
                        out.append(self._final(texts[i], produced[i], "stop", n))
                        done[i] = True
                        continue
                    delta = texts[i].push(token)
                    if texts[i].stopped or produced[i] >= jobs[i].max_new:
                        out.append(self._final(texts[i], produced[i], "stop" if texts[i].stopped else "length",
                                               n, delta))
                        done[i] = True
                    else:
                        out.append({"delta": delta, "batch_size": n})
                yield out
            if not all(done):  # the generator ended early: close the rest
                yield [StopIteration if d else self._final(t, p, "length", n) for d, t, p in zip(done, texts, produced)]
        finally:
            await loop.run_in_executor(self._model_thread, gen.close)

    @staticmethod
    def _final(text: TextStream, produced: int, reason: str, batch: int, delta: str = "") -> dict:
        return {"delta": delta + text.flush(), "finish_reason": reason, "completion_tokens": produced,
                "batch_size": batch}


class ContextError(UserError):
    """The prompt (images included) plus max_tokens does not fit the model's context."""

    reason = "context_length_exceeded"
