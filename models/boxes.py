"""The one box convention (docs/architecture.md "The tiling rule"): SPHINX's text form, in the
model's square-canvas frame, for preprocess (region tasks), serving (boxes in answers) and eval.

The text form is LLaMA2-Accessory's (``accessory/demos/multi_turn_mm_box.py``,
``extract_and_color`` and ``draw_box_mask_on_image``; ``accessory/eval_mm/evaluate.py``, metric
``miou0.5``): a box is ``[x1,y1,x2,y2]``, each coordinate a fraction of the square the model
saw, written with two decimals; a phrase is tagged ``<p>…</p>`` and followed by its box(es);
several boxes of one phrase share one bracket pair, joined by ``;``::

    <p>a red square</p> [0.10,0.30,0.60,0.70]          one phrase, one box
    <p>two dogs</p> [0.05,0.40,0.30,0.90;0.55,0.42,0.80,0.88]
    [0.10,0.30,0.60,0.70]                              a bare box (a referring answer)

The frame is the canvas the model sees (``models.tiling``). With ``resample="project"`` it is
:func:`models.tiling.plan`'s: the W×H image scaled to w'×h' (long side C = G·S) and pasted at
``offset`` (0, 0 for ``pad="top_left"``, the paper; centred for ``pad="centre"``), so a pixel x is
``(x0 + x·w'/W) / C``. With ``resample="release"`` (the released models) it is the release's
``PadToSquare``: the image centred on a square of side M = max(W, H) at ``((M - W) // 2,
(M - H) // 2)``, then resized whole, so x is ``(x0 + x) / M`` (Accessory's
``box_xyxy_expand2square`` in ``accessory/eval_mm/evaluate.py``).

    >>> release = TileSpec(grid=2, tile_size=512, pad="centre", skip_tokens=False)
    >>> to_canvas((100, 50, 600, 450), (1000, 500), release)   # 1024×512 pasted at y0 = 256 (of 1024)
    (0.1, 0.3, 0.6, 0.7)
    >>> format_box(_)
    '[0.10,0.30,0.60,0.70]'
    >>> parse_boxes("It is <p>the cat</p> [0.10,0.30,0.60,0.70].")
    [Grounding(phrase='the cat', boxes=[(0.1, 0.3, 0.6, 0.7)])]
    >>> [round(v, 6) for v in from_canvas((0.1, 0.3, 0.6, 0.7), (1000, 500), release)]
    [100.0, 50.0, 600.0, 450.0]

Pure Python (no torch, no numpy needed by callers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from models.errors import UserError
from models.tiling import TileSpec, plan

Box = tuple[float, float, float, float]

SLACK_PX = 1.0  # a pixel box may overhang its image by this much (annotation rounding); it is clipped
DECIMALS = 2  # as SPHINX writes its coordinates

# A phrase and the bracket right after it, then bare brackets; the bracket holds numbers, commas,
# semicolons and spaces only (Accessory's ``\[[\d.,;\s]*\]``, with a minus sign tolerated), so
# "[x1, y1, x2, y2]" in a prompt is not a box.
_BRACKET = r"\[([-\d.,;\s]*)\]"
_PHRASE_BOXES = re.compile(r"<p>((?:(?!</?p>).)*?)</p>\s*" + _BRACKET, re.DOTALL)  # no <p> inside a phrase
_BARE_BOXES = re.compile(_BRACKET)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


class BoxError(UserError):
    """A box that cannot be placed: outside its image, degenerate (x2 <= x1 or y2 <= y1), not four
    finite numbers, or a normalised box outside [0, 1]. ``reason`` is ``bad_box`` (the quarantine
    reason of a dataset row)."""

    reason = "bad_box"

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"{detail} (bad_box)")


@dataclass(frozen=True)
class Grounding:
    """One phrase and its boxes as the text had them (``phrase`` None for a bare box)."""

    phrase: Optional[str]
    boxes: list[Box] = field(default_factory=list)


def _four(box: Sequence[float], what: str) -> Box:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise BoxError(f"{what} must be four numbers, got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise BoxError(f"{what} must be four finite numbers, got {box!r}")
    return values  # type: ignore[return-value]


def to_canvas(box_px: Sequence[float], size: tuple[int, int], spec: TileSpec) -> Box:
    """A pixel box (x1, y1, x2, y2) on the W×H image -> fractions of the model's canvas.

    Before: (100, 50, 600, 450) on 1000×500 with a 1024 canvas, ``pad="centre"``.
    After: (0.1, 0.3, 0.6, 0.7) (the image sits at y0 = 256, scaled by 1.024).
    A box overhanging the image by at most ``SLACK_PX`` is clipped to it; further out, or
    degenerate after clipping, is a :class:`BoxError`.
    """
    w_img, h_img = int(size[0]), int(size[1])
    x1, y1, x2, y2 = _four(box_px, "a pixel box")
    if min(x1, y1) < -SLACK_PX or x2 > w_img + SLACK_PX or y2 > h_img + SLACK_PX:
        raise BoxError(f"box {list(box_px)} lies outside the {w_img}x{h_img} image")
    x1, x2 = max(0.0, x1), min(float(w_img), x2)
    y1, y2 = max(0.0, y1), min(float(h_img), y2)
    if x2 <= x1 or y2 <= y1:
        raise BoxError(f"box {list(box_px)} is empty (needs x1 < x2 and y1 < y2)")
    x0, y0, w, h, c = _placement(w_img, h_img, spec)
    return ((x0 + x1 * w / w_img) / c, (y0 + y1 * h / h_img) / c,
            (x0 + x2 * w / w_img) / c, (y0 + y2 * h / h_img) / c)


def _placement(w_img: int, h_img: int, spec: TileSpec) -> tuple[int, int, int, int, int]:
    """(x0, y0, w, h, side): the image fills [x0, x0 + w] × [y0, y0 + h] of a square of ``side``
    that is the canvas up to one uniform scale (see the module docstring)."""
    if getattr(spec, "resample", "project") == "release":  # PadToSquare at the image's size, one resize
        side = max(w_img, h_img)
        return (side - w_img) // 2, (side - h_img) // 2, w_img, h_img, side
    layout = plan(w_img, h_img, spec)
    return (*layout.offset, *layout.scaled_size, spec.canvas)


def from_canvas(box_norm: Sequence[float], size: tuple[int, int], spec: TileSpec) -> Box:
    """Fractions of the canvas (as the model wrote them) -> a pixel box on the W×H image,
    clipped to the image (a box in the padding collapses onto the image's edge).

    Before: (0.1, 0.3, 0.6, 0.7), 1000×500, 1024 canvas, ``pad="centre"``. After: (100, 50, 600, 450).
    """
    w_img, h_img = int(size[0]), int(size[1])
    xs1, ys1, xs2, ys2 = _four(box_norm, "a canvas box")
    x0, y0, w, h, c = _placement(w_img, h_img, spec)

    def px(v: float, origin: int, scaled: int, full: int) -> float:
        return min(float(full), max(0.0, (v * c - origin) * full / scaled))

    return (px(xs1, x0, w, w_img), px(ys1, y0, h, h_img), px(xs2, x0, w, w_img), px(ys2, y0, h, h_img))


def format_box(box_norm: Sequence[float]) -> str:
    """``(0.1, 0.3, 0.6, 0.7)`` -> ``"[0.10,0.30,0.60,0.70]"`` (two decimals, no spaces)."""
    values = _four(box_norm, "a canvas box")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise BoxError(f"a canvas box has coordinates in [0, 1], got {list(box_norm)}")
    return "[" + _joined(values) + "]"


def format_boxes(boxes: Sequence[Sequence[float]]) -> str:
    """Several boxes of one phrase in one bracket pair: ``"[0.10,0.30,0.60,0.70;0.05,0.40,0.30,0.90]"``."""
    if not boxes:
        raise BoxError("format_boxes needs at least one box")
    return "[" + ";".join(format_box(b)[1:-1] for b in boxes) + "]"


def _joined(values: Sequence[float]) -> str:
    return ",".join(f"{v:.{DECIMALS}f}" for v in values)


def _boxes_in(inner: str) -> list[Box]:
    """The 4-number groups of a bracket's ``;``-separated parts (others, e.g. 2-number key
    points, are skipped)."""
    out = []
    for part in inner.split(";"):
        numbers = _NUMBER.findall(part)
        if len(numbers) == 4:
            out.append(tuple(float(n) for n in numbers))
    return out  # type: ignore[return-value]


def parse_boxes(text: str) -> list[Grounding]:
    """Every phrase with its boxes, then every bare box, in the order they appear in ``text``.

    ``"<p>two dogs</p> [0.05,0.40,0.30,0.90;0.55,0.42,0.80,0.88] and [0.1, 0.2, 0.3, 0.4]"`` ->
    ``[Grounding("two dogs", [(0.05, 0.4, 0.3, 0.9), (0.55, 0.42, 0.8, 0.88)]),
    Grounding(None, [(0.1, 0.2, 0.3, 0.4)])]``. Spaces anywhere are fine and integers are read
    as numbers; nothing is refused: a bracket with no 4-number group, a key point ``[x,y]`` or
    an untagged phrase gives nothing. As Accessory's ``miou0.5`` reads an answer, a text with no
    bracket pair at all but a ``]`` (its ``[`` cut off) is read up to that ``]``. Values are
    returned as written (a pixel box stays in pixels).
    """
    found: list[tuple[int, Grounding]] = []
    taken: list[tuple[int, int]] = []
    for m in _PHRASE_BOXES.finditer(text):
        boxes = _boxes_in(m.group(2))
        taken.append(m.span())
        if boxes:
            found.append((m.start(), Grounding(m.group(1).strip(), boxes)))
    bare = [m for m in _BARE_BOXES.finditer(text)
            if not any(lo <= m.start() < hi for lo, hi in taken)]
    for m in bare:
        boxes = _boxes_in(m.group(1))
        if boxes:
            found.append((m.start(), Grounding(None, boxes)))
    if not taken and not bare and "[" not in text and "]" in text:
        boxes = _boxes_in(text.split("]", 1)[0])
        if boxes:
            found.append((0, Grounding(None, boxes)))
    return [g for _, g in sorted(found, key=lambda pair: pair[0])]
