"""COCO instance annotations -> region masks (the input of Set-of-Mark curation).

A COCO ``instances`` file has ``images`` (``id``, ``file_name``, ``width``, ``height``),
``categories`` (``id``, ``name``) and ``annotations`` (``id``, ``image_id``, ``category_id``,
``bbox`` [x, y, w, h] in pixels, ``segmentation``, ``iscrowd``). ``segmentation`` is one of:

- polygons: ``[[x1, y1, x2, y2, ...], ...]`` (pixel coordinates; filled with PIL);
- uncompressed RLE: ``{"size": [h, w], "counts": [n0, n1, ...]}`` (column-major runs, first
  run of zeros);
- compressed RLE: ``{"size": [h, w], "counts": "<COCO string>"}`` (decoded by pycocotools);
- missing / empty: the ``bbox`` is the region.

Before (one annotation of a 64×48 image)::

    {"id": 7, "category_id": 18, "bbox": [10, 5, 20, 30], "segmentation": [[10, 5, 30, 5, 30, 35, 10, 35]]}

After: ``Region(ann_id=7, category="dog", bbox=(10, 5, 30, 35), mask=<bool[48, 64]>)``.

A region that cannot be placed raises :class:`RegionError` with the quarantine reason:
``region_outside`` (box or polygon beyond the image), ``empty_mask`` (no pixel), ``bad_annotation``
(unreadable fields), ``size_mismatch`` (an RLE of another size than the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SLACK_PX = 1.0  # annotation rounding: a coordinate may overhang the image by this much


class RegionError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Region:
    ann_id: int
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels
    mask: np.ndarray  # bool [H, W]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def index_coco(coco: Any) -> dict[str, Any]:
    """A parsed COCO instances document -> ``{"images": [...], "categories": {id: name}, "by_image":
    {image_id: [annotation, ...]}}``; raises ValueError naming the missing part."""
    if not isinstance(coco, dict):
        raise ValueError(f"a COCO instances file is a JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"a COCO instances file needs a list '{key}'")
    categories = {c.get("id"): str(c.get("name")) for c in coco["categories"] if isinstance(c, dict)}
    by_image: dict[Any, list] = {}
    for ann in coco["annotations"]:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    return {"images": [i for i in coco["images"] if isinstance(i, dict)], "categories": categories,
            "by_image": by_image}


def region_of(ann: dict, categories: dict, size: tuple[int, int]) -> Region:
    """One annotation on an image of ``size`` (W, H) -> its :class:`Region` (or :class:`RegionError`)."""
    w, h = size
    ann_id = ann.get("id")
    try:
        x, y, bw, bh = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        raise RegionError("bad_annotation", f"annotation {ann_id}: bbox {ann.get('bbox')!r} is not [x, y, w, h]") from None
    if ann.get("category_id") not in categories:
        raise RegionError("bad_annotation", f"annotation {ann_id}: category_id {ann.get('category_id')!r} is not in categories")
    box = (x, y, x + bw, y + bh)
    if bw <= 0 or bh <= 0:
        raise RegionError("empty_mask", f"annotation {ann_id}: bbox {ann['bbox']} has no area")
    if x < -SLACK_PX or y < -SLACK_PX or box[2] > w + SLACK_PX or box[3] > h + SLACK_PX:
        raise RegionError("region_outside", f"annotation {ann_id}: bbox {ann['bbox']} lies outside the {w}x{h} image")
    mask = decode_mask(ann.get("segmentation"), size, box, ann_id)
    if not mask.any():
        raise RegionError("empty_mask", f"annotation {ann_id}: its segmentation covers no pixel")
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    return Region(ann_id=int(ann_id) if isinstance(ann_id, int) else -1, category=categories[ann["category_id"]],
                  bbox=box, mask=mask)


def decode_mask(seg: Any, size: tuple[int, int], box: tuple[float, float, float, float], ann_id: Any) -> np.ndarray:
    """``segmentation`` (polygons, RLE or nothing) -> bool [H, W]."""
    w, h = size
    if seg is None or seg == [] or seg == {}:
        mask = Image.new("1", (w, h), 0)
        ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=1)
        return np.array(mask, dtype=bool)
    if isinstance(seg, list):
        return _polygons(seg, size, ann_id)
    if isinstance(seg, dict):
        return _rle(seg, size, ann_id)
    raise RegionError("bad_annotation", f"annotation {ann_id}: segmentation is a {type(seg).__name__}")


def _polygons(polys: list, size: tuple[int, int], ann_id: Any) -> np.ndarray:
    w, h = size
    mask = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for poly in polys:
        try:
            xy = [float(v) for v in poly]
        except (TypeError, ValueError):
            raise RegionError("bad_annotation", f"annotation {ann_id}: a polygon is not a list of numbers") from None
        if len(xy) < 6 or len(xy) % 2:
            raise RegionError("bad_annotation", f"annotation {ann_id}: a polygon needs >= 3 (x, y) points, got {len(xy)} numbers")
        xs, ys = xy[0::2], xy[1::2]
        if min(xs) < -SLACK_PX or min(ys) < -SLACK_PX or max(xs) > w + SLACK_PX or max(ys) > h + SLACK_PX:
            raise RegionError("region_outside", f"annotation {ann_id}: a polygon leaves the {w}x{h} image")
        draw.polygon(list(zip(xs, ys)), fill=1, outline=1)
    return np.array(mask, dtype=bool)


def _rle(rle: dict, size: tuple[int, int], ann_id: Any) -> np.ndarray:
    w, h = size
    rh, rw = (rle.get("size") or [None, None])[:2]
    if (rh, rw) != (h, w):
        raise RegionError("size_mismatch", f"annotation {ann_id}: RLE size {rle.get('size')} is not the image's [{h}, {w}]")
    counts = rle.get("counts")
    if isinstance(counts, list):
        try:
            runs = np.asarray(counts, dtype=np.int64)
        except (TypeError, ValueError):
            raise RegionError("bad_annotation", f"annotation {ann_id}: RLE counts are not integers") from None
        if (runs < 0).any() or runs.sum() != h * w:
            raise RegionError("bad_annotation", f"annotation {ann_id}: RLE counts sum to {int(runs.sum())}, not {h * w}")
        values = np.zeros(len(runs), dtype=bool)
        values[1::2] = True
        flat = np.repeat(values, runs)
        return flat.reshape(w, h).T.copy()  # column-major runs
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as coco_mask

        try:
            decoded = coco_mask.decode({"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts})
        except Exception as err:  # pycocotools raises plain Exceptions on broken strings
            raise RegionError("bad_annotation", f"annotation {ann_id}: compressed RLE does not decode ({err})") from None
        return decoded.astype(bool)
    raise RegionError("bad_annotation", f"annotation {ann_id}: RLE counts are a {type(counts).__name__}")
