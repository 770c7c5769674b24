"""Numbered marks on an image (Set-of-Mark): where each number goes and how it is drawn.

For each region (a bool mask) the mark's anchor is a visible *interior* point: the deepest
point of the mask (the last pixels left when the mask is eroded step by step, i.e. the maximum of
its chessboard distance transform; the one nearest their centroid), never just the box centre,
which may fall outside a ring or an L-shaped region. The number is drawn in a filled label
centred on the anchor, with a contrasting outline; sizes scale with the image
(``font_px = max(12, min(W, H) / 24)``). No label overlaps another: when the deepest point's
label would touch one already placed, the next candidates are other interior points (deepest
first), then smaller fonts; a region whose label finds no room is left unmarked (counted
``no_room`` by the caller). Optional contours trace each mask's edge in the mark's colour.

    >>> marks = place_marks([r.mask for r in regions], (640, 480))
    >>> marks[0]                 # Mark(index=0, point=(312, 207), label=(298, 190, 326, 224), colour=(230, 25, 75))
    >>> png = draw_marks(image, marks, numbers=[1, 2], masks=masks, contours=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# distinct colours (Sasha Trubetskoy's list), cycled
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]
_DEPTH_SIDE = 128  # masks are eroded on a copy at most this many pixels wide (speed); points map back
_FONT_SCALES = (1.0, 0.75, 0.5)
_CANDIDATES = 256  # interior points tried per font size


@dataclass(frozen=True)
class Mark:
    index: int  # which region (position in the input list)
    point: tuple[int, int]  # the anchor, inside the region's mask
    label: tuple[int, int, int, int]  # the drawn label's box x1, y1, x2, y2 (pixels, inclusive-exclusive)
    font_px: int
    colour: tuple[int, int, int]


def font_size(size: tuple[int, int]) -> int:
    return max(12, round(min(size) / 24))


def interior_points(mask: np.ndarray, limit: int = _CANDIDATES) -> list[tuple[int, int]]:
    """Points (x, y) inside ``mask``, deepest first (see module doc); the first is the anchor.

    Depth (how many 3x3 erosions a pixel survives) is measured on a copy scaled to at most
    ``_DEPTH_SIDE`` pixels (nearest neighbour). After the deepest point, the candidates are spread
    over the region (a lattice whose step grows until at most ``limit`` remain), deeper first, so a
    label that does not fit at the centre can move. Each point is mapped back and moved to the
    nearest true mask pixel: every point is inside the mask."""
    h, w = mask.shape
    scale = max(1.0, max(h, w) / _DEPTH_SIDE)
    small = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (max(1, round(w / scale)), max(1, round(h / scale))), Image.NEAREST)) > 0 if scale > 1 else mask.copy()
    if not small.any():  # a region thinner than one cell of the copy: use the mask itself
        ys, xs = np.nonzero(mask)
        order = np.argsort((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2, kind="stable")[:limit]
        return [(int(xs[i]), int(ys[i])) for i in order]
    depth = np.zeros(small.shape, np.int32)
    padded = Image.fromarray(np.pad(small, 1).astype(np.uint8) * 255)  # the image edge erodes too
    layer = small
    while layer.any():
        depth += layer
        padded = padded.filter(ImageFilter.MinFilter(3))
        layer = np.array(padded)[1:-1, 1:-1] > 0
    top = np.nonzero(depth == depth.max())
    cy, cx = top[0].mean(), top[1].mean()
    ys, xs = np.nonzero(depth)
    step = 1
    while len(xs) > limit:
        step += 1
        keep = (ys % step == 0) & (xs % step == 0)
        ys, xs = ys[keep], xs[keep]
    k = int(np.argmin((top[1] - cx) ** 2 + (top[0] - cy) ** 2))
    first = (int(top[1][k]), int(top[0][k]))
    order = np.lexsort(((xs - cx) ** 2 + (ys - cy) ** 2, -depth[ys, xs]))
    cells = [first] + [(int(xs[i]), int(ys[i])) for i in order]
    points = [_to_mask((x + 0.5) * scale, (y + 0.5) * scale, mask) if scale > 1 else (x, y) for x, y in cells]
    return _unique(points)


def _to_mask(x: float, y: float, mask: np.ndarray) -> tuple[int, int]:
    h, w = mask.shape
    xi, yi = min(w - 1, int(x)), min(h - 1, int(y))
    if mask[yi, xi]:
        return xi, yi
    ys, xs = np.nonzero(mask)
    k = int(np.argmin((xs - xi) ** 2 + (ys - yi) ** 2))
    return int(xs[k]), int(ys[k])


def _unique(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(dict.fromkeys(points))


def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def label_size(text: str, font_px: int) -> tuple[int, int]:
    """The label box (width, height) for ``text`` at ``font_px`` (text + padding + outline)."""
    x1, y1, x2, y2 = _font(font_px).getbbox(text)
    pad = max(2, font_px // 5)
    return (x2 - x1) + 2 * pad, (y2 - y1) + 2 * pad


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_marks(masks: Sequence[np.ndarray], size: tuple[int, int], numbers: Optional[Sequence[int]] = None) -> list[Optional[Mark]]:
    """One :class:`Mark` per mask (``None``: no room for its label anywhere inside it).

    Smaller regions choose first (they have fewer places); labels stay inside the image and
    never overlap. ``numbers`` are the texts drawn (default 1..n), used for the label widths."""
    w, h = size
    numbers = list(numbers) if numbers is not None else list(range(1, len(masks) + 1))
    placed: list[tuple[int, int, int, int]] = []
    out: list[Optional[Mark]] = [None] * len(masks)
    order = sorted(range(len(masks)), key=lambda i: int(masks[i].sum()))
    base = font_size(size)
    for i in order:
        candidates = interior_points(masks[i])
        for scale in _FONT_SCALES:
            px = max(8, round(base * scale))
            lw, lh = label_size(str(numbers[i]), px)
            for (x, y) in candidates:
                x1 = min(max(0, x - lw // 2), max(0, w - lw))
                y1 = min(max(0, y - lh // 2), max(0, h - lh))
                box = (x1, y1, x1 + lw, y1 + lh)
                if not any(_overlaps(box, p) for p in placed):
                    placed.append(box)
                    out[i] = Mark(index=i, point=(x, y), label=box, font_px=px, colour=PALETTE[i % len(PALETTE)])
                    break
            if out[i] is not None:
                break
    return out


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_marks(image: Image.Image, marks: Sequence[Mark], numbers: Sequence[int],
               masks: Optional[Sequence[np.ndarray]] = None, contours: bool = False) -> Image.Image:
    """``image`` (RGB) with each mark's label (number ``numbers[k]`` for ``marks[k]``) and,
    with ``contours``, its mask's outline (``masks`` indexed by ``Mark.index``)."""
    out = image.convert("RGB").copy()
    w, h = out.size
    if contours and masks is not None:
        width = max(1, round(min(w, h) / 200))
        pixels = np.array(out)
        for m in marks:
            edge = _edge(masks[m.index], width)
            pixels[edge] = m.colour
        out = Image.fromarray(pixels)
    draw = ImageDraw.Draw(out)
    for m, number in zip(marks, numbers):
        ink = _contrast(m.colour)
        x1, y1, x2, y2 = m.label
        outline = max(1, m.font_px // 10)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=m.colour, outline=ink, width=outline)
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), str(number), fill=ink, font=_font(m.font_px), anchor="mm")
    return out


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's boundary pixels, ``width`` pixels thick (inside the mask)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    inner = im.filter(ImageFilter.MinFilter(2 * width + 1))
    return mask & ~(np.array(inner) > 0)
