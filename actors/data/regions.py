"""Region tasks' boxes from pixels to text: the ``<box:k>`` slots a layout writes
(``actors.data.layouts.base``) become SPHINX's box text (``models.boxes``) once the tiler knows
each image's size and the flavour's canvas.

    >>> conv = [{"from": "human", "value": "<image>\\nWhere is the dog?"}, {"from": "gpt", "value": "<box:0>"}]
    >>> fill(conv, [[0, 100, 50, 600, 450]], [(1000, 500)], TileSpec(grid=2, tile_size=512, pad="centre"))[1]
    {'from': 'gpt', 'value': '[0.10,0.30,0.60,0.70]'}

Several boxes of one phrase share a slot, ``<box:0;1>`` -> ``[..;..]`` (``models.boxes.format_boxes``).
A box outside its image or empty raises ``models.boxes.BoxError`` (quarantine reason ``bad_box``):
the layouts check against the annotated size at parse time (:func:`check_box`), the tiler again
against the decoded image.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

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
