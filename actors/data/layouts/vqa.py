"""``vqa``: VQA-style question files as published, read whole.

- **VQAv2 / OK-VQA**: the questions file (``v2_OpenEnded_mscoco_train2014_questions.json``,
  ``OpenEnded_mscoco_train2014_questions.json``) is ``path``, the answers file
  (``v2_mscoco_train2014_annotations.json``, ``mscoco_train2014_annotations.json``) is
  ``annotations``::

      {"data_subtype": "train2014", "questions": [{"image_id": 458752, "question": "What is this man
       doing?", "question_id": 458752000}]}
      {"annotations": [{"question_id": 458752000, "image_id": 458752, "multiple_choice_answer": "skateboarding",
       "answers": [{"answer": "skateboarding", "answer_confidence": "yes", "answer_id": 1}, ...]}]}

  image ``COCO_train2014_000000458752.jpg`` (``COCO_{data_subtype}_{image_id:012d}.jpg``); the answer
  is ``multiple_choice_answer`` (VQAv2's most frequent answer), else the most frequent of the ten
  ``answers`` (OK-VQA has no ``multiple_choice_answer``).
- **GQA** (``train_balanced_questions.json``, no annotations file): ``{"<qid>": {"imageId":
  "2375429", "question": "...", "answer": "no", "fullAnswer": "No, ...", ...}}``; image
  ``2375429.jpg``.
- **A-OKVQA** (``aokvqa_v1p0_train.json``): ``[{"question_id", "image_id": 299207, "question",
  "choices": [4], "correct_choice_idx": 0, "direct_answers": [10], ...}]``; image
  ``000000299207.jpg`` (COCO 2017). With ``prompt: multiple_choice`` the choices are asked and the
  answer is the letter; otherwise the most frequent direct answer.

One sample per question, asked with the source's prompt (default ``short_answer``). Quarantined: a
question without an answer (``missing_answer``: not in the annotations file, or none given), a
question that is not a non-empty string (``bad_field``), ``multiple_choice`` on a question
without choices (``bad_field``); a file of none of the shapes above is one ``bad_field`` row.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from actors.data import prompts
from actors.data.layouts.base import Context, Item, Layout, Rejected, Sample, as_id, most_common, turns


class Vqa(Layout):
    name = "vqa"
    document = True
    prompt = "short_answer"
    prompts = ("short_answer", "multiple_choice", "ocr")
    annotations = "optional"  # VQAv2 / OK-VQA answers; GQA and A-OKVQA carry theirs
    columns = {"questions": "questions", "annotations": "annotations"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        if isinstance(data, dict) and isinstance(data.get(ctx.col("questions")), list):
            yield from self._vqav2(data, ctx)
        elif isinstance(data, dict) and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
            for qid, q in data.items():
                yield self._one(ctx, qid, q.get("question"), f"{q.get('imageId')}.jpg", q.get("answer"))
        elif isinstance(data, list) and all(isinstance(q, dict) and "choices" in q for q in data):
            for i, q in enumerate(data):
                yield self._aokvqa(ctx, q, i)
        else:
            yield Rejected(f"{ctx.prefix}:file", "bad_field", "not a VQAv2/OK-VQA questions file, a GQA questions "
                           "file or an A-OKVQA file (docs/interfaces.md \"Source layouts\")", str(data)[:200])

    def _vqav2(self, data: dict, ctx: Context) -> Iterator[Item]:
        side = ctx.side.get(ctx.col("annotations")) if isinstance(ctx.side, dict) else None
        if not isinstance(side, list):
            yield Rejected(f"{ctx.prefix}:file", "missing_answer", "a VQAv2 / OK-VQA questions file needs its "
                           "answers file as data.sources[].annotations", None)
            return
        answers = {a.get("question_id"): a for a in side if isinstance(a, dict)}
        subtype = data.get("data_subtype", "")
        for i, q in enumerate(data[ctx.col("questions")]):
            if not isinstance(q, dict):
                yield Rejected(ctx.fallback(i), "bad_field", f"question {i} is not an object", q)
                continue
            ann = answers.get(q.get("question_id"), {})
            answer = ann.get("multiple_choice_answer") or most_common(
                [a.get("answer") for a in ann.get("answers") or [] if isinstance(a, dict)])
            image = q.get("image_id")
            file = f"COCO_{subtype}_{image:012d}.jpg" if isinstance(image, int) else None
            yield self._one(ctx, q.get("question_id"), q.get("question"), file, answer, fallback=ctx.fallback(i))

    def _aokvqa(self, ctx: Context, q: dict, i: int) -> Item:
        image = q.get("image_id")
        file = f"{image:012d}.jpg" if isinstance(image, int) else None
        rid = as_id(q.get("question_id")) or ctx.fallback(i)
        if ctx.prompt == "multiple_choice":
            choices, right = q.get("choices"), q.get("correct_choice_idx")
            if not isinstance(choices, list) or not isinstance(right, int) or not 0 <= right < len(choices):
                return Rejected(rid, "missing_answer", "multiple_choice needs choices and correct_choice_idx", q)
            return self._one(ctx, rid, q.get("question"), file, prompts.letter(right),
                             options=prompts.options_text([str(c) for c in choices]))
        return self._one(ctx, rid, q.get("question"), file, most_common(q.get("direct_answers") or []))

    @staticmethod
    def _one(ctx: Context, qid: Any, question: Any, file: Optional[str], answer: Any, *, fallback: str = "",
             options: Optional[str] = None) -> Item:
        rid = as_id(qid) or fallback
        if not isinstance(question, str) or not question.strip():
            return Rejected(rid, "bad_field", "the question is empty or not a string", question)
        if not isinstance(answer, str) or not answer.strip():
            return Rejected(rid, "missing_answer", f"question {rid} has no answer", question)
        if not file:
            return Rejected(rid, "bad_field", f"question {rid} names no image", question)
        if ctx.prompt == "multiple_choice" and options is None:
            return Rejected(rid, "bad_field", "prompt multiple_choice: this question has no choices", question)
        return Sample(rid, turns(ctx.ask(rid, question=question.strip(), options=options), answer.strip()), [file])
