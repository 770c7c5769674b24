"""Multiple choice: VLMEvalKit's answer extraction and MMBench's CircularEval.

Extraction follows ``vlmeval/utils/matching_util.py`` (``can_infer``): first an option letter
(``can_infer_option``), then an option's text (``can_infer_text``); a prediction neither finds is
``None`` ("cannot tell"), which exact matching scores as ``Z`` (wrong). An optional judge (any
callable ``prompt -> reply``, e.g. an OpenAI-compatible chat endpoint) is asked VLMEvalKit's
matching prompt for those, three tries, as ``multiple_choice.extract_answer_from_item``::

    >>> can_infer("The answer is B.", {"A": "cat", "B": "dog"})
    'B'
    >>> can_infer("a dog", {"A": "cat", "B": "dog"})
    'B'

CircularEval (MMBench; ``vlmeval/tools.py`` ``CIRCULAR`` builds the rotations,
``multiple_choice.mcq_circular_eval`` scores them): a question with n options is asked n times,
rotation i moving the option at letter ``(p + i) % n`` to letter ``p`` (so rotation 1 of A-D puts
the old B at A and the old A at D), the rotated copy's index is ``index + i * 1e6`` and its group
``g_index`` the original index; a group counts right only if every rotation is answered right.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import defaultdict
from typing import Callable, Mapping, Optional, Sequence

from actors.eval.benchmark_file import Question

Judge = Callable[[str], str]
CIRCULAR_OFFSET = 1_000_000
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_REJECTS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILED = "Failed to obtain answer via API"


def can_infer_option(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """An option letter named in ``answer`` (or ``Z`` for a refusal / an explicit Z), else None."""
    if _API_FAILED in answer:
        return None
    if any(r in answer for r in _REJECTS):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            # NOTE: the letter must sit among the last four words (VLMEvalKit: index > len - 5).
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and "Z" in splits:
        return "Z"
    m = _VERBOSE_ANSWER.search(answer or "")
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """The one option whose (lower-cased) text occurs in ``answer``; None if zero or several, or if
    ``answer`` is longer than twice all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def judge_prompt(question: str, options: Mapping[str, str], prediction: str) -> str:
    """VLMEvalKit's matching prompt (``multiple_choice.build_prompt`` with ``build_option_str``)."""
    option_str = "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    return (
        "You are an AI assistant who will help me to match an answer with several options of a "
        "single-choice question. You are provided with a question, several options, and an answer, "
        "and you need to find which option is most similar to the answer. If the meaning of all "
        "options are significantly different from the answer, output Z. Your should output a single "
        "uppercase character in A, B, C, D (if they are valid options), and Z. \n"
        "Example 1: \nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit "
        "C. cat D. dog\nAnswer: a cute teddy bear\nYour output: A\n"
        "Example 2: \nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit "
        "C. cat D. dog\nAnswer: Spider\nYour output: Z\n"
        f"Example 3: \nQuestion: {question}?\nOptions: {option_str}\nAnswer: {prediction}\nYour output: "
    )


def extract_choice(question: Question, prediction: str, judge: Optional[Judge] = None,
                   tries: int = 3) -> tuple[Optional[str], str]:
    """(letter or None, how it was found). None: neither the rules nor the judge could tell."""
    found = can_infer(prediction, question.options)
    if found:
        return found, "rule"
    if judge is None:
        return None, "no match"
    prompt = judge_prompt(question.question, question.options, prediction)
    for _ in range(tries):
        reply = judge(prompt)
        found = can_infer(reply, question.options) if _API_FAILED not in reply else None
        if found:
            return found, f"judge: {reply[:80]}"
    # NOTE: VLMEvalKit then draws a random letter; a deterministic "cannot tell" is scored wrong.
    return None, "judge could not tell"


# ----------------------------------------------------------------------------- CircularEval


def _has_label_in_choices(options: Mapping[str, str]) -> bool:
    """``CIRCULAR``'s ``abnormal_entry``: option texts naming other letters are not rotated."""
    for text in options.values():
        cleaned = "".join(ch if ch in string.ascii_letters or ch == " " else " " for ch in text)
        if len({w for w in cleaned.split() if w in options}) > 1:
            return True
        if text in string.ascii_uppercase:
            return True
    return False


def rotations(question: Question, offset: int = CIRCULAR_OFFSET) -> list[Question]:
    """The question once per rotation of its options (rotation 0 = itself), ids ``index + i*offset``
    (``{id}@{i}`` for a non-integer id), every copy in the original's group, answer letter moved.

    Not rotated (one copy), as ``CIRCULAR``: fewer than two options, options not ``A..`` in a row,
    an answer that is not one option letter, or option texts that name letters.
    """
    letters = list(question.options)
    n = len(letters)
    base = dataclasses.replace(question, group=question.id)
    if (n < 2 or letters != list(string.ascii_uppercase[:n]) or question.answer not in letters
            or _has_label_in_choices(question.options)):
        return [base]
    out = [base]
    texts = [question.options[k] for k in letters]
    for i in range(1, n):
        options = {letters[p]: texts[(p + i) % n] for p in range(n)}
        answer = letters[(letters.index(question.answer) - i) % n]
        qid = str(int(question.id) + offset * i) if question.id.lstrip("-").isdigit() else f"{question.id}@{i}"
        out.append(dataclasses.replace(base, id=qid, options=options, answers=(answer,) + question.answers[1:]))
    return out


def has_rotations(questions: Sequence[Question]) -> bool:
    """True when the file already holds rotated copies (MMBench's published TSVs do): some row's
    group differs from its own id. Such a file is scored as it is, not expanded again."""
    return any(q.group != q.id for q in questions)


def expand_circular(questions: Sequence[Question], offset: int = CIRCULAR_OFFSET) -> list[Question]:
    """Every question with its rotations, originals first (as ``CIRCULAR`` writes them)."""
    while any(q.id.isdigit() and int(q.id) >= offset for q in questions):
        offset *= 10
    per_q = [rotations(q, offset) for q in questions]
    return [rots[0] for rots in per_q] + [r for rots in per_q for r in rots[1:]]


@dataclasses.dataclass(frozen=True)
class CircularResult:
    group: str
    hit: bool
    members: tuple[str, ...]  # question ids, in the order given
    log: str


def circular_groups(records: Sequence[tuple[Question, str]], judge: Optional[Judge] = None
                    ) -> list[CircularResult]:
    """Score each group (``Question.group``) of (question, prediction) records: right only if every
    rotation's extracted letter equals its answer (``eval_circular_group``: a letter the rules find
    that is wrong fails the group at once; undecided ones go to the judge, else count wrong)."""
    groups: dict[str, list[tuple[Question, str]]] = defaultdict(list)
    for q, pred in records:
        groups[q.group].append((q, pred))
    out = []
    for key, members in groups.items():
        ids = tuple(q.id for q, _ in members)
        pre = [can_infer(p, q.options) for q, p in members]
        wrong = [(q, x) for (q, _), x in zip(members, pre) if x and x != q.answer]
        if wrong:
            q, x = wrong[0]
            out.append(CircularResult(key, False, ids, f"rotation {q.id}: {x} != {q.answer}"))
            continue
        if all(pre):
            out.append(CircularResult(key, True, ids, "all rotations matched"))
            continue
        hit, log = True, "judge"
        for (q, p), x in zip(members, pre):
            if x:
                continue
            letter, how = extract_choice(q, p, judge)
            if letter != q.answer:
                hit, log = False, f"rotation {q.id}: {letter or 'cannot tell'} != {q.answer} ({how})"
                break
        out.append(CircularResult(key, hit, ids, log))
    return out
