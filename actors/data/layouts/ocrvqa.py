"""``ocrvqa``: OCR-VQA's ``dataset.json`` (book covers), read whole: one object per image.

Before::

    {"1439511679": {"imageURL": "http://ecx.images-amazon.com/images/I/51P1p8LIYHL.jpg",
                    "questions": ["Who wrote this book?", "What is the title of this book?", ...],
                    "answers": ["Kay Hooper", "Tidal Wave", ...], "title": "...", "genre": "...", "split": 1}}

After (one sample per image, its questions as turns, as LLaVA-1.5's mix has them)::

    id "1439511679", images ["1439511679.jpg"], conversations
    [{"from": "human", "value": "<image>\\nWho wrote this book?\\nAnswer the question using a single word or phrase."},
     {"from": "gpt", "value": "Kay Hooper"}, {"from": "human", "value": "What is the title ..."}, ...]

The image is ``<id><extension of imageURL>`` as OCR-VQA's ``downloadImages.py`` saves it. Names:
``questions``, ``answers``, ``imageURL``. Quarantined (``bad_field``): questions and answers
that are not lists of strings of the same length, or no ``imageURL``.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

from actors.data.layouts.base import GPT, HUMAN, IMAGE, Context, Item, Layout, Rejected, Sample


class OcrVqa(Layout):
    name = "ocrvqa"
    document = True
    prompt = "short_answer"
    prompts = ("short_answer", "ocr")
    columns = {"questions": "questions", "answers": "answers", "imageURL": "imageURL"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        if not isinstance(data, dict):
            yield Rejected(f"{ctx.prefix}:file", "bad_field", "an OCR-VQA dataset.json is one object keyed by "
                           "image id", str(data)[:200])
            return
        for rid, item in data.items():
            qs = item.get(ctx.col("questions")) if isinstance(item, dict) else None
            ans = item.get(ctx.col("answers")) if isinstance(item, dict) else None
            url = item.get(ctx.col("imageURL")) if isinstance(item, dict) else None
            if not (isinstance(qs, list) and isinstance(ans, list) and qs and len(qs) == len(ans)
                    and all(isinstance(t, str) and t.strip() for t in qs + ans)):
                yield Rejected(rid, "bad_field", "questions and answers must be lists of strings of the same "
                               "length", item)
                continue
            if not isinstance(url, str) or not url:
                yield Rejected(rid, "bad_field", f"no {ctx.col('imageURL')!r}: the image's file name is unknown", item)
                continue
            conv = []
            for k, (q, a) in enumerate(zip(qs, ans)):
                text = ctx.ask(f"{rid}:{k}", question=q.strip())
                conv += [{"from": HUMAN, "value": (IMAGE + "\n" if k == 0 else "") + text},
                         {"from": GPT, "value": a.strip()}]
            yield Sample(rid, conv, [rid + (posixpath.splitext(url)[1] or ".jpg")])
