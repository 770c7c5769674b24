"""``textvqa``: TextVQA's JSON (``TextVQA_0.5.1_train.json``), read whole; ST-VQA-style files with
the same keys read the same way.

Before::

    {"dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1",
     "data": [{"question": "what is the brand of phone?", "image_id": "0054c91397f2fe05",
               "image_width": 1024, "image_height": 730, "answers": ["nokia", "nokia", "toshiba", ...],
               "question_id": 0, "set_name": "train", ...}]}

After: id ``"0"``, image ``0054c91397f2fe05.jpg``, the question asked with the source's prompt
(default ``short_answer``, as LLaVA-1.5 trains on it) and the most frequent of the ten answers.
Names: ``data``, ``question``, ``answers``, ``image_id``, ``question_id``. Quarantined: no answers
(the test split has none: ``missing_answer``), an empty question or no image (``bad_field``).
"""

from __future__ import annotations

from typing import Any, Iterator, Union

from actors.data.layouts.base import Context, Item, Layout, Rejected, Sample, as_id, most_common, turns


def qa_sample(ctx: Context, rid: str, question: Any, answer: Any, image: Any) -> Item:
    """One question on one image -> a sample, or the reason it is rejected."""
    if not isinstance(question, str) or not question.strip():
        return Rejected(rid, "bad_field", "the question is empty or not a string", question)
    if not isinstance(answer, str) or not answer.strip():
        return Rejected(rid, "missing_answer", f"question {rid} has no answer", question)
    if not isinstance(image, str) or not image:
        return Rejected(rid, "bad_field", f"question {rid} names no image", question)
    return Sample(rid, turns(ctx.ask(rid, question=question.strip()), answer.strip()), [image])


def questions(data: Any, ctx: Context, dataset: str) -> Iterator[Union[Rejected, tuple[int, dict]]]:
    """The ``data`` list of a TextVQA / DocVQA file as ``(i, question object)``; a Rejected for a
    file without the list and for an item that is not an object."""
    items = data.get(ctx.col("data")) if isinstance(data, dict) else None
    if not isinstance(items, list):
        yield Rejected(f"{ctx.prefix}:file", "bad_field", f"a {dataset} file holds a {ctx.col('data')!r} list",
                       str(data)[:200])
        return
    for i, q in enumerate(items):
        yield (i, q) if isinstance(q, dict) else Rejected(ctx.fallback(i), "bad_field", f"item {i} is not an object", q)


class TextVqa(Layout):
    name = "textvqa"
    document = True
    prompt = "short_answer"
    prompts = ("short_answer", "ocr")
    columns = {"data": "data", "question": "question", "answers": "answers", "image_id": "image_id",
               "question_id": "question_id"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        for item in questions(data, ctx, "TextVQA"):
            if isinstance(item, Rejected):
                yield item
                continue
            i, q = item
            rid = as_id(q.get(ctx.col("question_id"))) or ctx.fallback(i)
            image = as_id(q.get(ctx.col("image_id")))
            answers = q.get(ctx.col("answers"))
            answer = most_common(answers) if isinstance(answers, list) else None
            yield qa_sample(ctx, rid, q.get(ctx.col("question")), answer, f"{image}.jpg" if image else None)
