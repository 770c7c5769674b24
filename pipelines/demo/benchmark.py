"""The demo's held-out questions as a benchmark the eval harness scores (issue #23 item 7).

The held-out split becomes a VLMEvalKit TSV (``actors.eval.benchmark_file``), one row a question::

    index                  image                  question                           answer  category
    heldout-00003-colour   iVBORw0KGgoAAAANS...   What colour is the shape? Answ...  red     colour
    heldout-00003-shape    heldout-00003-colour   What shape is shown? Answer wi...  circle  shape
    heldout-00012-chat                            Say the word cat. Answer with ...  cat     chat

- ``image``: the sample's PNG as base64 on its first question; its other questions refer to that
  row's ``index`` (VLMEvalKit's own space saver); empty for a text-only chat turn, which the
  benchmark reads with ``text_only`` on;
- ``question``: the training turn without ``<image>\\n``: the harness puts the image first and the
  text after a newline (``prompt: plain``), so the prompt the server builds is the training
  template token for token;
- ``category``: the question type, so the harness's per-category scores are the demo's per-type
  accuracies.

:func:`eval_section` is the spec's ``eval`` section that has ``pipelines.stages.eval`` ask these
questions through the served endpoint (``first_word`` match, the served answers' tokens kept for
the parity check); :func:`evaluation` reads the harness's outputs back into the demo's report.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from typing import Any, Optional

from actors.eval.benchmark_file import tsv_text

BENCHMARK = "demo-heldout"
FILE = "heldout.tsv"
METRIC = "first_word"  # actors.eval.open_answer.first_word: the demo's one-word answers
SAMPLES = 8  # (question, answer, expected) examples in the report


def heldout_tsv(rows: list[dict], images: dict[str, bytes]) -> bytes:
    """``Dataset.heldout_rows()`` (and the held-out images by path) -> the TSV's bytes."""
    out, first_of = [], {}
    for row in rows:
        text = row["conversations"][0]["value"]
        image_cell = ""
        if "image" in row:
            path = row["image"]
            if path in first_of:
                image_cell = first_of[path]
            else:
                first_of[path] = row["id"]
                image_cell = base64.b64encode(images[path]).decode()
            text = text.removeprefix("<image>\n")
        out.append({"index": row["id"], "image": image_cell, "question": text, "answer": row["answer"],
                    "category": row["type"]})
    return tsv_text(out).encode()


def eval_section(tsv_uri: str, url: str, model: str, *, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """The spec's ``eval`` section: the held-out TSV asked through ``url``'s OpenAI API."""
    return {"benchmarks": [{"name": BENCHMARK, "path": tsv_uri, "format": "vqa_tsv", "metric": METRIC,
                            "prompt": "plain", "max_tokens": max_tokens, "text_only": True}],
            "endpoint": {"url": f"{url}/v1", "model": model, "concurrency": concurrency, "logprobs": True},
            "output": "eval"}


def evaluation(scores: dict, predictions: list[dict], questions: dict[str, tuple[str, str]],
               wall_s: Optional[float]) -> dict[str, Any]:
    """The harness's ``scores.json`` and ``predictions.jsonl`` rows -> the demo's evaluation.

    ``questions``: id -> (question text, expected answer), for the report's samples. Returns
    ``{"types": {type: {"correct", "total", "accuracy"}}, "requests", "errors", "wall_s",
    "latency_s": {p50, p99, mean}, "requests_per_s", "samples", "answers"}``; ``answers`` holds
    every answered question by id as ``pipelines.demo.parity`` reads them (``text``,
    ``finish_reason``, ``prompt_tokens``, ``tokens``).
    """
    total = Counter(p["category"] for p in predictions)
    right = Counter(p["category"] for p in predictions if p["right"])
    by_category = scores["scores"]["categories"]  # the harness's per-category figure, in %
    types = {t: {"correct": right[t], "total": n, "accuracy": by_category[t] / 100}
             for t, n in sorted(total.items())}
    errors = [{"id": p["id"], "error": p["error"]} for p in predictions if p.get("error")]
    answers = {p["id"]: {"text": p["raw"], "finish_reason": p.get("finish_reason"),
                         "prompt_tokens": p.get("prompt_tokens"), "tokens": list(p.get("tokens") or [])}
               for p in predictions if not p.get("error")}
    samples = [{"id": p["id"], "question": questions[p["id"]][0], "answer": p["raw"],
                "expected": questions[p["id"]][1]} for p in predictions if not p.get("error")][:SAMPLES]
    latency = scores.get("latency_s") or {}
    return {"types": types, "requests": len(predictions), "errors": errors, "wall_s": wall_s,
            "latency_s": {k: latency.get(k) for k in ("p50", "p99", "mean")},
            "requests_per_s": round(len(predictions) / wall_s, 2) if wall_s else None,
            "samples": samples, "answers": answers, "score": scores["score"], "metric": scores["metric"],
            "categories": by_category}


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
