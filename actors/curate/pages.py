"""Document pages -> pixels and text lines with boxes: the PDF text layer (pypdfium2) and reading order.

A page becomes an RGB picture rendered at ``dpi`` and its text as :class:`Line` s, each with its
pixel box on that picture (the union of its characters' boxes) and its words' boxes::

    >>> page = render_page(pdf[0], dpi=96)
    >>> lines = text_layer(pdf[0], dpi=96)
    >>> lines[0]            # Line(text='Hello world', box=(40.0, 38.3, 131.0, 53.6), words=[('Hello', (...)), ...])
    >>> transcription(reading_order(lines))
    'Hello world\\nSecond line'

PDF user space has its origin at the bottom left in points (1/72 in); a pixel is
``x_px = (x - left) * dpi / 72``, ``y_px = (top - y) * dpi / 72`` on the rendered page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

Box = tuple[float, float, float, float]
_PAD_PX = 1.0  # glyph boxes are tight; anti-aliased ink spills about a pixel


@dataclass(frozen=True)
class Line:
    text: str
    box: Box  # x1, y1, x2, y2 pixels on the rendered page
    words: list[tuple[str, Box]] = field(default_factory=list)


def union(boxes: list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def render_page(page, dpi: float) -> Image.Image:
    image = page.render(scale=dpi / 72.0).to_pil()
    return image if image.mode == "RGB" else image.convert("RGB")


def text_layer(page, dpi: float) -> list[Line]:
    """The page's text layer as lines (in the layer's order), boxes in pixels at ``dpi``.

    Lines are split where pdfium reports a line break (``\\r\\n`` / ``\\n``); words at spaces.
    Characters without a box (generated spaces and breaks) give text but no box."""
    scale = dpi / 72.0
    left, bottom, right, top = page.get_bbox()
    textpage = page.get_textpage()
    n = textpage.count_chars()
    text = textpage.get_text_range(0, n) if n else ""
    if len(text) != n:  # characters beyond the BMP take two of pdfium's indices: read one index at a time
        text = "".join(textpage.get_text_range(i, 1)[:1] or " " for i in range(n))
    lines: list[Line] = []
    chars: list[tuple[str, Box | None]] = []

    def flush() -> None:
        line = "".join(c for c, _ in chars).strip()
        if line:
            words, word, box = [], "", None  # box: the word's characters' union so far
            for c, b in chars + [(" ", None)]:
                if c.isspace():
                    if word and box:
                        words.append((word, (box[0] - _PAD_PX, box[1] - _PAD_PX, box[2] + _PAD_PX, box[3] + _PAD_PX)))
                    word, box = "", None
                else:
                    word += c
                    if b is not None:
                        box = b if box is None else (min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]),
                                                     max(box[3], b[3]))
            if words:
                lines.append(Line(text=" ".join(line.split()), box=union([w[1] for w in words]), words=words))
        chars.clear()

    for i, c in enumerate(text[:n]):
        if c == "\r" and i + 1 < n and text[i + 1] == "\n":
            continue  # the \n after it ends the line
        if c in "\r\n":
            flush()
            continue
        box = None
        if not c.isspace():
            l, b, r, t = textpage.get_charbox(i, loose=False)
            if r > l and t > b:
                box = ((l - left) * scale, (top - t) * scale, (r - left) * scale, (top - b) * scale)
        chars.append((c, box))
    flush()
    return lines


def reading_order(lines: list[Line]) -> list[list[Line]]:
    """Lines -> rows top to bottom, each row's lines left to right. Two lines share a row when
    their vertical centres are within half the smaller line's height (one column's reading order)."""
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda ln: ((ln.box[1] + ln.box[3]) / 2, ln.box[0])):
        cy, h = (line.box[1] + line.box[3]) / 2, line.box[3] - line.box[1]
        if rows:
            last = rows[-1][0]
            lcy, lh = (last.box[1] + last.box[3]) / 2, last.box[3] - last.box[1]
            if abs(cy - lcy) <= min(h, lh) / 2:
                rows[-1].append(line)
                continue
        rows.append([line])
    return [sorted(row, key=lambda ln: ln.box[0]) for row in rows]


def cells(row: list[Line], gap: float = 1.5) -> list[tuple[str, Box]]:
    """A row's words grouped into cells: a new cell where the space between two words is wider
    than ``gap`` line heights (a table's column gap; a word space is about a third of one).

    Before: ``Name    Qty    Price`` on one baseline. After: ``[("Name", box), ("Qty", box), ("Price", box)]``."""
    words = sorted((w for line in row for w in line.words), key=lambda w: w[1][0])
    if not words:
        return []
    height = max(line.box[3] - line.box[1] for line in row)
    out: list[list[tuple[str, Box]]] = [[words[0]]]
    for word in words[1:]:
        if word[1][0] - out[-1][-1][1][2] > gap * height:
            out.append([])
        out[-1].append(word)
    return [(" ".join(t for t, _ in cell), union([b for _, b in cell])) for cell in out]


def row_text(row: list[Line]) -> str:
    return " ".join(line.text for line in row)


def transcription(rows: list[list[Line]]) -> str:
    return "\n".join(row_text(r) for r in rows)
