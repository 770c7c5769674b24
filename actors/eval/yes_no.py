"""Yes/no benchmarks: POPE and MME, plus the generic yes/no extraction.

- Extraction. ``extract_yes_no`` is VLMEvalKit's ``YOrN_Extraction`` (``dataset/utils/yorn.py``):
  lower-case, punctuation processed, split; "yes" without "no" -> ``yes``, "no" without "yes" ->
  ``no``, else ``unknown``. ``extract_pope`` is POPE's own rule (LLaVA ``llava/eval/eval_pope.py``,
  from RUCAIBox/POPE): keep the first sentence, drop commas, split on spaces; any of ``No`` /
  ``not`` / ``no`` -> ``no``, else ``yes``. ``extract_mme`` is lmms-eval's ``tasks/mme/utils.py``
  ``parse_pred_ans`` (from Otter): ``yes``/``no``/``y``/``n`` or "yes"/"no" in the first 4 chars.
- POPE (``eval_pope.py``; lmms-eval ``tasks/pope/utils.py`` for precision/recall/F1 with 0 on an
  empty denominator): accuracy, precision, recall, F1 with "yes" positive, and the yes-ratio =
  share of *predictions* that are yes (POPE's definition; lmms-eval's ``pope_aggregate_yes_ratio``
  counts the ground truth instead, which is always 0.5 on POPE).
- MME (lmms-eval ``mme_aggregate_results``, VLMEvalKit ``MME_rating``): per subtask ``acc`` = share
  of questions right, ``acc+`` = share of images whose two questions are both right, score =
  ``100 * acc + 100 * acc+``; perception = sum of the 10 perception subtask scores, cognition = sum
  of the 4 cognition ones (max 2000 / 800).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Sequence

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def _vlmeval_punctuation(text: str) -> str:
    """VLMEvalKit ``smp/misc.py`` ``process_punctuation`` (its period regex is a real lookbehind)."""
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or _COMMA.search(text)) else " ")
    return _PERIOD.sub("", out, re.UNICODE)


def extract_yes_no(prediction: str) -> str:
    words = _vlmeval_punctuation(prediction.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return "unknown"


def extract_pope(prediction: str) -> str:
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def extract_mme(prediction: str) -> str:
    ans = prediction.lower().strip().replace(".", "")
    if ans in ("yes", "no"):
        return ans
    if len(ans) == 1:
        return {"y": "yes", "n": "no"}.get(ans, "other")
    head = ans[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def gt_yes_no(answer: str) -> str:
    """A ground-truth yes/no cell (``Yes``, ``no.``, ...) -> ``yes`` / ``no``; ValueError otherwise."""
    a = answer.lower().strip().replace(".", "")
    if a not in ("yes", "no"):
        raise ValueError(f"answer {answer!r} is not yes/no")
    return a


def pope_scores(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """(predicted label, true label) pairs, labels ``yes``/``no`` -> fractions in [0, 1] and counts."""
    tp = fp = tn = fn = 0
    n = 0
    for pred, gt in pairs:
        n += 1
        if pred == "yes":
            tp, fp = (tp + 1, fp) if gt == "yes" else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if gt == "yes" else (fn, tn + 1)
    if n == 0:
        raise ValueError("POPE needs at least one question")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def mme_scores(records: Sequence[tuple[str, str, bool]]) -> dict:
    """(subtask, image key, right) per question -> ``{"subtasks": {name: {acc, acc_plus, score,
    questions, images}}, "perception", "cognition", "total", "unpaired_images"}`` (acc in %)."""
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, right in records:
        by_task[task][image].append(bool(right))
    subtasks, unpaired = {}, 0
    for task in sorted(by_task):
        images = by_task[task]
        answers = [r for rs in images.values() for r in rs]
        unpaired += sum(1 for rs in images.values() if len(rs) != 2)
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(rs) for rs in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                          "questions": len(answers), "images": len(images)}
    perception = sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION)
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition,
            "total": perception + cognition, "unpaired_images": unpaired}
