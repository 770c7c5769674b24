"""Referring-expression grounding (RefCOCO/+/g): Acc@IoU>=0.5 on boxes.

As LLaMA2-Accessory ``accessory/eval_mm/evaluate.py`` (metric ``miou0.5``) scores SPHINX: the
predicted box is the first ``[x1, y1, x2, y2]`` in the answer (else the text before the first
``]``), four numbers normalised to the square the model saw, anything else is the empty box (IoU
0). Answers are read by the project's one box parser, ``models.boxes.parse_boxes`` (SPHINX's text
form: ``<p>phrase</p>`` tags and ``;``-joined boxes are understood, key points ``[x, y]`` are not
boxes); the ground-truth pixel box of a W x H image is moved onto that square and a prediction is right
when IoU >= 0.5. ``frame`` says which square: ``center`` (the released models' centred padding,
Accessory's ``box_xyxy_expand2square``), ``topleft`` (the paper's top-left canvas) or ``image``
(normalised by W and H, no padding). A ground truth already in [0, 1] is taken as is.

Worked example: W x H = 200 x 100, gt [50, 0, 150, 100]; ``center`` pads 50 px on top and bottom,
so the gt becomes [0.25, 0.25, 0.75, 0.75]; the prediction "[0.25, 0.25, 0.75, 0.5]" has IoU 0.5.
"""

from __future__ import annotations

from typing import Optional, Sequence

from models.boxes import parse_boxes

FRAMES = ("center", "topleft", "image")
IOU_THRESHOLD = 0.5


def frame_of_pad(pad: str) -> str:
    """The frame of a flavour's padding (``models.flavours.Flavour.pad``): ``top_left`` (the paper)
    -> ``topleft``, ``centre`` (the releases) -> ``center``."""
    return {"top_left": "topleft", "centre": "center"}[pad]

Box = tuple[float, float, float, float]


def parse_box(text: str) -> Optional[Box]:
    """The first box ``text`` names (as written: fractions for an answer, pixels for a ground
    truth), or None."""
    found = parse_boxes(text)
    return found[0].boxes[0] if found else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def normalize_gt(box: Sequence[float], width: Optional[float], height: Optional[float],
                 frame: str = "center") -> Box:
    """A ground-truth box in pixels -> the frame's [0, 1] coordinates (a box in [0, 1] is kept)."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if max(x1, y1, x2, y2) <= 1.0:
        return (x1, y1, x2, y2)
    if not width or not height:
        raise ValueError("a pixel box needs the image's width and height")
    if frame == "image":
        return (x1 / width, y1 / height, x2 / width, y2 / height)
    edge = max(width, height)
    if frame == "center":  # integer shift, as box_xyxy_expand2square
        if width > height:
            y1, y2 = y1 + (width - height) // 2, y2 + (width - height) // 2
        elif height > width:
            x1, x2 = x1 + (height - width) // 2, x2 + (height - width) // 2
    return (x1 / edge, y1 / edge, x2 / edge, y2 / edge)


def grounding_iou(prediction: str, gt_box: Sequence[float], width: Optional[float] = None,
                  height: Optional[float] = None, frame: str = "center") -> tuple[float, Optional[Box]]:
    """(IoU, parsed predicted box or None)."""
    pred = parse_box(prediction)
    gt = normalize_gt(gt_box, width, height, frame)
    return (box_iou(pred, gt) if pred else 0.0), pred
