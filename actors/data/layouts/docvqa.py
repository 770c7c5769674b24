"""``docvqa``: DocVQA's JSON (``train_v1.0_withQT.json``, ``val_v1.0.json``), read whole;
InfographicVQA's files have the same shape (``image_local_name`` instead of ``image``: map it with
``columns: {image: image_local_name}``).

Before::

    {"dataset_name": "docvqa", "dataset_split": "train", "dataset_version": "1.0",
     "data": [{"questionId": 337, "question": "what is the date mentioned in this letter?",
               "question_types": ["handwritten", "form"], "image": "documents/xnbl0037_1.png",
               "docId": 279, "answers": ["1/8/93"], ...}]}

After: id ``"337"``, image ``documents/xnbl0037_1.png`` (relative to ``image_root``), the question
with the source's prompt (default ``short_answer``) and the first answer (DocVQA's answers are
variants of one answer, all right). Names: ``data``, ``question``, ``answers``, ``image``,
``question_id`` (``questionId``). Quarantined: no answers (the test split: ``missing_answer``),
an empty question or no image (``bad_field``).
"""

from __future__ import annotations

from typing import Any, Iterator

from actors.data.layouts.base import Context, Item, Layout, Rejected, as_id
from actors.data.layouts.textvqa import qa_sample, questions


class DocVqa(Layout):
    name = "docvqa"
    document = True
    prompt = "short_answer"
    prompts = ("short_answer", "ocr")
    columns = {"data": "data", "question": "question", "answers": "answers", "image": "image",
               "question_id": "questionId"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        for item in questions(data, ctx, "DocVQA"):
            if isinstance(item, Rejected):
                yield item
                continue
            i, q = item
            rid = as_id(q.get(ctx.col("question_id"))) or ctx.fallback(i)
            answers = q.get(ctx.col("answers"))
            answer = next((a for a in answers if isinstance(a, str) and a.strip()), None) \
                if isinstance(answers, list) else None
            yield qa_sample(ctx, rid, q.get(ctx.col("question")), answer, q.get(ctx.col("image")))
