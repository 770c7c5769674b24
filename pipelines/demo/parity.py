"""Parity: the served endpoint (vLLM) against the PyTorch model (``models.sphinx``), greedy.

Issue #14's bar: on the demo's held-out questions the vLLM path's greedy outputs equal the
PyTorch model's — identical tokens in fp32 on CPU for >= 99 % of requests. For every question
the endpoint's answer (as ``pipelines.demo.demo.evaluate`` keeps it: the text, the OpenAI
``logprobs.content[i].token`` strings and ``usage.prompt_tokens``) is set against the PyTorch
model run here on the same request:

- weights: the model directory the member serves (``pipelines.stages.serve.member_weights`` ->
  ``actors.serve.model_loader.member_model_dir``, as the replica finds it: for the demo the train
  export), loaded as ``SphinxX`` in fp32 on CPU;
- prompt: ``models.chat_inputs.prepare_chat`` (the replica's own ``prepare``) on the same OpenAI
  messages and image bytes, with the spec's ``serve.max_image_pixels``;
- decoding: ``SphinxX.generate`` at temperature 0 with the request's ``max_tokens``, stopped as
  vLLM stops (:func:`served_view`): at EOS (kept in the tokens) and at the first token whose
  text contains ``actors.serve.vllm.engine.TURN_SEPARATOR`` (that token kept, the text cut before the
  stop string);
- comparison: the prompt length, the per-token strings (``tokenizer.decode([id])``, what vLLM's
  logprobs carry for the byte-level debug tokenizer) and the final text.

    >>> compare(spec, "sphinx-x-demo", {"heldout-00003-count": (messages, [png])},
    ...         {"heldout-00003-count": {"text": " 3\\n", "tokens": [" 3", "\\n", "###"], "prompt_tokens": 137}},
    ...         max_tokens=4)
    {"identical": 1, "total": 1, "share": 1.0, "differences": [], "wall_s": 0.4}

A difference records the id, both token lists, the first differing position and, there, the
PyTorch model's margin between its two best logits (a near-tie is what the engines' different
fp32 reduction orders can flip).
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Mapping, Optional, Sequence

from actors.serve.vllm.engine import TURN_SEPARATOR

BATCH = 16  # prompts per SphinxX.generate call (sorted by length: little padding)
SHOWN = 5  # differences kept in the result


def served_view(ids: Sequence[int], tokenizer: Any, *, stop: str = TURN_SEPARATOR) -> tuple[list[int], str]:
    """Generated ids (EOS included when it stopped on it) -> (the ids vLLM keeps, the text it returns).

    vLLM checks the stop string after every token: the first token whose decoded text (special
    tokens skipped) contains ``stop`` ends the request; the ids keep that token, the text ends
    before the stop string.
    """
    ids = list(ids)
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        if stop in text:
            return ids[:k + 1], text[:text.index(stop)]
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def first_difference(a: Sequence, b: Sequence) -> Optional[int]:
    """The first position where ``a`` and ``b`` differ (the shorter length when one is a prefix
    of the other); None when they are equal."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_one(qid: str, served: dict, tokens: list[str], text: str, prompt_tokens: int) -> Optional[dict]:
    """None when the served answer equals the PyTorch one (prompt length, token strings, text);
    else the difference: ``{"id", "served", "torch", "at", "served_text", "torch_text", ...}``."""
    at = first_difference(served["tokens"], tokens)
    if at is None and served["text"] == text and served["prompt_tokens"] == prompt_tokens:
        return None
    diff = {"id": qid, "served": served["tokens"], "torch": tokens, "at": at,
            "served_text": served["text"], "torch_text": text}
    if served["prompt_tokens"] != prompt_tokens:
        diff["prompt_tokens"] = {"served": served["prompt_tokens"], "torch": prompt_tokens}
    return diff


def _load_served_model(spec, model_name: str):
    """(SphinxX fp32 in eval mode, tokenizer) from the directory member ``model_name`` serves."""
    import torch

    from actors.serve.model_loader import member_model_dir
    from models.weights.model_dir import load_model_dir
    from models.errors import UserError
    from pipelines.stages.serve import member_weights

    member = next((m for m in spec.serve.models if m.name == model_name), None)
    if member is None:
        raise UserError(f"parity: no serve model named {model_name!r}")
    directory, temporary = member_model_dir(member_weights(spec, member), spec.storage)
    try:
        return load_model_dir(directory, dtype=torch.float32)
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


def _generate(model, prepared: list, max_tokens: int) -> list[list[int]]:
    """Greedy new ids of each prepared request (``models.chat_inputs.Prepared``), BATCH at a time."""
    import numpy as np
    import torch

    out: list[list[int]] = [[] for _ in prepared]
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].input_ids))
    for start in range(0, len(order), BATCH):
        chunk = [prepared[i] for i in order[start:start + BATCH]]
        with_images = [p for p in chunk if p.views is not None]
        views = torch.from_numpy(np.concatenate([p.views for p in with_images])) if with_images else None
        kept = torch.from_numpy(np.concatenate([p.kept for p in with_images])) if with_images else None
        ids = model.generate([p.input_ids for p in chunk], views, kept, max_new_tokens=max_tokens)
        for i, new in zip(order[start:start + BATCH], ids):
            out[i] = new
    return out


def _margin(model, p, new: list[int], at: int) -> float:
    """top-1 minus top-2 logit of the PyTorch model at generated position ``at``."""
    import torch

    views = torch.from_numpy(p.views) if p.views is not None else None
    kept = torch.from_numpy(p.kept) if p.kept is not None else None
    with torch.no_grad():
        logits = model(torch.tensor([p.input_ids + new[:at]]), views=views, kept=kept).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def compare(spec, model_name: str, questions: dict[str, tuple[list[dict], list[bytes]]],
            answers: dict[str, dict], *, max_tokens: int | Mapping[str, int]) -> dict:
    """Every answered question (``answers`` keys) served vs PyTorch; see the module docstring.
    ``max_tokens``: one limit, or each question's own (its request's) by id.

    Returns ``{"identical", "total", "share", "differences": [first SHOWN], "wall_s"}``.
    """
    from models.chat_inputs import prepare_chat

    t0 = time.perf_counter()
    model, tokenizer = _load_served_model(spec, model_name)
    ids = [qid for qid in questions if qid in answers]
    prepared = [prepare_chat(*questions[qid], tokenizer, model.flavour, max_pixels=spec.serve.max_image_pixels)
                for qid in ids]
    limit = max_tokens.__getitem__ if isinstance(max_tokens, Mapping) else (lambda _: max_tokens)
    generated: list[list[int]] = [[] for _ in ids]
    for n in sorted({limit(q) for q in ids}):  # one batch run per distinct limit
        part = [i for i, q in enumerate(ids) if limit(q) == n]
        for i, new in zip(part, _generate(model, [prepared[i] for i in part], n)):
            generated[i] = new
    identical, differences = 0, []
    for qid, p, new in zip(ids, prepared, generated):
        kept_ids, text = served_view(new, tokenizer)
        diff = compare_one(qid, answers[qid], [tokenizer.decode([t]) for t in kept_ids], text, len(p.input_ids))
        if diff is None:
            identical += 1
            continue
        if len(differences) < SHOWN:
            if diff["at"] is not None and diff["at"] < len(kept_ids):
                diff["torch_logit_margin"] = round(_margin(model, p, kept_ids, diff["at"]), 6)
            differences.append(diff)
    total = len(ids)
    return {"identical": identical, "total": total, "share": identical / total if total else 0.0,
            "differences": differences, "wall_s": round(time.perf_counter() - t0, 2)}
