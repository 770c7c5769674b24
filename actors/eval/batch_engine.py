"""The batch answer engine: Ray Data over a pool of vLLM engine actors loading one model directory.

Same interface as :mod:`actors.eval.endpoint_engine` (``answer(requests) -> list[Answer]``, in
request order), same prompt (``actors.serve.replica.prompt_ids``: the serving template, one
``<image>`` id per image, expanded by the SPHINX-X vLLM processor) and the same greedy sampling
parameters as a served request with ``temperature: 0`` (``actors.serve.vllm.engine.sampling_params``:
the turn separator is a stop), so the two engines agree token for token on the same weights::

    >>> engine = BatchEngine(MemberWeights(name="m", checkpoint_uri="/models/tiny"), spec.storage,
    ...                      BatchOptions(engine=EngineOptions(...), actors=2), cache_uri="s3://b/run/eval/_answers")
    >>> engine.answer(requests)                  # [Answer(id='q0', text='B', error=None), ...]

Sharding: requests are cut, in order, into blocks of ``block_size``; the blocks not yet answered
become one Ray Data dataset whose ``map_batches`` runs :class:`VLLMAnswerer` on an actor pool of
``actors`` engines (``num_gpus`` each on GPU clusters). Resumable: each finished block's answers
are written to ``<cache_uri>/block-<k>-<hash>.jsonl`` (the hash covers the block's requests) as
soon as the block is complete, and a rerun reuses every block file it finds. A progress line
counts answered prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from actors.eval.endpoint_engine import Answer, AnswerRequest
from actors.serve.model_loader import MemberWeights
from actors.serve.vllm.engine import EngineOptions
from cluster.spec import StorageSection

log = logging.getLogger(__name__)

__all__ = ["Answer", "AnswerRequest", "BatchEngine", "BatchOptions", "VLLMAnswerer", "block_key"]


@dataclass(frozen=True)
class BatchOptions:
    """The actor pool: ``actors`` engines, each holding ``num_cpus`` / ``num_gpus``."""

    engine: EngineOptions
    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # requests per map_batches call: vLLM's scheduler batches them (max_num_seqs at once), so a
    # call should hold several engine batches or each call ends on a half-empty tail
    batch_size: int = 256
    block_size: int = 256  # requests per resumable block
    max_image_pixels: int = 40_000_000


def block_key(block: list[AnswerRequest]) -> str:
    """A short hash of a block's requests (ids, messages, images, max_tokens)."""
    h = hashlib.sha256()
    for r in block:
        h.update(json.dumps([r.id, r.messages, r.max_tokens], sort_keys=True).encode())
        for img in r.images:
            h.update(hashlib.sha256(img).digest())
    return h.hexdigest()[:16]


class VLLMAnswerer:
    """A Ray Data UDF (an actor): one in-process vLLM ``LLM`` on the model directory.

    Batch columns in: ``id`` (str), ``messages`` (JSON str), ``images`` (list of bytes),
    ``max_tokens`` (int). Out: ``id``, ``text``, ``error`` ("" when none)."""

    def __init__(self, weights: MemberWeights, storage: StorageSection, options: BatchOptions):
        opts = options.engine
        if opts.device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # actors share the cores
            os.environ["OMP_NUM_THREADS"] = str(max(1, opts.threads))
        # NOTE: the engine core in this actor's process (a child process per actor buys nothing here)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import vllm

        from actors.serve.model_loader import member_model_dir
        from actors.serve.vllm.engine import context_length, engine_kwargs
        from actors.serve.vllm.plugin import register
        from models.conversation import load_tokenizer
        from models.weights.model_dir import LLM_DIR, read_config

        self.model_dir, _ = member_model_dir(weights, storage)
        self.flavour = read_config(self.model_dir)["flavour"]
        self.tokenizer = load_tokenizer(self.model_dir / LLM_DIR)
        self.context = opts.max_model_len or context_length(self.model_dir)
        register()
        self.llm = vllm.LLM(**engine_kwargs(self.model_dir, opts, max_image_pixels=options.max_image_pixels),
                            seed=0)

    def _prepare(self, messages: list[dict], images: list[bytes], max_tokens: int):
        from actors.serve.replica import prompt_ids
        from actors.serve.vllm.engine import sampling_params

        ids, length = prompt_ids(messages, images, self.tokenizer, self.flavour)
        room = self.context - length
        if room <= 0 or max_tokens > room:
            raise ValueError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                             f"{length} tokens (images included) and {max_tokens} more were requested")
        prompt: dict = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": list(images)}
        return prompt, sampling_params({"temperature": 0.0, "stop": []}, max_tokens=max_tokens, stream=False)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        ids = [str(i) for i in batch["id"]]
        texts, errors = [""] * len(ids), [""] * len(ids)
        ready: list[tuple[int, dict, Any]] = []
        for k, (messages, images, max_tokens) in enumerate(zip(batch["messages"], batch["images"],
                                                               batch["max_tokens"])):
            try:
                imgs = [bytes(x) for x in (images if images is not None else [])]
                ready.append((k, *self._prepare(json.loads(messages), imgs, int(max_tokens))))
            except Exception as err:  # noqa: BLE001 - the request's own error, as the endpoint reports it
                errors[k] = _error_text(err)
        if ready:
            try:
                outs = self.llm.generate([p for _, p, _ in ready], [s for _, _, s in ready], use_tqdm=False)
                for (k, _, _), out in zip(ready, outs):
                    texts[k] = out.outputs[0].text
            except Exception:  # noqa: BLE001 - one bad request fails the call: find it, answer the rest
                for k, prompt, params in ready:
                    try:
                        texts[k] = self.llm.generate([prompt], [params], use_tqdm=False)[0].outputs[0].text
                    except Exception as err:  # noqa: BLE001
                        errors[k] = _error_text(err)
        return {"id": ids, "text": texts, "error": errors}


def _error_text(err: BaseException) -> str:
    from actors.serve.replica import engine_error

    item = engine_error(err)
    return item["error"]["message"] if item else f"{type(err).__name__}: {err}"


class BatchEngine:
    """Answers with a pool of vLLM actors over Ray Data (Ray must be initialised by the caller)."""

    def __init__(self, weights: MemberWeights, storage: StorageSection, options: BatchOptions, *,
                 cache_uri: Optional[str] = None, progress_label: str = "eval answers"):
        self.weights, self.storage, self.options = weights, storage, options
        self.cache_uri = cache_uri.rstrip("/") if cache_uri else None
        self.progress_label = progress_label
        self.reused = 0  # requests answered from block files of an earlier run (last answer())

    def _store(self):
        from cluster.storage import open_storage

        return open_storage(self.storage)

    def answer(self, requests: list[AnswerRequest]) -> list[Answer]:
        from cluster.logs import Progress

        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")
        size = max(1, self.options.block_size)
        blocks = [requests[i:i + size] for i in range(0, len(requests), size)]
        names = [f"block-{k:05d}-{block_key(b)}.jsonl" for k, b in enumerate(blocks)]
        store = self._store() if self.cache_uri else None
        answers: dict[str, Answer] = {}
        todo: list[int] = []
        for k, name in enumerate(names):
            uri = f"{self.cache_uri}/{name}" if store else None
            if store is not None and store.exists(uri):
                for line in store.read_bytes(uri).decode().splitlines():
                    a = json.loads(line)
                    answers[a["id"]] = Answer(a["id"], a["text"], a.get("error"))
            else:
                todo.append(k)
        self.reused = len(answers)
        with Progress(self.progress_label, total=len(requests), unit="prompts") as progress:
            progress.update(len(answers), reused=self.reused)
            if todo:
                self._run(blocks, names, todo, answers, store, progress)
        return [answers[r.id] for r in requests]

    def _run(self, blocks, names, todo, answers, store, progress) -> None:
        import ray

        rows, block_of = [], {}
        for k in todo:
            for r in blocks[k]:
                block_of[r.id] = k
                rows.append({"id": r.id, "messages": json.dumps(r.messages), "images": list(r.images),
                             "max_tokens": int(r.max_tokens)})
        pending = {k: len(blocks[k]) for k in todo}
        n_blocks = max(1, min(len(rows), len(todo) * 2, 200))
        resources = {"num_cpus": self.options.num_cpus}
        if self.options.num_gpus:
            resources["num_gpus"] = self.options.num_gpus
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
            VLLMAnswerer, fn_constructor_kwargs={"weights": self.weights, "storage": self.storage,
                                                 "options": self.options},
            batch_size=self.options.batch_size, concurrency=max(1, self.options.actors), batch_format="numpy",
            **resources)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for rid, text, error in zip(batch["id"], batch["text"], batch["error"]):
                rid = str(rid)
                answers[rid] = Answer(rid, str(text), str(error) or None)
                k = block_of[rid]
                pending[k] -= 1
                if pending[k] == 0 and store is not None:
                    lines = [json.dumps({"id": r.id, "text": answers[r.id].text, "error": answers[r.id].error})
                             for r in blocks[k]]
                    store.write_bytes(f"{self.cache_uri}/{names[k]}", ("\n".join(lines) + "\n").encode())
            progress.update(len(answers))
