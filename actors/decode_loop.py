"""Continuous batching: one decode loop that lets a newly arrived request join the running batch
at the next step boundary, instead of waiting for the whole batch to finish.

Why not ``serve.batch`` (Ray 2.60, ``ray/serve/batching.py``): its loop cuts a batch from whatever
arrived within ``batch_wait_timeout_s`` and queues it behind the running one
(``max_concurrent_batches=1``) without waiting for that one to end. In a closed loop (clients
sending again as soon as they are answered) the requests that trickle in while a batch decodes
are cut into many small batches that then decode one after another: at C=32 most batches held
3–11 requests. Here a request waits at most one decode step (plus one prefill) to join.

The running batch (B rows, T cached columns; every row's real tokens end at column T-1)::

    cache     DynamicCache, per layer keys/values [B, H, T, D]   rows left-padded
    mask      long [B, T]     1 on a row's real (cached) tokens
    next_pos  long [B]        the position id of each row's next token (its real-token count)
    logits    float [B, V]    each row's next-token logits

A step picks one token per row (each row's own temperature / top_p / seeded generator), hands
finished requests (and streams due a flush) to ``deliver`` in ONE call, drops finished rows, cuts
the leading columns that are padding in every remaining row, and feeds the picked tokens back
(one forward of [B, 1]). Admission prefills the new rows together (left-padded to their own
width t), pads the shorter of T and t on the left, and stacks the rows::

    running  [0 0 a a a a]            new  [c c c]        after  [0 0 a a a a]
             [0 b b b b b]                 [0 d d]               [0 b b b b b]
                                                                 [0 0 0 c c c]
                                                                 [0 0 0 0 d d]

    >>> loop = DecodeLoop(model, max_batch_size=32, wait_s=0.01, deliver=print)
    >>> loop.submit(Request(input_ids=[1, 5, 9], max_new=8, text=stream, sink=None))
    >>> # deliver([(request, {"delta": "...", "finish_reason": "length", "completion_tokens": 8,
    >>> #                     "batch_size": 3})])      (called on the loop's thread)

The loop owns the model on its own thread (torch state stays there); ``deliver`` is called on
that thread and must only hand the items over (e.g. ``call_soon_threadsafe``). Per-request state
is touched only by that thread, except ``cancelled``, a flag the owner may set at any time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from models.sphinx import _pick_tokens, position_ids_from_mask  # noqa: PLC2701 - the model's own sampler

log = logging.getLogger(__name__)

STREAM_FLUSH_S = 0.02  # a streamed request gets its text at most this often (one hand-over each)


@dataclass(eq=False)
class Request:
    """One sequence to decode. ``text`` turns token ids into text (``push(id) -> delta``,
    ``flush() -> rest``, ``stopped`` once a stop string was seen); ``sink`` is the owner's."""

    input_ids: list[int]
    max_new: int
    text: Any
    sink: Any = None
    views: Optional[np.ndarray] = None  # uint8 [V, S, S, 3] of this request's images
    kept: Optional[np.ndarray] = None  # bool [I, G*G]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: frozenset = frozenset()
    stream: bool = False
    cancelled: bool = False  # set by the owner (client gone): dropped at the next step
    # decode state, model thread only
    produced: int = 0
    pending: str = ""
    last_flush: float = 0.0
    peak: int = 0  # the largest running batch this request was decoded in
    generator: Optional[torch.Generator] = field(default=None, repr=False)


Deliver = Callable[[list[tuple[Request, Any]]], None]


class DecodeLoop:
    """The continuous-batching loop (see the module docstring). ``max_batch_size`` caps the rows
    decoded together (1: every request alone); ``wait_s``: when idle, how long the first arrival
    waits for others to share its prefill."""

    def __init__(self, model, *, max_batch_size: int, wait_s: float, deliver: Deliver, name: str = "decode"):
        self.model, self.max_batch_size, self.wait_s, self.deliver = model, max_batch_size, wait_s, deliver
        self._inbox: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.rows: list[Request] = []
        self._reset()
        self.steps = 0  # decode steps run
        self.row_steps = 0  # sum over steps of the rows decoded in that step (mean batch = row_steps / steps)
        self.busy_s = self.busy_cpu_s = 0.0  # wall / this thread's CPU time spent admitting and stepping
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ owner side (any thread)

    def submit(self, request: Request) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            self._inbox.append(request)
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    def stats(self) -> dict:
        """``busy_cpu_s`` well under ``busy_s``: the loop waited for a core or the GIL while decoding."""
        return {"steps": self.steps, "mean_rows_per_step": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
                "busy_s": round(self.busy_s, 3), "busy_cpu_s": round(self.busy_cpu_s, 3)}

    # ------------------------------------------------------------ the loop (its own thread)

    def _run(self) -> None:
        while True:
            new = self._take()
            if new is None:
                break
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                if new:
                    self._admit(new)
                if self.rows:
                    self._step()
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the loop lives on
                log.exception("decode step failed")
                failed = self.rows + [r for r in new if r not in self.rows]
                self._reset()
                self.deliver([(r, err) for r in failed])
            self.busy_s += time.perf_counter() - t0
            self.busy_cpu_s += time.thread_time() - c0
        failed = self.rows + list(self._inbox)
        if failed:
            self.deliver([(r, RuntimeError("the decode loop was closed")) for r in failed])

    def _take(self) -> Optional[list[Request]]:
        """The requests to admit now (blocks while there is nothing to decode); None: closed."""
        with self._cv:
            if not self.rows:
                self._cv.wait_for(lambda: self._inbox or self._closed)
                if self.wait_s > 0 and not self._closed:  # let a burst share one prefill
                    self._cv.wait_for(lambda: len(self._inbox) >= self.max_batch_size or self._closed, self.wait_s)
            if self._closed:
                return None
            new: list[Request] = []
            while self._inbox and len(self.rows) + len(new) < self.max_batch_size:
                r = self._inbox.popleft()
                if not r.cancelled:
                    new.append(r)
            return new

    def _reset(self) -> None:
        self.rows = []
        self.cache = None
        self.mask = self.next_pos = self.logits = None

    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        llm = self.model.llm
        hidden = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).last_hidden_state
        return llm.lm_head(hidden[:, -1]).float()

    @torch.no_grad()
    def _admit(self, new: list[Request]) -> None:
        """Prefill ``new`` together, then stack them under the running rows."""
        from transformers import DynamicCache

        model = self.model
        device = model.llm.get_input_embeddings().weight.device
        ready = []
        for r in new:
            g = torch.Generator(device=device)
            g.manual_seed(random.randrange(2**63) if r.seed is None else int(r.seed))
            r.generator = g
            if r.max_new <= 0:
                self.deliver([(r, self._final(r, "length"))])
            else:
                ready.append(r)
        if not ready:
            return
        width = max(len(r.input_ids) for r in ready)
        ids = torch.full((len(ready), width), model.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(ready), width), dtype=torch.long, device=device)
        for i, r in enumerate(ready):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids, dtype=torch.long)
            mask[i, width - len(r.input_ids):] = 1
        views = [r.views for r in ready if r.views is not None]
        kept = [r.kept for r in ready if r.kept is not None]
        embeds = model.embed(ids, torch.from_numpy(np.concatenate(views)) if views else None,
                             torch.from_numpy(np.concatenate(kept)) if kept else None)
        cache = DynamicCache(config=model.llm.config)
        logits = self._forward(embeds, mask, position_ids_from_mask(mask), cache)
        next_pos = mask.sum(1)
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.logits = cache, mask, next_pos, logits
        else:
            t_run, t_new = self.mask.shape[1], width
            t = max(t_run, t_new)
            for old, add in zip(self.cache.layers, cache.layers):
                if getattr(old, "is_sliding", False):
                    raise NotImplementedError("continuous batching of sliding-window caches")
                old.keys = torch.cat([F.pad(old.keys, (0, 0, t - t_run, 0)), F.pad(add.keys, (0, 0, t - t_new, 0))])
                old.values = torch.cat([F.pad(old.values, (0, 0, t - t_run, 0)),
                                        F.pad(add.values, (0, 0, t - t_new, 0))])
            self.mask = torch.cat([F.pad(self.mask, (t - t_run, 0)), F.pad(mask, (t - t_new, 0))])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
        self.rows += ready

    @torch.no_grad()
    def _step(self) -> None:
        rows, n = self.rows, len(self.rows)
        picks = _pick_tokens(self.logits, [r.temperature for r in rows], [r.top_p for r in rows],
                             [r.generator for r in rows])
        self.steps += 1
        self.row_steps += n
        now = time.monotonic()
        out: list[tuple[Request, Any]] = []
        keep: list[int] = []
        for i, (r, token) in enumerate(zip(rows, picks)):
            r.peak = max(r.peak, n)
            if r.cancelled:
                continue
            r.produced += 1
            if token in r.stop_token_ids:  # counted, never shown
                out.append((r, self._final(r, "stop")))
                continue
            r.pending += r.text.push(token)
            if r.text.stopped or r.produced >= r.max_new:
                out.append((r, self._final(r, "stop" if r.text.stopped else "length")))
                continue
            keep.append(i)
            if r.stream and r.pending and now - r.last_flush >= STREAM_FLUSH_S:
                out.append((r, {"delta": r.pending, "batch_size": r.peak}))
                r.pending, r.last_flush = "", now
        if out:
            self.deliver(out)
        if not keep:
            self._reset()
            return
        if len(keep) < n:
            self._keep(keep)
        tokens = torch.tensor([picks[i] for i in keep], dtype=torch.long, device=self.mask.device)[:, None]
        embeds = self.model.llm.get_input_embeddings()(tokens)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=1)
        self.logits = self._forward(embeds, self.mask, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1

    def _keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay; columns that are padding in all of them are cut."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        start = int(self.mask.any(0).nonzero()[0])
        if start:
            self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    @staticmethod
    def _final(r: Request, reason: str) -> dict:
        delta = r.pending + r.text.flush()
        r.pending = ""
        return {"delta": delta, "finish_reason": reason, "completion_tokens": r.produced, "batch_size": r.peak}
