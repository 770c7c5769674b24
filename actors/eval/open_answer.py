"""Open-answer metrics: ANLS (DocVQA, InfoVQA), relaxed accuracy (ChartQA), exact match (GQA),
ScienceQA's letter match. Each returns a per-question score in [0, 1].

- ANLS (lmms-eval ``lmms_eval/api/metrics.py`` ``anls``, = VLMEvalKit ``vqa_eval.anls_compute`` +
  ``hit_calculate``): per human answer the Levenshtein distance of the whitespace-collapsed,
  lower-cased strings over the longer of the two *raw* lengths; the question scores
  ``1 - min(distance)``, or 0 when that is below 0.5. ``anls("Hello", ["hallo"])`` = 1 - 1/5 = 0.8.
- relaxed accuracy (lmms-eval ``tasks/chartqa/utils.py`` ``relaxed_correctness(prediction,
  target)``): numbers (``"12%"`` = 0.12) are right within 5 % of a non-zero target, anything else
  needs a case-insensitive exact match; the prediction is stripped and the best answer counts
  (VLMEvalKit ``process_line(method='relaxed_accuracy')``).
- exact match (lmms-eval ``tasks/gqa/gqa.yaml``: ``exact_match`` with ``ignore_case`` and
  ``ignore_punctuation``, i.e. ``string.punctuation`` removed; stripped as VLMEvalKit's GQA
  ``accuracy``): ``"Yes."`` matches ``"yes"``.
- ScienceQA (lmms-eval ``tasks/scienceqa/utils.py`` ``sqa_process_results``): the stripped
  prediction equals the answer letter (any case), or starts with ``"<Capital>."`` whose letter is it.
"""

from __future__ import annotations

import string
from typing import Optional, Sequence

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def levenshtein(s1: str, s2: str) -> int:
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    prev = list(range(len(s1) + 1))
    for i2, c2 in enumerate(s2):
        cur = [i2 + 1]
        for i1, c1 in enumerate(s1):
            cur.append(prev[i1] if c1 == c2 else 1 + min(prev[i1], prev[i1 + 1], cur[-1]))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    values = []
    det = " ".join(prediction.strip().lower().split())
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


def _to_float(text: str) -> Optional[float]:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = RELAXED_TOLERANCE) -> bool:
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    pred = prediction.strip()
    return float(max(relaxed_correctness(pred, a) for a in answers))


def normalize_exact(text: str) -> str:
    return text.strip().lower().translate(_NO_PUNCT)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_exact(prediction)
    return float(any(pred == normalize_exact(a) for a in answers))


def first_word(text: str) -> str:
    """This project's closed-vocabulary key (the demo's one-word answers, not a field metric): the
    first word, lowercased, ``###`` turn separators and surrounding punctuation stripped
    ("Red." -> "red", " 3\n###" -> "3")."""
    words = text.strip().lower().replace("###", " ").split()
    return words[0].strip(".,!?;:'\"") if words else ""


def first_word_match(prediction: str, answers: Sequence[str]) -> float:
    pred = first_word(prediction)
    return float(any(pred == first_word(a) for a in answers))


def scienceqa_match(prediction: str, answer_letter: str) -> float:
    target = answer_letter.strip().lower()
    pred = prediction.strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    return 0.0
