"""Questions that refer to numbered marks, answered from the annotations (Set-of-Mark).

Input: the marks in number order as ``(number, category)`` pairs, e.g.
``[(1, "person"), (2, "dog"), (3, "person")]``. Output: LLaVA turns
``[{"from": "human", "value": "<image>\\nWhat is mark 2?"}, {"from": "gpt", "value": "A dog."}, ...]``:

- what is mark k              -> "A dog."                      (k drawn from the marks)
- which mark is the <c>       -> "Mark 2." / "Marks 1 and 3."  (c a category present)
- how many marks show a <c>   -> "2."                          (c a category present; a count)
- where is mark k             -> "[0.10,0.20,0.45,0.80]"         (with ``boxes``: the region's box in
                                                                  ``models.boxes``' text form)
- describe every mark         -> "Mark 1: person. Mark 2: dog. Mark 3: person."

The choices are deterministic per sample (seeded by the sample id), so a rerun writes the same
questions. Every number in a question is a mark of the image and every answer is read off the
annotations (tests check both).
"""

from __future__ import annotations

import hashlib
import random
from typing import Mapping, Optional, Sequence

from models.conversation import IMAGE


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _numbers(ns: Sequence[int]) -> str:
    ns = [str(n) for n in ns]
    return ns[0] if len(ns) == 1 else ", ".join(ns[:-1]) + " and " + ns[-1]


def som_conversation(marks: Sequence[tuple[int, str]], sample_id: str,
                     teacher: Optional[tuple[str, str]] = None, boxes: Optional[Mapping[int, str]] = None) -> list[dict]:
    """The turns for one marked image; ``boxes`` {mark number: box text} adds "where is mark k";
    ``teacher`` = (question, the teacher's answer) adds a last turn."""
    if not marks:
        raise ValueError("som_conversation needs at least one mark")
    rng = random.Random(int(hashlib.sha1(sample_id.encode()).hexdigest()[:12], 16))
    by_cat: dict[str, list[int]] = {}
    for n, cat in marks:
        by_cat.setdefault(cat, []).append(n)
    n, cat = rng.choice(list(marks))
    asked = rng.choice(sorted(by_cat))
    counted = rng.choice(sorted(by_cat))
    which = by_cat[asked]
    qa = [
        (f"What is mark {n}?", f"{_article(cat).capitalize()} {cat}."),
        (f"Which mark is the {asked}?",
         f"Mark {which[0]}." if len(which) == 1 else f"Marks {_numbers(which)}."),
        (f"How many marks show {_article(counted)} {counted}?", f"{len(by_cat[counted])}."),
    ]
    if boxes:
        k = rng.choice(sorted(boxes))
        qa.append((f"Where is mark {k}?", boxes[k]))
    qa.append(("Describe every mark.", " ".join(f"Mark {k}: {c}." for k, c in marks)))
    if teacher is not None:
        qa.append(teacher)
    turns: list[dict] = []
    for i, (q, a) in enumerate(qa):
        turns.append({"from": "human", "value": f"{IMAGE}\n{q}" if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns
