"""Small PDFs written by hand (no PDF library), for the OCR curation tests and benchmarks/curate.py.

``text_pdf([["Hello world", "second line"], [...]])``: one page per list, each line drawn with the
standard Helvetica font (a real text layer). ``scanned_pdf(image)``: one page holding only a
grayscale picture (no text layer), as a scanner writes it.
"""

from __future__ import annotations

from PIL import Image

PAGE_W, PAGE_H = 400, 300  # points
FONT_PT, LEADING, LEFT, TOP = 14, 22, 30, 260


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _pdf(objects: list[bytes]) -> bytes:
    """Objects (numbered from 1, the first the catalog) -> a PDF with a correct xref table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _stream(data: bytes, extra: str = "") -> bytes:
    return f"<< /Length {len(data)} {extra}>>\nstream\n".encode() + data + b"\nendstream"


def text_pdf(pages: list[list[str]]) -> bytes:
    """One page per entry of ``pages``, its lines top to bottom in Helvetica ``FONT_PT``."""
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
    for i, lines in enumerate(pages):
        ops = [f"BT /F1 {FONT_PT} Tf {LEADING} TL {LEFT} {TOP} Td"]
        for k, line in enumerate(lines):
            ops.append(("" if k == 0 else "T* ") + f"({_escape(line)}) Tj")
        ops.append("ET")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] /Contents {page_ids[i] + 1} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>".encode())
        objects.append(_stream("\n".join(ops).encode("latin-1")))
    return _pdf(objects)


def scanned_pdf(image: Image.Image) -> bytes:
    """One page showing ``image`` (grayscale, raw samples) over the whole page; no text layer."""
    gray = image.convert("L")
    w, h = gray.size
    content = f"q {PAGE_W} 0 0 {PAGE_H} 0 0 cm /Im1 Do Q".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] /Contents 4 0 R "
               f"/Resources << /XObject << /Im1 5 0 R >> >> >>".encode(),
               _stream(content),
               _stream(gray.tobytes(), f"/Type /XObject /Subtype /Image /Width {w} /Height {h} /ColorSpace /DeviceGray "
                       "/BitsPerComponent 8 ")]
    return _pdf(objects)


def figure_pdf(caption: str) -> bytes:
    """One page that is mostly a filled black rectangle (a figure) with a one-line caption under it."""
    content = (f"0 0 0 rg 30 70 340 200 re f BT /F1 10 Tf {LEFT} 45 Td ({_escape(caption)}) Tj ET").encode("latin-1")
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] /Contents 4 0 R "
               f"/Resources << /Font << /F1 5 0 R >> >> >>".encode(),
               _stream(content),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
    return _pdf(objects)


def table_pdf(title: str, rows: list[list[str]], column_pt: float = 110) -> bytes:
    """One page: ``title``, then ``rows`` of cells, each cell at its own x (``column_pt`` apart)
    on the row's baseline, as a table is typeset."""
    ops = [f"BT /F1 {FONT_PT} Tf {LEFT} {TOP} Td ({_escape(title)}) Tj ET"]
    for r, row in enumerate(rows):
        y = TOP - LEADING * (r + 1)
        for c, cell in enumerate(row):
            ops.append(f"BT /F1 {FONT_PT} Tf {LEFT + c * column_pt} {y} Td ({_escape(cell)}) Tj ET")
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] /Contents 4 0 R "
               f"/Resources << /Font << /F1 5 0 R >> >> >>".encode(),
               _stream("\n".join(ops).encode("latin-1")),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
    return _pdf(objects)
