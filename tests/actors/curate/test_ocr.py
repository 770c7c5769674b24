"""actors.curate.ocr / pages / ocr_engine on PDFs written here (pipelines/demo/synthetic_pdfs.py): the
transcription equals the PDF's text, the boxes land on the words (checked on the rendered page),
and every filter quarantines with its reason. No Ray."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from actors.curate.ocr import OcrConfig, curate_file, detect_language
from actors.curate.pages import reading_order, text_layer, transcription
from cluster.spec import OcrCurate, StorageSection
from cluster.storage import open_storage
from models.boxes import from_canvas, parse_boxes
from models.flavours import from_name
from models.tiling import TileSpec
from pipelines.demo.synthetic_pdfs import figure_pdf, scanned_pdf, table_pdf, text_pdf

PAGE_1 = ["Quarterly report 2024", "Revenue: 41 million", "Costs were lower than planned", "Total: 12 units"]
PAGE_2 = ["The second page has its own words", "and a closing line"]


def _config(max_seq_len=2048, **section) -> OcrConfig:
    flavour = from_name("debug")
    return OcrConfig(section=OcrCurate(input="docs", **section), tile=TileSpec.from_flavour(flavour),
                     tokens_per_view=flavour.tokens_per_view, max_seq_len=max_seq_len, max_image_bytes=2**24,
                     max_image_pixels=10**8)


@pytest.fixture
def storage(tmp_path):
    return open_storage(StorageSection(uri=str(tmp_path), endpoint_url=None))


def _put(storage, name: str, data: bytes) -> dict:
    storage.write_bytes(storage.path(name), data)
    kind = "pdf" if name.endswith(".pdf") else "image"
    return {"id": name, "uri": storage.path(name), "kind": kind}


def _ink(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


def test_transcription_is_the_pdfs_text_and_boxes_land_on_the_words(storage):
    item = _put(storage, "report.pdf", text_pdf([PAGE_1, PAGE_2]))
    pages = curate_file(item, _config(), storage)
    assert [p.id for p in pages] == ["report.pdf#1", "report.pdf#2"] and all(p.reason is None for p in pages)
    for page, lines in zip(pages, (PAGE_1, PAGE_2)):
        text_rec, regions = page.records
        assert text_rec["conversations"][0]["value"].startswith("<image>\n")
        assert text_rec["conversations"][1]["value"] == "\n".join(lines)
        image = Image.open(io.BytesIO(page.images[text_rec["image"]]))
        ink = _ink(image)
        turns = regions["conversations"]
        checked = 0
        for q, a in zip(turns[0::2], turns[1::2]):
            m = re.search(r'Where is the text "(.*)" on the page\?', q["value"])
            m2 = re.search(r"What does the text in (\[[^\]]*\]) say\?", q["value"])
            if m:
                phrase, (g,) = m.group(1), parse_boxes(a["value"])
            elif m2:
                phrase, (g,) = a["value"], parse_boxes(m2.group(1))
            else:
                continue
            assert phrase in lines
            x1, y1, x2, y2 = from_canvas(g.boxes[0], image.size, _config().tile)
            inside = ink[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
            assert inside.sum() > 20 * len(phrase.replace(" ", "")) // 4, (phrase, inside.sum())
            # the box holds that line's ink only: the rows just above and below it are blank
            assert not ink[max(0, int(y1) - 6):max(0, int(y1) - 3), int(x1):int(x2)].any()
            assert not ink[int(np.ceil(y2)) + 3:int(np.ceil(y2)) + 6, int(x1):int(x2)].any()
            checked += 1
        assert checked >= 2
    kv = [t["value"] for t in pages[0].records[1]["conversations"]]
    assert not any("cell by cell" in t for t in kv)  # prose is no table
    assert "What is the Revenue on this page?" in kv and kv[kv.index("What is the Revenue on this page?") + 1] == "41 million"


def test_every_glyph_lies_in_its_line_box():
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(text_pdf([PAGE_1]))
    page = pdf[0]
    lines = text_layer(page, 96)
    ink = _ink(page.render(scale=96 / 72).to_pil())
    covered = np.zeros_like(ink)
    for ln in lines:
        x1, y1, x2, y2 = ln.box
        covered[int(y1):int(np.ceil(y2)) + 1, int(x1):int(np.ceil(x2)) + 1] = True
        for word, (wx1, wy1, wx2, wy2) in ln.words:
            assert ink[int(wy1):int(np.ceil(wy2)), int(wx1):int(np.ceil(wx2))].any(), word
    assert (ink & ~covered).sum() <= 0.01 * ink.sum()
    assert transcription(reading_order(lines)) == "\n".join(PAGE_1)


def test_long_pages_are_split_to_fit_max_seq_len(storage):
    lines = [f"Line number {k} of a long page with many words" for k in range(10)]
    item = _put(storage, "long.pdf", text_pdf([lines]))
    config = _config(max_seq_len=400)
    (page,) = curate_file(item, config, storage)
    texts = [r for r in page.records if ":text" in r["id"]]
    assert len(texts) > 1
    assert "\n".join(r["conversations"][1]["value"] for r in texts) == "\n".join(lines)
    for r in page.records:
        size = sum(len(t["value"].encode()) + 12 for t in r["conversations"])
        assert size <= 400 - 95 , (r["id"], size)  # 95: the debug flavour's tokens for this page


def test_pages_without_text_layer_need_an_engine(storage):
    image = Image.new("L", (800, 600), 255)
    ImageDraw.Draw(image).text((40, 60), "Scanned invoice number 42", fill=0, font=ImageFont.load_default(size=48))
    item = _put(storage, "scan.pdf", scanned_pdf(image))
    (page,) = curate_file(item, _config(), storage)
    assert page.reason == "no_text"
    blank = _put(storage, "blank.pdf", scanned_pdf(Image.new("L", (80, 60), 255)))
    (page,) = curate_file(blank, _config(), storage)
    assert page.reason == "near_empty"


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed (apt-get install tesseract-ocr)")
def test_tesseract_reads_a_scanned_page(storage):
    image = Image.new("L", (1600, 1200), 255)
    ImageDraw.Draw(image).text((80, 120), "Scanned invoice number 42", fill=0, font=ImageFont.load_default(size=72))
    item = _put(storage, "scan.pdf", scanned_pdf(image))
    (page,) = curate_file(item, _config(engine="tesseract", dpi=144, min_chars=5), storage)
    assert page.reason is None, page.detail
    assert page.records[0]["conversations"][1]["value"] == "Scanned invoice number 42"
    assert page.counts["pages_ocr"] == 1


def test_an_absent_engine_fails_clearly(monkeypatch):
    from actors.curate import ocr_engine
    from models.errors import UserError

    monkeypatch.setattr(ocr_engine.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="tesseract binary is not installed"):
        ocr_engine.check_tesseract("eng")


def test_filters_quarantine_with_reasons(storage):
    (page,) = curate_file(_put(storage, "fig.pdf", figure_pdf("Figure 1: a black box")), _config(), storage)
    assert page.reason == "non_text"
    (page,) = curate_file(_put(storage, "short.pdf", text_pdf([["Hi"]])), _config(), storage)
    assert page.reason == "near_empty"
    german = ["Die Katze sitzt auf der Matte und schaut aus dem Fenster", "Morgen regnet es wieder in der Stadt"]
    (page,) = curate_file(_put(storage, "de.pdf", text_pdf([german])), _config(languages=["en"]), storage)
    assert page.reason == "language" and "de" in page.detail
    (page,) = curate_file(_put(storage, "en.pdf", text_pdf([PAGE_1])), _config(languages=["en"]), storage)
    assert page.reason is None
    (page,) = curate_file(_put(storage, "broken.pdf", b"%PDF-1.4 nothing"), _config(), storage)
    assert page.reason == "bad_pdf"
    rotated = text_pdf([PAGE_1]).replace(b"/Type /Page /Parent", b"/Type /Page /Rotate 90 /Parent")
    (page,) = curate_file(_put(storage, "rotated.pdf", rotated), _config(), storage)
    assert page.reason == "rotated_page"
    assert detect_language("") == "unknown"


def test_same_text_gives_the_same_key_for_the_duplicate_filter(storage):
    a = curate_file(_put(storage, "a.pdf", text_pdf([PAGE_1])), _config(), storage)[0]
    b = curate_file(_put(storage, "b.pdf", text_pdf([PAGE_1])), _config(), storage)[0]
    c = curate_file(_put(storage, "c.pdf", text_pdf([PAGE_2])), _config(), storage)[0]
    assert a.key == b.key != c.key


def test_table_rows_are_read_cell_by_cell(storage):
    rows = [["Item", "Qty", "Price"], ["Paper", "2", "4 EUR"], ["Ink", "1", "9 EUR"]]
    (page,) = curate_file(_put(storage, "t.pdf", table_pdf("Order 7", rows)), _config(), storage)
    assert page.reason is None, page.detail
    assert page.records[0]["conversations"][1]["value"] == "Order 7\n" + "\n".join(" ".join(r) for r in rows)
    turns = page.records[-1]["conversations"]
    asked = [(q["value"], a["value"]) for q, a in zip(turns[0::2], turns[1::2]) if "cell by cell" in q["value"]]
    assert [a for _, a in asked] == ["Item | Qty | Price", "Paper | 2 | 4 EUR"]
    image = Image.open(io.BytesIO(page.images[page.records[0]["image"]]))
    (g,) = parse_boxes(asked[1][0])
    x1, y1, x2, y2 = from_canvas(g.boxes[0], image.size, _config().tile)
    assert _ink(image)[int(y1):int(y2) + 1, int(x1):int(x2) + 1].sum() > 50  # on the row "Paper 2 4 EUR"


def test_a_colourless_page_is_stored_grey_a_coloured_one_in_colour():
    """The page picture: one grey channel, pixel for pixel PIL's ``convert("L")`` of the render,
    when the page has no colour; RGB, as rendered, when it has."""
    from actors.curate.ocr import curate_page
    from actors.curate.pages import Line

    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (60, 90, 1), dtype=np.uint8), 3, axis=2)
    grey[10:20, 10:80] = 0  # a dark line of "text"
    line = [Line(text="Hello there world", box=(9.0, 9.0, 81.0, 21.0), words=[("Hello", (9.0, 9.0, 81.0, 21.0))])]
    config = _config(min_chars=1, min_text_fraction=0.0)
    for pixels, mode in ((grey, "L"), (np.concatenate([grey[..., :2], grey[..., :1] // 2], axis=2), "RGB")):
        image = Image.fromarray(pixels, mode="RGB")
        out = curate_page("p#1", image, line, config)
        assert out.reason is None, out.detail
        (stored,) = [Image.open(io.BytesIO(b)) for b in out.images.values()]
        assert stored.mode == mode
        want = image.convert("L") if mode == "L" else image
        assert np.array_equal(np.asarray(stored), np.asarray(want))
