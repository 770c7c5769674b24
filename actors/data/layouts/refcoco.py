"""``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg as the ``refer`` API publishes them: ``path`` is
``refs(unc).p`` (``refs(google).p``, ``refs(umd).p``; a JSON dump of the same list is read too),
``annotations`` is the dataset's ``instances.json``.

Before::

    refs(unc).p (a Python pickle of plain lists and dicts):
    [{"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "train", "category_id": 1,
      "file_name": "COCO_train2014_000000581857_16.jpg", "sent_ids": [0, 1, 2],
      "sentences": [{"sent_id": 0, "sent": "the lady with the blue shirt", "raw": "THE LADY ...", "tokens": [...]}]}]
    instances.json: {"images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640,
                     "height": 427}], "annotations": [{"id": 1719310, "image_id": 581857, "bbox": [103.9, 300.0,
                     135.4, 127.0], "iscrowd": 0, ...}], "categories": [...]}

After (one sample per sentence; ``prompt: referring``, the default)::

    id "0:0", images ["COCO_train2014_000000581857.jpg"], boxes [(0, 103.9, 300.0, 239.3, 427.0)],
    conversations [{"from": "human", "value": "<image>\\nPlease provide the bounding box coordinate of the
    region this sentence describes: the lady with the blue shirt"}, {"from": "gpt", "value": "<box:0>"}]

(the tiler writes the box in SPHINX's text form, ``actors.data.regions``). With ``prompt:
region_caption`` the box is asked and the sentence answered. COCO boxes are ``[x, y, w, h]``; the
ref's own ``file_name`` (with its ``_16`` suffix) is ignored, as ``refer`` does. Names:
``sentence`` (``sent``; ``raw`` keeps the original casing).

Left out by design: refs of another split than ``train`` (RefCOCO's val / testA / testB are the
grounding benchmarks), counted as ``subsampled_out``. Quarantined: a ref whose ``ann_id`` is not in
instances.json (``missing_annotation``), whose image is not (``missing_image_entry``), a crowd
annotation (``crowd_box``: not one object), a box outside its image or empty (``bad_box``), an
empty sentence (``bad_field``). The pickle is read with no class allowed (plain data only): one
naming any class or function is refused as a whole file.
"""

from __future__ import annotations

import io
import json
import pickle
from typing import Any, Iterator

from actors.data.layouts.base import GPT, HUMAN, IMAGE, Context, Item, Layout, Rejected, Sample, as_id
from actors.data.regions import check_box, slot

TRAIN_SPLITS = ("train",)


class _PlainData(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: any class or function is refused (a
    pickle names what it calls; refusing every name keeps a crafted file from running code)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the pickle names {module}.{name}; a refs file holds plain data only")


def coco_box(bbox: Any) -> Any:
    """COCO's ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` pixels, or None when it is not four numbers."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return (x, y, x + w, y + h)


def region_turns(ctx: Context, key: str, text: str, box_slot: str, first: bool) -> list[dict]:
    """One region as a question and its answer: ``referring`` asks the text and answers the box,
    ``region_caption`` the other way round."""
    if ctx.prompt == "region_caption":
        q, a = ctx.ask(key, box=box_slot), text
    else:
        q, a = ctx.ask(key, phrase=text), box_slot
    return [{"from": HUMAN, "value": (IMAGE + "\n" if first else "") + q}, {"from": GPT, "value": a}]


class RefCoco(Layout):
    name = "refcoco"
    document = True
    prompt = "referring"
    prompts = ("referring", "region_caption")
    annotations = "required"
    columns = {"sentence": "sent"}

    def decode(self, data: bytes) -> Any:
        if data[:1] == b"\x80":  # a pickle (protocol 2+): refer's refs(*).p
            return _PlainData(io.BytesIO(data), encoding="utf-8").load()
        return json.loads(data)

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        side = ctx.side if isinstance(ctx.side, dict) else {}
        anns = {a.get("id"): a for a in side.get("annotations") or [] if isinstance(a, dict)}
        images = {im.get("id"): im for im in side.get("images") or [] if isinstance(im, dict)}
        if not isinstance(data, list) or not anns or not images:
            yield Rejected(f"{ctx.prefix}:file", "bad_field", "refs must be a list, and annotations an instances.json "
                           "with images and annotations", str(data)[:200])
            return
        for i, ref in enumerate(data):
            rid = (as_id(ref.get("ref_id")) if isinstance(ref, dict) else None) or ctx.fallback(i)
            sentences = ref.get("sentences") if isinstance(ref, dict) else None
            if not isinstance(sentences, list) or not sentences:
                yield Rejected(rid, "bad_field", "a ref holds a non-empty 'sentences' list", ref)
                continue
            problem, file, box = self._region(ref, anns, images)
            for k, sent in enumerate(sentences):
                sid = f"{rid}:{(as_id(sent.get('sent_id')) if isinstance(sent, dict) else None) or k}"
                text = sent.get(ctx.col("sentence")) if isinstance(sent, dict) else None
                if problem:
                    yield Rejected(sid, problem[0], problem[1], ref)
                elif not isinstance(text, str) or not text.strip():
                    yield Rejected(sid, "bad_field", f"sentence {k} has no {ctx.col('sentence')!r} text", sent)
                else:
                    yield Sample(sid, region_turns(ctx, sid, text.strip(), slot(0), True), [file], [(0, *box)],
                                 left_out=ref.get("split") not in TRAIN_SPLITS)

    @staticmethod
    def _region(ref: dict, anns: dict, images: dict) -> tuple[Any, Any, Any]:
        """((reason, detail) or None, the image's file, the pixel box) of one ref."""
        ann = anns.get(ref.get("ann_id"))
        if ann is None:
            return ("missing_annotation", f"ann_id {ref.get('ann_id')!r} is not in instances.json"), None, None
        image = images.get(ref.get("image_id", ann.get("image_id")))
        if image is None or not isinstance(image.get("file_name"), str):
            return ("missing_image_entry", f"image_id {ref.get('image_id')!r} is not in instances.json"), None, None
        if ann.get("iscrowd"):
            return ("crowd_box", f"annotation {ann.get('id')} is a crowd region, not one object"), None, None
        box = coco_box(ann.get("bbox"))
        size = (image.get("width"), image.get("height"))
        why = "bbox is not [x, y, w, h]" if box is None else check_box(
            box, size if all(isinstance(v, int) for v in size) else None)
        if why:
            return ("bad_box", f"annotation {ann.get('id')}: {why}"), None, None
        return None, image["file_name"], box
