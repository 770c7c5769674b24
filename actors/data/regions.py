"""Region tasks' boxes from pixels to text: the ``<box:k>`` slots a layout writes
(``actors.data.layouts.base``) become SPHINX's box text (``models.boxes``) once the tiler knows
each image's size and the flavour's canvas.

    >>> conv = [{"from": "human", "value": "<image>\\nWhere is the dog?"}, {"from": "gpt", "value": "<box:0>"}]
    >>> fill(conv, [[0, 100, 50, 600, 450]], [(1000, 500)], TileSpec(grid=2, tile_size=512, pad="centre"))[1]
    {'from': 'gpt', 'value': '[0.10,0.30,0.60,0.70]'}

Several boxes of one phrase share a slot, ``<box:0;1>`` -> ``[..;..]`` (``models.boxes.format_boxes``).
A box outside its image or empty raises ``models.boxes.BoxError`` (quarantine reason ``bad_box``):
the layouts check against the annotated size at parse time (:func:`check_box`), the tiler again
against the decoded image. A ``llava`` record's own ``boxes`` field (``actors.data.rows``) has no
annotated size: :func:`check_boxes` refuses at parse time what needs no size (a malformed or empty
box, a box of an image the record does not have, a slot naming no box); the tiler checks the rest.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

from models.boxes import BoxError, format_boxes, to_canvas
from models.tiling import TileSpec

SLOT = re.compile(r"<box:(\d+(?:;\d+)*)>")
_ANY_CANVAS = TileSpec(grid=1, tile_size=64)  # check_box: the checks do not depend on the canvas
_PLACEHOLDER_BOX = "[0.00,0.00,1.00,1.00]"


def slot(*indices: int) -> str:
    """The text slot of box(es) ``indices`` of a sample: ``slot(0)`` -> ``<box:0>``."""
    return "<box:" + ";".join(str(i) for i in indices) + ">"


def check_box(box: Sequence[float], size: Optional[tuple[int, int]]) -> Optional[str]:
    """Why the pixel box cannot be placed on an image of ``size`` (None: it can, or no size is known)."""
    if size is None:
        return None
    try:
        to_canvas(box, size, _ANY_CANVAS)
    except BoxError as err:
        return err.detail
    return None


def check_boxes(conversations: list[dict], boxes: Any, n_images: int) -> Optional[str]:
    """Why a record's ``boxes`` (``[[image, x1, y1, x2, y2], ...]`` pixels, or None) and its text's
    ``<box:k>`` slots cannot be filled (None: they can, up to the image sizes the tiler checks).

        >>> conv = [{"from": "human", "value": "<image>\\nWhere?"}, {"from": "gpt", "value": "<box:0>"}]
        >>> check_boxes(conv, [[0, 10, 5, 60, 45]], 1) is None
        True
        >>> check_boxes(conv, None, 1)
        'slot <box:0> names a box the record does not have (0 box(es))'
        >>> check_boxes(conv, [[1, 10, 5, 60, 45]], 1)
        'box 0 is of image 1, but the record has 1 image(s)'
    """
    if boxes is None:
        boxes = []
    if not isinstance(boxes, list):
        return f"'boxes' is a {type(boxes).__name__}; expected a list of [image, x1, y1, x2, y2]"
    for k, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) != 5 or not all(_number(v) for v in box):
            return f"box {k} is {box!r:.80}; expected [image, x1, y1, x2, y2] (numbers)"
        image, x1, y1, x2, y2 = box
        if float(image) != int(image):
            return f"box {k} names image {image!r}; expected an image index"
        if not 0 <= int(image) < n_images:
            return f"box {k} is of image {int(image)}, but the record has {n_images} image(s)"
        if x2 <= x1 or y2 <= y1:
            return f"box {k} {list(box[1:])} is empty (needs x1 < x2 and y1 < y2)"
    for turn in conversations:
        for m in SLOT.finditer(turn["value"]):
            if any(int(k) >= len(boxes) for k in m.group(1).split(";")):
                return f"slot {m.group(0)} names a box the record does not have ({len(boxes)} box(es))"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fill(conversations: list[dict], boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]],
         spec: TileSpec) -> list[dict]:
    """``conversations`` with every ``<box:k>`` slot replaced by box ``k`` in the canvas frame.

    ``boxes``: ``[image_index, x1, y1, x2, y2]`` in pixels; ``sizes``: each image's (W, H) after
    EXIF transpose. A slot naming no box, or a box of an image the sample does not have, is a
    :class:`BoxError` too."""
    canvas = []
    for b in boxes:
        image = int(b[0])
        if not 0 <= image < len(sizes):
            raise BoxError(f"a box of image {image}, but the sample has {len(sizes)} image(s)")
        canvas.append(to_canvas(b[1:], sizes[image], spec))

    def text(m: re.Match) -> str:
        picked = [int(k) for k in m.group(1).split(";")]
        if any(k >= len(canvas) for k in picked):
            raise BoxError(f"slot {m.group(0)} names a box the sample does not have ({len(canvas)} box(es))")
        return format_boxes([canvas[k] for k in picked])

    return [{**t, "value": SLOT.sub(text, t["value"])} for t in conversations]


def text_of(value: str) -> str:
    """A turn's text with its slots shown as a box (the tokenizer's text pass reads no image)."""
    return SLOT.sub(_PLACEHOLDER_BOX, value)
