"""One PDF (or page image) -> OCR-intensive samples, page by page, with filters.

Item (built on the driver from the files under ``curate.ocr.input``)::

    {"id": "reports/a.pdf", "uri": "s3://b/docs/reports/a.pdf", "kind": "pdf"}     (or "image")

Each page is rendered (``curate.ocr.dpi``) and read from its text layer
(``actors.curate.pages``); a page without one (every page image, a scanned PDF page) goes to the
OCR engine (``curate.ocr.engine: tesseract``) or, with ``none``, is quarantined ``no_text``.
Filters, in order, each a quarantine reason with its count:

- ``near_empty``: fewer than ``min_chars`` non-space characters (a blank page with no text
  layer too);
- ``non_text``: less than ``min_text_fraction`` of the page's ink (pixels darker than mid-grey)
  lies inside the text's line boxes: a figure, a photo, a drawing with a caption;
- ``language``: ``languages`` given and the text's language (langdetect, seeded) not among them;
- ``duplicate``: the same normalised text as an earlier page (decided on the driver, in order,
  from ``Outcome.key``);
- and per file or page: ``bad_pdf`` (pdfium cannot open it or a page), ``rotated_page`` (a
  ``/Rotate`` page: pdfium's character boxes would not match its render), ``bad_image``,
  ``too_large``, ``missing_file``, ``ocr_error``.

A kept page gives its picture ``images/<id>.png`` and LLaVA records (boxes in the model's
canvas frame, ``models.boxes``: ``[x1,y1,x2,y2]`` fractions with two decimals)::

    {"id": "a.pdf#1:text", "image": "images/a.pdf-1-<hash>.png", "conversations": [
        {"from": "human", "value": "<image>\\nTranscribe the text on this page in reading order."},
        {"from": "gpt", "value": "Invoice 2024\\nTotal: 31 EUR"}]}
    {"id": "a.pdf#1:regions", "image": ..., "conversations": [
        {"from": "human", "value": "<image>\\nWhat does the text in [0.06,0.12,0.33,0.17] say?"}, {"from": "gpt", "value": "Invoice 2024"},
        {"from": "human", "value": "Where is the text \\"Total: 31 EUR\\" on the page?"}, {"from": "gpt", "value": "[0.06,0.19,0.35,0.24]"},
        {"from": "human", "value": "What is the Total on this page?"}, {"from": "gpt", "value": "31 EUR"},
        {"from": "human", "value": "Read the table row inside [0.06,0.30,0.80,0.34], cell by cell."},
        {"from": "gpt", "value": "Paper | 2 | 4 EUR"}]}

Key-value turns come from lines ``Key: value``; table turns from rows whose words fall into two or
more cells (``actors.curate.pages.cells``: a gap wider than 1.5 line heights) next to another such
row.

A page whose transcription does not fit ``data.max_seq_len`` (its image tokens, the template and
the text, counted as UTF-8 bytes: never fewer than a byte-level BPE's tokens) is split into
consecutive rows, each asked as "Transcribe the text inside [box] in reading order."
(``:text0``, ``:text1``, ...). The ``regions`` record keeps only the turns that fit.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from actors.curate.outcome import Outcome, image_name
from actors.curate.pages import Line, cells, reading_order, render_page, row_text, text_layer, transcription, union
from cluster.spec import ClusterSpec, OcrCurate
from cluster.storage import Storage
from models.boxes import BoxError, format_box, to_canvas
from models.conversation import IMAGE
from models.errors import UserError
from models.tiling import TileSpec, image_token_count

PDF_EXTS = (".pdf",)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
TEMPLATE_BYTES = 64  # the system prompt's share is not counted in max_seq_len by us: a margin per record
TURN_BYTES = 24  # " Human: ", " Assistant: ", "\n###" per question-answer pair
INK = 128  # a pixel darker than this (grey level) is ink
REGION_TURNS = 3  # text-of-region and where-is questions per page (each)
TABLE_TURNS = 2  # table rows asked cell by cell per page
KEY_VALUE = re.compile(r"^([A-Za-z][\w .()/-]{0,40}?)\s*:\s*(\S.{0,200})$")


@dataclass(frozen=True)
class OcrConfig:
    section: OcrCurate
    tile: TileSpec
    tokens_per_view: int
    max_seq_len: int
    max_image_bytes: int
    max_image_pixels: int

    @classmethod
    def from_spec(cls, spec: ClusterSpec) -> "OcrConfig":
        from models.flavours import from_name

        flavour = from_name(spec.model.flavour, **spec.model.overrides)
        return cls(section=spec.curate.ocr, tile=TileSpec.from_flavour(flavour), tokens_per_view=flavour.tokens_per_view,
                   max_seq_len=spec.data.max_seq_len, max_image_bytes=spec.data.max_image_bytes,
                   max_image_pixels=spec.data.max_image_pixels)

    def fingerprint(self) -> dict[str, Any]:
        return {"tile": repr(self.tile), "tokens_per_view": self.tokens_per_view, "max_seq_len": self.max_seq_len,
                "max_image_bytes": self.max_image_bytes}


def input_kind(name: str) -> Optional[str]:
    low = name.lower()
    return "pdf" if low.endswith(PDF_EXTS) else "image" if low.endswith(IMAGE_EXTS) else None


# ----------------------------------------------------------------------------- a file


def curate_file(item: dict, config: OcrConfig, storage: Storage) -> list[Outcome]:
    fid = item["id"]
    try:
        data = storage.read_bytes(item["uri"])
    except UserError as err:
        return [Outcome.quarantined(fid, "missing_file", str(err))]
    if len(data) > config.max_image_bytes:
        return [Outcome.quarantined(fid, "too_large", f"{len(data)} bytes > data.max_image_bytes {config.max_image_bytes}")]
    if item["kind"] == "image":
        try:
            image = Image.open(io.BytesIO(data))
            if image.size[0] * image.size[1] > config.max_image_pixels:
                return [Outcome.quarantined(fid, "too_large", f"{image.size} pixels > data.max_image_pixels")]
            image = image.convert("RGB")
        except Exception as err:  # PIL raises many types on bad bytes
            return [Outcome.quarantined(fid, "bad_image", f"{type(err).__name__}: {err}")]
        return [curate_page(fid, image, None, config)]
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except Exception as err:  # pdfium's PdfiumError and friends
        return [Outcome.quarantined(fid, "bad_pdf", f"{type(err).__name__}: {err}")]
    try:
        out = []
        pages = len(pdf)
        for i in range(min(pages, config.section.max_pages_per_file)):
            page = pdf[i]
            if page.get_rotation() % 360:  # pdfium's character boxes ignore /Rotate; the render does not
                out.append(Outcome.quarantined(f"{fid}#{i + 1}", "rotated_page",
                                               f"page {i + 1} is rotated {page.get_rotation()} degrees"))
                page.close()
                continue
            try:
                image, lines = render_page(page, config.section.dpi), text_layer(page, config.section.dpi)
            except Exception as err:  # one broken page loses that page only
                out.append(Outcome.quarantined(f"{fid}#{i + 1}", "bad_pdf", f"page {i + 1}: {type(err).__name__}: {err}"))
                continue
            finally:
                page.close()
            out.append(curate_page(f"{fid}#{i + 1}", image, lines, config))
        if pages > config.section.max_pages_per_file and out:
            out[0].counts["pages_over_max"] = pages - config.section.max_pages_per_file
        return out or [Outcome.quarantined(fid, "near_empty", "the PDF has no pages")]
    finally:
        pdf.close()


# ----------------------------------------------------------------------------- a page


def curate_page(pid: str, image: Image.Image, lines: Optional[list[Line]], config: OcrConfig) -> Outcome:
    """One page picture + its text-layer lines (``None``: no text layer) -> an :class:`Outcome`."""
    section = config.section
    rgb = np.asarray(image)
    colourless = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    # a colourless page's grey level is any one channel (PIL's L weights sum to one, exactly)
    gray = np.ascontiguousarray(rgb[..., 0]) if colourless else np.asarray(image.convert("L"))
    ink = gray < INK
    counts = {"pages_text_layer": 0, "pages_ocr": 0}
    if not lines or sum(len(ln.text.replace(" ", "")) for ln in lines) == 0:
        if not ink.any():
            return Outcome.quarantined(pid, "near_empty", "a blank page without text")
        if section.engine == "none":
            return Outcome.quarantined(pid, "no_text", "no usable text layer and curate.ocr.engine is none")
        from actors.curate.ocr_engine import ocr_lines

        try:
            lines = ocr_lines(image, section.engine_languages)
        except Exception as err:  # a crashed or timed-out engine loses this page only
            return Outcome.quarantined(pid, "ocr_error", f"{type(err).__name__}: {err}")
        counts["pages_ocr"] = 1
    else:
        counts["pages_text_layer"] = 1
    rows = reading_order(lines)
    text = transcription(rows)
    chars = len(re.sub(r"\s", "", text))
    if chars < section.min_chars:
        return Outcome.quarantined(pid, "near_empty", f"{chars} characters < curate.ocr.min_chars {section.min_chars}",
                                   **counts)
    covered = _ink_in_boxes(ink, [ln.box for ln in lines])
    if covered < section.min_text_fraction:
        return Outcome.quarantined(pid, "non_text", f"{covered:.0%} of the ink is text < curate.ocr.min_text_fraction "
                                   f"{section.min_text_fraction:.0%}", **counts)
    if section.languages:
        lang = detect_language(text)
        if lang not in section.languages:
            return Outcome.quarantined(pid, "language", f"{lang} is not in curate.ocr.languages {section.languages}",
                                       **counts)
    name = image_name(pid)
    try:
        records = page_records(pid, name, image.size, rows, config)
    except BoxError as err:
        return Outcome.quarantined(pid, "bad_box", err.detail, **counts)
    key = hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()
    picture = Image.fromarray(gray, mode="L") if colourless else image
    return Outcome(id=pid, records=records, images={name: page_png(picture)}, counts=counts, key=key,
                   preview={"image": name, "boxes": [list(ln.box) for ln in lines]})


def page_png(image: Image.Image) -> bytes:
    """The page as PNG, zlib level 1 (encoding at the default level took over half a page's time).
    ``curate_page`` hands a colourless page over as one grey channel (most documents: a third of
    the bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _ink_in_boxes(ink: np.ndarray, boxes: list[tuple]) -> float:
    total = int(ink.sum())
    if total == 0:
        return 0.0
    inside = np.zeros_like(ink)
    h, w = ink.shape
    for x1, y1, x2, y2 in boxes:
        inside[max(0, int(y1) - 1):min(h, int(np.ceil(y2)) + 1), max(0, int(x1) - 1):min(w, int(np.ceil(x2)) + 1)] = True
    return float((ink & inside).sum()) / total


def detect_language(text: str) -> str:
    """ISO 639-1 code of ``text`` (langdetect, seeded: the same answer every run), ``unknown`` if none."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return "unknown"


# ----------------------------------------------------------------------------- samples


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def page_records(pid: str, image_ref: str, size: tuple[int, int], rows: list[list[Line]], config: OcrConfig) -> list[dict]:
    """The transcription record(s) and the regions record of one page (see module doc)."""
    budget = config.max_seq_len - image_token_count(size[0], size[1], config.tile, config.tokens_per_view) - TEMPLATE_BYTES

    def box(b: tuple) -> str:
        return format_box(to_canvas(b, size, config.tile))

    def record(rid: str, qa: list[tuple[str, str]]) -> dict:
        turns = []
        for i, (q, a) in enumerate(qa):
            turns += [{"from": "human", "value": f"{IMAGE}\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
        return {"id": rid, "image": image_ref, "conversations": turns}

    whole = ("Transcribe the text on this page in reading order.", transcription(rows))
    out = []
    if TURN_BYTES + _bytes(whole[0]) + _bytes(whole[1]) <= budget:
        out.append(record(f"{pid}:text", [whole]))
    else:
        for k, chunk in enumerate(_chunks(rows, budget, box)):
            region = union([ln.box for row in chunk for ln in row])
            out.append(record(f"{pid}:text{k}", [(f"Transcribe the text inside {box(region)} in reading order.",
                                                  transcription(chunk))]))
    rng = random.Random(int(hashlib.sha1(pid.encode()).hexdigest()[:12], 16))
    lines = [ln for row in rows for ln in row]
    texts = [ln.text for ln in lines]
    asked = rng.sample(lines, min(REGION_TURNS, len(lines)))
    unique = [ln for ln in lines if texts.count(ln.text) == 1]
    where = rng.sample(unique, min(REGION_TURNS, len(unique)))
    qa = [(f"What does the text in {box(ln.box)} say?", ln.text) for ln in asked]
    qa += [(f'Where is the text "{ln.text}" on the page?', box(ln.box)) for ln in where]
    qa += [(f"What is the {m.group(1).strip()} on this page?", m.group(2).strip())
           for m in (KEY_VALUE.match(t) for t in texts) if m][:2]
    qa += _table_turns(rows, box)
    kept, used = [], 0
    for q, a in qa:
        cost = TURN_BYTES + _bytes(q) + _bytes(a)
        if used + cost <= budget:
            kept.append((q, a))
            used += cost
    if kept:
        out.append(record(f"{pid}:regions", kept))
    return out


def _table_turns(rows: list[list[Line]], box) -> list[tuple[str, str]]:
    """Table rows (two or more consecutive rows of two or more cells, ``pages.cells``): the first
    ``TABLE_TURNS`` are asked cell by cell, the answer the cells joined by `` | ``."""
    split = [cells(r) for r in rows]
    turns: list[tuple[str, str]] = []
    for k, row_cells in enumerate(split):
        in_table = len(row_cells) >= 2 and any(len(split[j]) >= 2 for j in (k - 1, k + 1) if 0 <= j < len(split))
        if in_table and len(turns) < TABLE_TURNS:
            region = union([b for _, b in row_cells])
            turns.append((f"Read the table row inside {box(region)}, cell by cell.", " | ".join(t for t, _ in row_cells)))
    return turns


def _chunks(rows: list[list[Line]], budget: int, box) -> list[list[list[Line]]]:
    """Consecutive rows, each chunk's question + text within ``budget`` bytes (a row longer than
    the budget alone is its own chunk, truncated by preprocess's ``data.overflow``)."""
    question = TURN_BYTES + _bytes("Transcribe the text inside [0.00,0.00,1.00,1.00] in reading order.")
    chunks: list[list[list[Line]]] = [[]]
    used = question
    for row in rows:
        cost = _bytes(row_text(row)) + 1
        if chunks[-1] and used + cost > budget:
            chunks.append([])
            used = question
        chunks[-1].append(row)
        used += cost
    return chunks
