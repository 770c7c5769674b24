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

The grounding questions (``where``) go to a second file, ``demo-where``, scored by Acc@IoU >= 0.5
(``actors.eval.grounding``): its ``answer`` is the pixel box and ``width`` / ``height`` the image's
size, so the harness moves the box onto the model's canvas (the flavour's pad) itself::

    index                image                 question                            answer                     width  height
    heldout-00004-where  iVBORw0KGgoAAAANS...  Where is the red square?            [40.5, 12.25, 98.0, 69.75]  128    128

:func:`eval_section` is the spec's ``eval`` section that has ``pipelines.stages.eval`` ask these
questions through the served endpoint (``first_word`` match, the served answers' tokens kept for
the parity check); :func:`evaluation` reads the harness's outputs back into the demo's report.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from types import SimpleNamespace
from typing import Any, Optional

from PIL import Image

from actors.eval.benchmark_file import tsv_text
from pipelines.stages.eval import answer_timing

BENCHMARK = "demo-heldout"
FILE = "heldout.tsv"
METRIC = "first_word"  # actors.eval.open_answer.first_word: the demo's one-word answers
WHERE_BENCHMARK = "demo-where"
WHERE_FILE = "heldout-where.tsv"
WHERE_METRIC = "grounding"  # actors.eval.grounding: Acc@IoU >= 0.5
WHERE_MAX_TOKENS = 32  # "[0.12,0.34,0.56,0.78]" and its end
SAMPLES = 8  # (question, answer, expected) examples in the report


def heldout_tsvs(rows: list[dict], images: dict[str, bytes]) -> dict[str, bytes]:
    """``Dataset.heldout_rows()`` (and the held-out images by path) -> {benchmark: the TSV's bytes}:
    ``demo-heldout`` and, when there are ``where`` questions, ``demo-where``."""
    from pipelines.demo.synthetic import REGION_TYPE

    files = {BENCHMARK: [r for r in rows if r["type"] != REGION_TYPE],
             WHERE_BENCHMARK: [r for r in rows if r["type"] == REGION_TYPE]}
    return {name: _tsv(part, images) for name, part in files.items() if part}


def _tsv(rows: list[dict], images: dict[str, bytes]) -> bytes:
    out, first_of = [], {}
    for row in rows:
        text = row["conversations"][0]["value"]
        cells = {"index": row["id"], "image": "", "question": text, "answer": row["answer"], "category": row["type"]}
        if "image" in row:
            path = row["image"]
            if path in first_of:
                cells["image"] = first_of[path]
            else:
                first_of[path] = row["id"]
                cells["image"] = base64.b64encode(images[path]).decode()
            cells["question"] = text.removeprefix("<image>\n")
            if "boxes" in row:  # the pixel box's image size, for the harness's frame
                cells["width"], cells["height"] = Image.open(io.BytesIO(images[path])).size
        out.append(cells)
    return tsv_text(out).encode()


def eval_section(tsv_uris: dict[str, str], url: str, model: str, *, concurrency: int, max_tokens: int,
                 box_frame: str) -> dict[str, Any]:
    """The spec's ``eval`` section: the held-out TSVs ({benchmark: uri}) asked through ``url``'s
    OpenAI API; ``box_frame``: the served flavour's square (``actors.eval.grounding.FRAMES``)."""
    benchmarks = [{"name": BENCHMARK, "path": tsv_uris[BENCHMARK], "format": "vqa_tsv", "metric": METRIC,
                   "prompt": "plain", "max_tokens": max_tokens, "text_only": True}]
    if WHERE_BENCHMARK in tsv_uris:
        benchmarks.append({"name": WHERE_BENCHMARK, "path": tsv_uris[WHERE_BENCHMARK], "format": "vqa_tsv",
                           "metric": WHERE_METRIC, "prompt": "plain", "max_tokens": WHERE_MAX_TOKENS,
                           "box_frame": box_frame})
    return {"benchmarks": benchmarks,
            "endpoint": {"url": f"{url}/v1", "model": model, "concurrency": concurrency, "logprobs": True},
            "output": "eval"}


def evaluation(results: list[tuple[dict, list[dict]]], questions: dict[str, tuple[str, str]],
               wall_s: Optional[float]) -> dict[str, Any]:
    """The harness's ``scores.json`` and ``predictions.jsonl`` rows, one pair per benchmark -> the
    demo's evaluation.

    ``questions``: id -> (question text, expected answer), for the report's samples. Returns
    ``{"types": {type: {"correct", "total", "accuracy"}}, "requests", "errors", "wall_s",
    "latency_s": {p50, p99, mean}, "requests_per_s", "samples", "answers", "score", "metric",
    "categories", "timing"}`` (``score`` and ``metric``: the first benchmark's; ``latency_s``: of
    every answer; ``timing``: one row per request, slowest first: id, category, latency_s,
    attempts, completion_tokens, finish_reason, error); ``answers`` holds every answered question
    by id as ``pipelines.demo.parity`` reads them (``text``, ``finish_reason``, ``prompt_tokens``,
    ``tokens``).
    """
    scores = results[0][0]
    predictions = [p for _, rows in results for p in rows]
    total = Counter(p["category"] for p in predictions)
    right = Counter(p["category"] for p in predictions if p["right"])
    by_category = {c: v for s, _ in results for c, v in s["scores"]["categories"].items()}  # the harness's, in %
    types = {t: {"correct": right[t], "total": n, "accuracy": by_category[t] / 100}
             for t, n in sorted(total.items())}
    errors = [{"id": p["id"], "error": p["error"]} for p in predictions if p.get("error")]
    answers = {p["id"]: {"text": p["raw"], "finish_reason": p.get("finish_reason"),
                         "prompt_tokens": p.get("prompt_tokens"), "tokens": list(p.get("tokens") or [])}
               for p in predictions if not p.get("error")}
    samples = [{"id": p["id"], "question": questions[p["id"]][0], "answer": p["raw"],
                "expected": questions[p["id"]][1]} for p in predictions if not p.get("error")][:SAMPLES]
    latency = answer_timing([SimpleNamespace(latency_s=p.get("latency_s"), error=p.get("error"))
                             for p in predictions]) or {}
    timing = sorted(({k: p.get(k) for k in ("id", "category", "latency_s", "attempts", "completion_tokens",
                                             "finish_reason", "error")} for p in predictions),
                    key=lambda t: -(t["latency_s"] or 0.0))
    return {"types": types, "requests": len(predictions), "errors": errors, "wall_s": wall_s,
            "latency_s": {k: latency.get(k) for k in ("p50", "p99", "mean")},
            "requests_per_s": round(len(predictions) / wall_s, 2) if wall_s else None,
            "samples": samples, "answers": answers, "score": scores["score"], "metric": scores["metric"],
            "categories": by_category, "timing": timing}


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
