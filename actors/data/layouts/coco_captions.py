"""``coco_captions``: COCO's caption file, ``annotations/captions_{train,val}{2014,2017}.json``,
read whole (one JSON document).

Before::

    {"info": {...}, "licenses": [...],
     "images": [{"id": 179765, "file_name": "000000179765.jpg", "width": 640, "height": 480, ...}],
     "annotations": [{"id": 38, "image_id": 179765, "caption": "A black Honda motorcycle parked ..."}]}

After (one sample per caption: COCO has about five per image; ``dedup: images`` keeps one)::

    id "38", images ["000000179765.jpg"], conversations
    [{"from": "human", "value": "<image>\\nDescribe the image concisely."}, {"from": "gpt", "value": "A black Honda ..."}]

The question is the source's prompt (default ``caption``, one of LLaVA's brief-description
templates per row). Names: ``images``, ``annotations``, ``caption``, ``file_name``.
Quarantined: a caption whose ``image_id`` is not among ``images`` (``missing_image_entry``), an
empty or non-string caption (``bad_field``); a file without the ``images`` / ``annotations`` lists
is one ``bad_field`` row.
"""

from __future__ import annotations

from typing import Any, Iterator

from actors.data.layouts.base import Context, Item, Layout, Rejected, Sample, as_id, turns


class CocoCaptions(Layout):
    name = "coco_captions"
    document = True
    prompt = "caption"
    columns = {"images": "images", "annotations": "annotations", "caption": "caption", "file_name": "file_name"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        images, anns = (data.get(ctx.col("images")), data.get(ctx.col("annotations"))) if isinstance(data, dict) \
            else (None, None)
        if not isinstance(images, list) or not isinstance(anns, list):
            yield Rejected(f"{ctx.prefix}:file", "bad_field", f"a caption file holds {ctx.col('images')!r} and "
                           f"{ctx.col('annotations')!r} lists", str(data)[:200])
            return
        files = {im.get("id"): im.get(ctx.col("file_name")) for im in images if isinstance(im, dict)}
        for i, ann in enumerate(anns):
            rid = (as_id(ann.get("id")) if isinstance(ann, dict) else None) or ctx.fallback(i)
            if not isinstance(ann, dict):
                yield Rejected(rid, "bad_field", f"annotation {i} is not an object", ann)
                continue
            caption, file = ann.get(ctx.col("caption")), files.get(ann.get("image_id"))
            if not isinstance(file, str) or not file:
                yield Rejected(rid, "missing_image_entry", f"image_id {ann.get('image_id')!r} is not among the "
                               "file's images (or has no file_name)", ann)
            elif not isinstance(caption, str) or not caption.strip():
                yield Rejected(rid, "bad_field", f"{ctx.col('caption')!r} is empty or not a string", ann)
            else:
                yield Sample(rid, turns(ctx.ask(rid), caption.strip()), [file])
