"""``vg_regions``: Visual Genome's ``region_descriptions.json`` (``path``), with ``image_data.json``
as ``annotations`` (optional: image sizes, for boxes checked at read time, and the image folder).

Before::

    region_descriptions.json: [{"id": 1, "regions": [{"region_id": 1382, "image_id": 1, "phrase": "the clock is
                               green in colour", "x": 421, "y": 57, "width": 82, "height": 139}, ...]}]
    image_data.json: [{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
                       "width": 800, "height": 600, "coco_id": null, "flickr_id": null}]

After (the regions of an image, up to ``REGIONS_PER_SAMPLE`` per sample, one turn each;
``prompt: region_caption``, the default, asks the box and answers the phrase; ``referring`` the
other way round)::

    id "1:0", images ["VG_100K_2/1.jpg"], boxes [(0, 421, 57, 503, 196), ...], conversations
    [{"from": "human", "value": "<image>\\nPlease provide a short description for this region: <box:0>"},
     {"from": "gpt", "value": "the clock is green in colour"}, ...]

The image is the last two parts of ``url`` (``VG_100K/`` or ``VG_100K_2/``) with image_data.json,
else ``<id>.jpg``. Quarantined, one row each: an image that image_data.json does not list
(``missing_image_entry``: a region without an image), a region whose box is outside its image or
empty (``bad_box``), a region without a phrase (``bad_field``); the good regions of the image are
kept.
"""

from __future__ import annotations

from typing import Any, Iterator

from actors.data.layouts.base import Context, Item, Layout, Rejected, Sample, as_id
from actors.data.layouts.refcoco import region_turns
from actors.data.regions import check_box, slot

REGIONS_PER_SAMPLE = 10


class VgRegions(Layout):
    name = "vg_regions"
    document = True
    prompt = "region_caption"
    prompts = ("region_caption", "referring")
    annotations = "optional"
    columns = {"regions": "regions", "phrase": "phrase"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        if not isinstance(data, list):
            yield Rejected(f"{ctx.prefix}:file", "bad_field", "region_descriptions.json is a list of images",
                           str(data)[:200])
            return
        known = None
        if isinstance(ctx.side, list):
            known = {im.get("image_id", im.get("id")): im for im in ctx.side if isinstance(im, dict)}
        for i, entry in enumerate(data):
            image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
            rid = as_id(image_id) or ctx.fallback(i)
            regions = entry.get(ctx.col("regions")) if isinstance(entry, dict) else None
            if not isinstance(regions, list):
                yield Rejected(rid, "bad_field", f"an image entry holds a {ctx.col('regions')!r} list", entry)
                continue
            info = known.get(image_id) if known is not None else {}
            if info is None:
                yield Rejected(rid, "missing_image_entry", f"image {image_id!r} is not in image_data.json: its "
                               f"{len(regions)} region(s) have no image", str(entry)[:200])
                continue
            url = info.get("url")
            file = "/".join(url.split("/")[-2:]) if isinstance(url, str) and "/" in url else f"{rid}.jpg"
            size = (info.get("width"), info.get("height"))
            size = size if all(isinstance(v, int) for v in size) else None
            good = []
            for k, r in enumerate(regions):
                yield from self._check(ctx, rid, k, r, size, good)
            for start in range(0, len(good), REGIONS_PER_SAMPLE):
                chunk = good[start:start + REGIONS_PER_SAMPLE]
                sid = f"{rid}:{start // REGIONS_PER_SAMPLE}"
                conv = [t for j, (phrase, _) in enumerate(chunk)
                        for t in region_turns(ctx, f"{sid}:{j}", phrase, slot(j), j == 0)]
                yield Sample(sid, conv, [file], [(0, *box) for _, box in chunk])

    @staticmethod
    def _check(ctx: Context, rid: str, k: int, r: Any, size: Any, good: list) -> Iterator[Item]:
        """Append a good region (phrase, box) to ``good``; yield the reason a bad one is rejected."""
        region_id = f"{rid}:r{(as_id(r.get('region_id')) if isinstance(r, dict) else None) or k}"
        phrase = r.get(ctx.col("phrase")) if isinstance(r, dict) else None
        if not isinstance(phrase, str) or not phrase.strip():
            yield Rejected(region_id, "bad_field", f"region {k} has no {ctx.col('phrase')!r}", r)
            return
        xywh = [r.get(key) for key in ("x", "y", "width", "height")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xywh):
            yield Rejected(region_id, "bad_box", f"region {k}: x, y, width, height must be numbers", r)
            return
        box = (float(xywh[0]), float(xywh[1]), float(xywh[0] + xywh[2]), float(xywh[1] + xywh[3]))
        why = check_box(box, size)
        if why:
            yield Rejected(region_id, "bad_box", f"region {k}: {why}", r)
            return
        good.append((phrase.strip(), box))
