"""The OCR engine for pages without a usable text layer: Debian's ``tesseract`` (``curate.ocr.engine``).

Nothing is downloaded at run time: the binary and its language data come from the system
packages (``apt-get install tesseract-ocr``; ``eng`` ships with it). :func:`check_tesseract` fails
with a clear message when either is missing; :func:`ocr_lines` runs it on one page picture and
returns the same :class:`actors.curate.pages.Line` s as the text layer (words and boxes from
tesseract's TSV: level 5 rows, grouped by block / paragraph / line).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from actors.curate.pages import Line, union
from models.errors import UserError

MIN_CONFIDENCE = 30.0  # tesseract's per-word confidence (0..100); below: not a word


def check_tesseract(languages: str) -> None:
    if shutil.which("tesseract") is None:
        raise UserError("curate.ocr.engine is tesseract, but the tesseract binary is not installed "
                        "(apt-get install tesseract-ocr), or set curate.ocr.engine: none")
    out = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True, timeout=30)
    have = set(out.stdout.split()[1:] if out.stdout else [])
    missing = [lang for lang in languages.split("+") if lang not in have]
    if missing:
        raise UserError(f"curate.ocr.engine_languages: tesseract has no data for {missing} (installed: "
                        f"{sorted(have)}); install tesseract-ocr-<lang>")


def ocr_lines(image: Image.Image, languages: str, timeout_s: float = 120) -> list[Line]:
    with tempfile.TemporaryDirectory(prefix="sphinx-x-ocr-") as tmp:
        path = Path(tmp) / "page.png"
        image.save(path)
        out = subprocess.run(["tesseract", str(path), "stdout", "-l", languages, "--psm", "3", "tsv"],
                             capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"tesseract failed ({out.returncode}): {out.stderr.strip()[:200]}")
    groups: dict[tuple, list[tuple[str, tuple]]] = {}
    for row in out.stdout.splitlines()[1:]:
        cols = row.split("\t")
        if len(cols) < 12 or cols[0] != "5" or not cols[11].strip():
            continue
        if float(cols[10]) < MIN_CONFIDENCE:
            continue
        x, y, w, h = (float(v) for v in cols[6:10])
        groups.setdefault((int(cols[2]), int(cols[3]), int(cols[4])), []).append((cols[11].strip(), (x, y, x + w, y + h)))
    return [Line(text=" ".join(t for t, _ in words), box=union([b for _, b in words]), words=words)
            for _, words in sorted(groups.items())]
