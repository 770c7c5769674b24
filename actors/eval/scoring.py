"""One scorer for every metric: (question, raw answer) records -> per-sample rows + a scores dict.

    >>> result = score_benchmark("vqa", [(q, "Two")])
    >>> result.rows[0]       # SampleScore(id='7', raw='Two', extracted='2', score=0.6, right=False, ...)
    >>> result.scores        # {"metric": "vqa", "overall": 60.0, "n": 1, "categories": {...}, ...}

``scores`` is JSON-ready (``scores.json``): ``metric``, ``overall`` (the headline number, in %;
CIDEr x 100; MME the perception total), ``n`` (scored units: questions, or question groups for
CircularEval), ``categories`` / ``l2_categories`` / ``splits`` (the same measure per value of
those columns), ``details`` (metric-specific: POPE's five figures, MME's subtasks and totals,
CircularEval's single-pass accuracy), ``invalid`` (records whose ground truth the metric cannot
use, with the reason; they are left out, never raised). ``rows[i].right`` is ``score == 1``
(``None`` for CIDEr); for ``mcq_circular`` a row is one rotation (its own letter right or not),
the group verdicts make ``overall`` and ``details.failed_groups``.

Metrics (the benchmark's ``metric``; prompt style in ``prompts.STYLE_FOR_METRIC``):
``mcq`` (VLMEvalKit single pass), ``mcq_circular`` (MMBench CircularEval), ``vqa`` (official VQA
accuracy), ``anls``, ``relaxed_accuracy``, ``exact_match``, ``first_word`` (this project's
closed-vocabulary match, the demo's), ``scienceqa``, ``yes_no`` (VLMEvalKit
yes/no accuracy), ``pope``, ``mme``, ``grounding`` (Acc@IoU>=0.5), ``cider``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from actors.eval import choice, cider, grounding, open_answer, vqa_accuracy, yes_no
from actors.eval.benchmark_file import Question
from models.errors import UserError

METRICS = ("mcq", "mcq_circular", "vqa", "anls", "relaxed_accuracy", "exact_match", "first_word", "scienceqa",
           "yes_no", "pope", "mme", "grounding", "cider")
Record = tuple[Question, str]


@dataclass(frozen=True)
class SampleScore:
    id: str
    row: int
    group: str
    raw: str
    extracted: Optional[str]
    score: float
    right: Optional[bool]
    category: Optional[str] = None
    l2_category: Optional[str] = None
    split: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchmarkScores:
    metric: str
    rows: tuple[SampleScore, ...]
    scores: dict[str, Any]


def score_benchmark(metric: str, records: Sequence[Record], *, judge: Optional[Callable[[str], str]] = None,
                    grounding_frame: str = "center") -> BenchmarkScores:
    """Score ``records`` with ``metric``. ``judge`` (prompt -> reply) resolves multiple-choice answers
    the rules cannot read; ``grounding_frame`` is the box frame of ``grounding.normalize_gt``.
    UserError for an unknown metric or when no record suits the metric (e.g. ``mcq`` on a file
    without options)."""
    if metric not in METRICS:
        raise UserError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not records:
        raise ValueError("nothing to score")
    rows: list[SampleScore] = []
    invalid: list[dict] = []
    for q, raw in records:
        try:
            extracted, score = _per_sample(metric, q, raw or "", judge, grounding_frame)
        except ValueError as e:
            invalid.append({"id": q.id, "row": q.row, "reason": str(e)})
            continue
        right = None if metric == "cider" else score >= 1.0
        rows.append(SampleScore(q.id, q.row, q.group, raw, extracted, float(score), right,
                                q.category, q.l2_category, q.split))
    kept = {r.id for r in rows}
    records = [(q, raw) for q, raw in records if q.id in kept]
    if not rows:
        raise UserError(f"no record can be scored with {metric}: first problem: {invalid[0]['reason']}")
    if metric == "cider":
        _, per = cider.cider_d([raw or "" for _, raw in records], [q.answers for q, _ in records])
        rows = [dataclasses.replace(r, score=s) for r, s in zip(rows, per)]
    scores = _aggregate(metric, records, rows, judge)
    scores["invalid"] = invalid
    return BenchmarkScores(metric, tuple(rows), scores)


def _per_sample(metric: str, q: Question, raw: str, judge, frame: str) -> tuple[Optional[str], float]:
    if not q.answers:
        raise ValueError("no answer")
    if metric in ("mcq", "mcq_circular"):
        if q.answer not in q.options:
            raise ValueError(f"answer {q.answer!r} is not an option letter")
        letter = choice.can_infer(raw, q.options)
        if letter is None and metric == "mcq":
            letter, _ = choice.extract_choice(q, raw, judge)
        return letter, float(letter == q.answer)
    if metric == "vqa":
        acc, pred = vqa_accuracy.vqa_accuracy(raw, q.answers)
        return pred, acc
    if metric == "anls":
        return raw.strip(), open_answer.anls(raw, q.answers)
    if metric == "relaxed_accuracy":
        return raw.strip(), open_answer.relaxed_accuracy(raw, q.answers)
    if metric == "exact_match":
        return open_answer.normalize_exact(raw), open_answer.exact_match(raw, q.answers)
    if metric == "first_word":
        return open_answer.first_word(raw), open_answer.first_word_match(raw, q.answers)
    if metric == "scienceqa":
        return raw.strip(), open_answer.scienceqa_match(raw, q.answer)
    if metric in ("yes_no", "pope", "mme"):
        gt = yes_no.gt_yes_no(q.answer)
        extract = {"yes_no": yes_no.extract_yes_no, "pope": yes_no.extract_pope, "mme": yes_no.extract_mme}[metric]
        label = extract(raw)
        return label, float(label == gt)
    if metric == "grounding":
        gt = grounding.parse_box(q.answer)
        if gt is None and len(q.answers) == 4:  # a TSV cell "[x1, y1, x2, y2]" reads as four VQA-style answers
            gt = grounding.parse_box("[" + ",".join(q.answers) + "]")
        if gt is None:
            raise ValueError(f"answer {q.answer!r} is not a box [x1, y1, x2, y2]")
        size = [_number(q.extra.get(k)) for k in ("width", "height")]
        iou, pred = grounding.grounding_iou(raw, gt, size[0], size[1], frame)
        return (None if pred is None else str(list(pred))), float(iou >= grounding.IOU_THRESHOLD)
    return raw.strip(), 0.0  # cider: scored over the whole set afterwards


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _breakdown(values: Sequence[tuple[Optional[str], float]]) -> dict[str, float]:
    by: dict[str, list[float]] = defaultdict(list)
    for key, v in values:
        if key is not None:
            by[key].append(v)
    return {k: 100.0 * sum(v) / len(v) for k, v in sorted(by.items())}


def _mean_pct(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def _aggregate(metric: str, records: Sequence[Record], rows: Sequence[SampleScore], judge) -> dict:
    out: dict[str, Any] = {"metric": metric}
    details: dict[str, Any] = {}
    if metric == "mcq_circular":
        groups = choice.circular_groups(records, judge)
        first = {}
        for q, _ in records:
            first.setdefault(q.group, q)
        units = [(first[g.group], float(g.hit)) for g in groups]
        # the single-pass accuracy on each group's first copy (VLMEvalKit's "vanilla_0")
        first_rows = {}
        for r in rows:
            first_rows.setdefault(r.group, r)
        details["single_pass"] = _mean_pct([r.score for r in first_rows.values()])
        details["rotations"] = len(rows)
        details["failed_groups"] = [{"group": g.group, "log": g.log} for g in groups if not g.hit][:50]
    elif metric == "pope":
        pairs = [(r.extracted, yes_no.gt_yes_no(q.answer)) for (q, _), r in zip(records, rows)]
        details.update(yes_no.pope_scores(pairs))
        out.update(metric=metric, overall=100.0 * details["f1"], n=len(rows))
        cats: dict[str, list] = defaultdict(list)
        for (q, _), pair in zip(records, pairs):
            for c in (q.category or "").split(","):  # POPE_rating explodes "a,b" categories
                if c:
                    cats[c].append(pair)
        out["categories"] = {c: 100.0 * yes_no.pope_scores(p)["f1"] for c, p in sorted(cats.items())}
        out["l2_categories"], out["splits"] = {}, _breakdown([(r.split, r.score) for r in rows])
        out["details"] = details
        return out
    elif metric == "mme":
        mme = yes_no.mme_scores([(q.category or "", q.image_key, bool(r.right)) for (q, _), r in zip(records, rows)])
        out.update(overall=mme["perception"], n=len(rows),
                   categories={k: v["score"] for k, v in mme["subtasks"].items()},
                   l2_categories={}, splits={}, details=mme)
        return out
    else:
        units = [(q, r.score) for (q, _), r in zip(records, rows)]
        if metric in ("mcq", "mcq_circular"):
            details["unresolved"] = sum(1 for r in rows if r.extracted is None)
        if metric == "cider":
            details["cider"] = sum(r.score for r in rows) / len(rows)
    out["overall"] = _mean_pct([v for _, v in units])  # CIDEr 1.17 -> 117.0, as papers print it
    out["n"] = len(units)
    out["categories"] = _breakdown([(q.category, v) for q, v in units])
    out["l2_categories"] = _breakdown([(q.l2_category, v) for q, v in units])
    out["splits"] = _breakdown([(q.split, v) for q, v in units])
    out["details"] = details
    return out


def summary_table(scores_by_benchmark: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width text table, one line per benchmark: name, metric, n, headline score (2 dp)."""
    header = ("benchmark", "metric", "n", "score")
    lines = [(name, str(s.get("metric", "")), str(s.get("n", "")),
              "-" if s.get("overall") is None else f"{float(s['overall']):.2f}")
             for name, s in scores_by_benchmark.items()]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]

    def fmt(r: tuple[str, ...]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)]) + "\n"
