"""One family member behind the endpoint: a Serve deployment around vLLM's ``AsyncLLM``.

A request (the plain dict :mod:`actors.serve.ingress` sends) becomes one vLLM request: the prompt
from ``models.conversation.build_prompt`` with ONE ``<image>`` id per image, the images' bytes
as ``multi_modal_data`` (the SPHINX-X processor, actors.serve.vllm.processor, tiles them with
``models.tiling`` and expands each placeholder to its token count). vLLM schedules it with every
other request in the replica (paged KV cache, continuous batching, chunked prefill).

``chat(payload)`` yields, in order::

    {"prompt_tokens": 137}                                        # accepted (image tokens counted)
    {"index": 0, "delta": "The", "logprobs": [...] | None}        # streams: text as decoded, per choice
    ...
    {"index": 0, "delta": "", "finish_reason": "stop" | "length", "completion_tokens": 9,
     "boxes": [{"phrase": "the cat", "boxes": [[100.0, 50.0, 600.0, 450.0]]}]}   # per choice
    {"done": True, "completion_tokens": 9, "batch_size": 4}

or a single ``{"error": {"status": 400, "message", "code", "param"}}`` for a bad request
(undecodable image, prompt over the context, ...). ``complete(payload)`` is the same request in
one reply, ``{"prompt_tokens", "choices": [{"text", "finish_reason", "completion_tokens",
"logprobs", "boxes"}], "completion_tokens", "batch_size"}``. ``boxes`` (only when the request has
an image) are the boxes of the whole answer in pixels of its first image (:func:`answer_boxes`). ``batch_size`` is the most requests the
replica's engine held at once while this one ran (Serve metric ``sphinx_x_batch_size``,
:meth:`ModelReplica.stats`). A client gone mid-stream aborts its vLLM request.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from PIL import Image
from ray import serve

from actors.serve import openai_api as oa
from actors.serve.model_loader import MemberWeights, member_model_dir
from actors.serve.vllm.engine import EngineOptions, context_length, sampling_params, start_engine
from cluster.spec import StorageSection
from models.chat_inputs import prepare_chat
from models.errors import UserError

log = logging.getLogger(__name__)

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


def image_size(data: bytes) -> Optional[tuple[int, int]]:
    """(W, H) of encoded image bytes after EXIF orientation, from the header alone (None if
    unreadable: the processor then reports the image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated 90°: load_image transposes it
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - decoding errors belong to the processor (400 with a reason)
        return None


def prompt_ids(messages: list[dict], images: list[bytes], tokenizer: Any, flavour: Any) -> tuple[list[int], int]:
    """(the vLLM prompt: one ``<image>`` id per image, the expanded prompt's length)."""
    from models.conversation import build_prompt
    from models.tiling import TileSpec, image_token_count

    spec = TileSpec.from_flavour(flavour)
    ids = build_prompt(messages, tokenizer, [1] * len(images), image_position=flavour.image_position)
    sizes = [image_size(d) for d in images]
    expanded = len(ids) + sum(image_token_count(*s, spec, flavour.tokens_per_view) - 1 for s in sizes if s)
    return ids, expanded


def answer_boxes(text: str, images: list[bytes], flavour: Any) -> Optional[list[dict]]:
    """The boxes an answer names, in pixels of the request's first image, through the member's
    own padding and resize (``actors.serve.openai_api.answer_boxes``); None without an image."""
    from models.tiling import TileSpec

    size = image_size(images[0]) if images else None
    if size is None:
        return None
    return oa.answer_boxes(text, size, TileSpec.from_flavour(flavour))


def _user_error(err: UserError, status: int = 400) -> dict:
    return {"error": {"status": status, "message": str(err), "code": getattr(err, "reason", None) or "invalid_request",
                      "param": "messages"}}


def _is_vllm_client_error(err: BaseException) -> bool:
    """vLLM's request-validation errors (``vllm.exceptions.VLLMClientError``, not a ValueError)."""
    return any(c.__name__ == "VLLMClientError" for c in type(err).__mro__)


def engine_error(err: BaseException) -> Optional[dict]:
    """vLLM's failure to take a request → our error item: the image's reason (the processor's
    ValueError has the models.tiling.ImageError as its cause), context_length_exceeded, or
    invalid_request for another ValueError; None for anything else (not the request's fault)."""
    chain, seen = [], err
    while seen is not None and len(chain) < 16:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, UserError) and getattr(e, "reason", None):
            return _user_error(e)
    for e in chain:
        if isinstance(e, ValueError) or _is_vllm_client_error(e):
            text = str(e)
            code = ("context_length_exceeded" if "maximum model length" in text or "longer than" in text
                    else "invalid_request")
            return {"error": {"status": 400, "message": text, "code": code, "param": "messages"}}
    return None


def openai_logprobs(output: Any, tokenizer: Any, top: int) -> Optional[list[dict]]:
    """vLLM's per-token logprobs of ``output`` (a CompletionOutput) → OpenAI's ``content`` list."""
    if output.logprobs is None:
        return None

    def entry(token_id: int, lp: Any) -> dict:
        token = lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([token_id])
        return {"token": token, "logprob": float(lp.logprob), "bytes": list(token.encode())}

    out = []
    for token_id, table in zip(output.token_ids, output.logprobs):
        tops = sorted(table.items(), key=lambda kv: kv[1].rank)[:top] if top else []
        out.append({**entry(token_id, table[token_id]), "top_logprobs": [entry(t, lp) for t, lp in tops]})
    return out


@dataclass(frozen=True)
class ReplicaConfig:
    """One member's replica, built once by ``pipelines.stages.serve`` from the spec."""

    weights: MemberWeights
    storage: StorageSection
    max_image_pixels: int  # serve.max_image_pixels
    engine: EngineOptions  # serve.models[]: device, dtype, max_model_len, max_num_seqs, TP, KV budget


@serve.deployment
class ModelReplica:
    """Args: a :class:`ReplicaConfig`."""

    async def __init__(self, config: ReplicaConfig):
        from models.weights.model_dir import load_model_dir  # noqa: F401 - fail here, not in the engine process
        from models.weights.model_dir import read_config
        from models.conversation import load_tokenizer
        from models.weights.model_dir import LLM_DIR

        self.name = config.weights.name
        self.max_pixels = config.max_image_pixels
        self.model_dir, self._temp = member_model_dir(config.weights, config.storage)
        self.flavour = read_config(self.model_dir)["flavour"]
        self.tokenizer = load_tokenizer(self.model_dir / LLM_DIR)
        self.context = config.engine.max_model_len or context_length(self.model_dir)
        self.engine = start_engine(self.model_dir, config.engine, max_image_pixels=config.max_image_pixels)
        self._active = 0
        self.aborted = 0  # requests stopped before they finished (client gone)
        self._peaks: dict[str, int] = {}
        self.batch_sizes: Counter = Counter()
        self._warming = True  # warm_up's requests are not traffic: no batch-size figures
        from ray.serve.metrics import Histogram

        self._batch_metric = Histogram("sphinx_x_batch_size",
                                       description="per request: the most requests its engine held at once",
                                       boundaries=BATCH_BOUNDARIES, tag_keys=("model",))
        self._batch_metric.set_default_tags({"model": self.name})
        warm_s = await self.warm_up()
        log.info("serve model %s ready (%s on %s, %s, context %d; warmed up in %.1f s)", self.name, self.flavour.name,
                 config.engine.device, config.engine.dtype, self.context, warm_s)

    async def warm_up(self) -> float:
        """Answer warm-up questions before Serve routes anything here: one text and one whole-canvas
        image question, then four together with log-probs (two of each). Returns seconds.

        Serve sends requests to a replica once its constructor returns; the engine's first requests
        pay one-off costs (the image processor's first call, the first prefill of each shape, the
        first batch of several requests and the log-prob path). With only the first two questions,
        the demo's first four answers (four at a time, log-probs on) still took 2.6-4.4 s (p99
        3.3 s against p50 0.12 s, issue #28); with the four together, none did (BENCHMARKS.md)."""
        t0 = time.perf_counter()
        side = self.flavour.grid * self.flavour.tile_size  # a whole canvas: every tile kept, the longest prefill
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (128, 128, 128)).save(buf, format="PNG")
        canvas = buf.getvalue()

        def ask(images: list, logprobs: bool):
            content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "warm up"}]
            # two tokens: a decode step too, not only the prefill
            return self.complete({"messages": [{"role": "user", "content": content}], "images": images,
                                  "max_tokens": 2, "temperature": 0.0, "logprobs": logprobs})

        rounds = [[([], False)], [([canvas], False)], [([canvas] if i % 2 else [], True) for i in range(4)]]
        for requests in rounds:
            for got in await asyncio.gather(*(ask(images, logprobs) for images, logprobs in requests)):
                if "error" in got:
                    raise RuntimeError(f"serve model {self.name}: the warm-up request failed: {got['error']}")
        self._warming = False
        return time.perf_counter() - t0

    def __del__(self):
        engine = getattr(self, "engine", None)
        try:
            if engine is not None:
                engine.shutdown()
        except Exception:  # noqa: BLE001 - at interpreter exit vLLM's own teardown may be gone
            pass
        if getattr(self, "_temp", False):
            shutil.rmtree(self.model_dir, ignore_errors=True)

    async def check_health(self) -> None:
        if self.engine.errored:  # Serve replaces a replica whose engine died
            raise RuntimeError(f"the vLLM engine of {self.name} is dead")

    # ------------------------------------------------------------ requests

    def _request(self, payload: dict) -> tuple[dict, Any]:
        """(vLLM prompt, SamplingParams) of a payload; UserError for what cannot fit."""
        ids, prompt = prompt_ids(payload["messages"], payload["images"], self.tokenizer, self.flavour)
        room = self.context - prompt
        wanted = payload.get("max_tokens")
        if room <= 0 or (wanted is not None and wanted > room):
            raise ContextError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                               f"{prompt} tokens (images included)" + (f" and {wanted} more were requested"
                                                                       if wanted is not None else ""))
        max_new = wanted if wanted is not None else min(room, int(payload.get("max_tokens_limit") or room))
        prompt_in: dict = {"prompt_token_ids": ids}
        if payload["images"]:
            prompt_in["multi_modal_data"] = {"image": list(payload["images"])}
        return prompt_in, sampling_params(payload, max_tokens=max_new, stream=bool(payload.get("stream")))

    async def chat(self, payload: dict) -> AsyncIterator[dict]:
        try:  # tokenisation of a long prompt is CPU work: off the event loop
            prompt, params = await asyncio.to_thread(self._request, payload)
        except UserError as err:
            yield _user_error(err)
            return
        except Exception as err:  # noqa: BLE001 - vLLM's SamplingParams checks: the request's fault, a 400
            item = engine_error(err)
            if item is None:
                raise
            yield item
            return
        top = int(payload.get("top_logprobs") or 0)
        rid = uuid.uuid4().hex
        self._active += 1
        self._peaks[rid] = self._active
        for other in self._peaks:
            self._peaks[other] = max(self._peaks[other], self._active)
        counts: Counter = Counter()
        texts: defaultdict = defaultdict(str)  # each choice's answer so far, for its boxes
        started = finished = False
        try:
            async for out in self.engine.generate(prompt, params, request_id=rid):
                if not started:
                    started = True
                    yield {"prompt_tokens": len(out.prompt_token_ids)}
                for choice in out.outputs:
                    counts[choice.index] += len(choice.token_ids)
                    texts[choice.index] += choice.text
                    item = {"index": choice.index, "delta": choice.text,
                            "logprobs": openai_logprobs(choice, self.tokenizer, top)}
                    if choice.finish_reason is not None:
                        item.update(finish_reason="length" if choice.finish_reason == "length" else "stop",
                                    completion_tokens=counts[choice.index])
                        boxes = answer_boxes(texts[choice.index], payload["images"], self.flavour)
                        if boxes is not None:
                            item["boxes"] = boxes
                    if item["delta"] or "finish_reason" in item or item["logprobs"]:
                        yield item
            finished = True
        except Exception as err:  # noqa: BLE001 - the processor / input checks: a bad request
            item = None if started else engine_error(err)
            if item is None:
                raise
            yield item
            return
        finally:
            self._active -= 1
            peak = self._peaks.pop(rid, 1)
            if not finished:  # the client left (or the engine failed): free its KV blocks
                if started:
                    self.aborted += 1
                asyncio.get_running_loop().create_task(self.engine.abort(rid))
        if not self._warming:
            self.batch_sizes[peak] += 1
            self._batch_metric.observe(peak)
        yield {"done": True, "completion_tokens": sum(counts.values()), "batch_size": peak}

    async def complete(self, payload: dict) -> dict:
        """A non-streamed request in ONE Ray message (no stream protocol): ``{"prompt_tokens",
        "choices", "completion_tokens", "batch_size"}`` or ``{"error": ...}``."""
        out: dict = {}
        choices: dict[int, dict] = {}
        items = self.chat({**payload, "stream": False})
        try:
            async for item in items:
                if "error" in item:
                    return item
                if "prompt_tokens" in item:
                    out["prompt_tokens"] = item["prompt_tokens"]
                elif "done" in item:
                    out.update(completion_tokens=item["completion_tokens"], batch_size=item["batch_size"])
                else:
                    c = choices.setdefault(item["index"], {"text": "", "logprobs": None, "finish_reason": "stop",
                                                           "completion_tokens": 0})
                    c["text"] += item["delta"]
                    if item.get("logprobs") is not None:
                        c["logprobs"] = (c["logprobs"] or []) + item["logprobs"]
                    if "finish_reason" in item:
                        c.update(finish_reason=item["finish_reason"], completion_tokens=item["completion_tokens"])
                    if "boxes" in item:
                        c["boxes"] = item["boxes"]
        finally:
            await items.aclose()
        out["choices"] = [choices[i] for i in sorted(choices)]
        return out

    def prepare(self, payload: dict) -> dict:
        """What the training code builds for this request (for checks against preprocess output)."""
        p = prepare_chat(payload["messages"], payload["images"], self.tokenizer, self.flavour,
                         max_pixels=self.max_pixels)
        return {"input_ids": p.input_ids, "views": p.views, "kept": p.kept, "image_tokens": p.image_tokens}

    def stats(self) -> dict:
        """``batch_size_histogram``: requests by the most requests their engine held at once;
        ``running``: requests in the engine now; ``aborted``: requests stopped unfinished."""
        return {"model": self.name, "batch_size_histogram": dict(self.batch_sizes), "running": self._active,
                "aborted": self.aborted}


class ContextError(UserError):
    """The prompt (images included) plus max_tokens does not fit the model's context."""

    reason = "context_length_exceeded"
