"""One image + its COCO annotations -> one Set-of-Mark sample (or a quarantined image).

Item (built on the driver from the COCO file, ``pipelines.stages.curate``)::

    {"id": "coco:42", "image": "s3://b/coco/000042.jpg", "width": 640, "height": 480,
     "annotations": [{"id": 7, "category_id": 18, "bbox": [...], "segmentation": ..., "iscrowd": 0}, ...]}

Sample: the marked image ``images/<id>-<hash>.png`` (``outcome.image_name``) and one LLaVA record::

    {"id": "coco:42", "image": "images/coco-42-<hash>.png", "conversations": [...],        (actors.curate.som_questions)
     "marks": [{"mark": 1, "category": "dog", "ann_id": 7, "point": [x, y], "label": [x1, y1, x2, y2],
                "bbox": [x1, y1, x2, y2]}, ...],
     "teacher": {"model", "url", "request", "answer"}}                             (with curate.som.teacher)

Regions left unmarked are counted, never hidden: ``regions_crowd`` (``iscrowd``), ``regions_small``
(under ``min_area`` pixels), ``regions_over_max`` (past ``max_marks``, smallest first),
``regions_no_room`` (no place for the label). Quarantine reasons: ``missing_image``,
``bad_image``, ``too_large``, ``size_mismatch`` (the image is not the annotated size),
``region_outside``, ``empty_mask``, ``bad_annotation``, ``no_regions``, ``teacher_error``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image

from actors.curate.marks import draw_marks, place_marks
from actors.curate.outcome import Outcome, image_name
from actors.curate.regions import Region, RegionError, region_of
from actors.curate.som_questions import som_conversation
from cluster.spec import SomCurate
from cluster.storage import Storage
from models.boxes import format_box, to_canvas
from models.errors import UserError
from models.tiling import TileSpec

TEACHER_QUESTION = "Describe each marked region in detail."


@dataclass(frozen=True)
class SomConfig:
    section: SomCurate
    categories: dict  # category id -> name
    max_image_bytes: int
    max_image_pixels: int
    tile: Optional[TileSpec] = None  # the model's canvas: "where is mark k" answers a box in its frame


def curate_image(item: dict, config: SomConfig, storage: Storage) -> list[Outcome]:
    sid = item["id"]
    image, why = _open(item["image"], storage, config)
    if image is None:
        return [Outcome.quarantined(sid, *why)]
    if image.size != (item["width"], item["height"]):
        return [Outcome.quarantined(sid, "size_mismatch", f"the image is {image.size[0]}x{image.size[1]}, "
                                    f"the annotations say {item['width']}x{item['height']}")]
    counts = {"regions_crowd": 0, "regions_small": 0, "regions_over_max": 0, "regions_no_room": 0}
    regions: list[Region] = []
    for ann in item["annotations"]:
        if ann.get("iscrowd"):
            counts["regions_crowd"] += 1
            continue
        try:
            region = region_of(ann, config.categories, image.size)
        except RegionError as err:
            return [Outcome.quarantined(sid, err.reason, err.detail)]
        if region.area < config.section.min_area:
            counts["regions_small"] += 1
            continue
        regions.append(region)
    if len(regions) > config.section.max_marks:
        counts["regions_over_max"] = len(regions) - config.section.max_marks
        regions = sorted(regions, key=lambda r: -r.area)[:config.section.max_marks]
    marks = place_marks([r.mask for r in regions], image.size)
    counts["regions_no_room"] = sum(m is None for m in marks)
    placed = sorted((m for m in marks if m is not None), key=lambda m: (m.point[1], m.point[0]))
    if not placed:
        return [Outcome.quarantined(sid, "no_regions", f"no region to mark ({len(item['annotations'])} annotations)",
                                    **counts)]
    numbers = list(range(1, len(placed) + 1))
    marked = draw_marks(image, placed, numbers, masks=[r.mask for r in regions], contours=config.section.contours)
    buf = io.BytesIO()
    marked.save(buf, format="PNG")
    png = buf.getvalue()
    name = image_name(sid)
    teacher = None
    record: dict[str, Any] = {"id": sid, "image": name}
    if config.section.teacher is not None:
        from actors.curate.teacher import TeacherError, describe

        try:
            record["teacher"] = describe(config.section.teacher, png, name)
        except TeacherError as err:
            return [Outcome.quarantined(sid, "teacher_error", str(err), **counts)]
        teacher = (TEACHER_QUESTION, record["teacher"]["answer"])
    boxes = ({n: format_box(to_canvas(regions[m.index].bbox, image.size, config.tile)) for n, m in zip(numbers, placed)}
             if config.tile is not None else None)
    record["conversations"] = som_conversation([(n, regions[m.index].category) for n, m in zip(numbers, placed)],
                                               sid, teacher=teacher, boxes=boxes)
    record["marks"] = [{"mark": n, "category": regions[m.index].category, "ann_id": regions[m.index].ann_id,
                        "point": list(m.point), "label": list(m.label),
                        "bbox": [round(v, 2) for v in regions[m.index].bbox]} for n, m in zip(numbers, placed)]
    counts["regions_marked"] = len(placed)
    return [Outcome(id=sid, records=[record], images={name: png}, counts=counts,
                    preview={"image": name, "boxes": [r["bbox"] for r in record["marks"]]})]


def _open(uri: str, storage: Storage, config: SomConfig) -> tuple[Optional[Image.Image], tuple[str, str]]:
    try:
        if not storage.exists(uri):
            return None, ("missing_image", f"{uri} does not exist")
        data = storage.read_bytes(uri)
    except UserError as err:
        return None, ("missing_image", str(err))
    if len(data) > config.max_image_bytes:
        return None, ("too_large", f"{len(data)} bytes > data.max_image_bytes {config.max_image_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.size[0] * image.size[1] > config.max_image_pixels:
            return None, ("too_large", f"{image.size[0]}x{image.size[1]} pixels > data.max_image_pixels")
        return image.convert("RGB"), ("", "")
    except Exception as err:  # PIL raises many types on bad bytes
        return None, ("bad_image", f"{type(err).__name__}: {err}")
