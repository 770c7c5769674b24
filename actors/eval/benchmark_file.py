"""Read a benchmark file as the field publishes it: a VLMEvalKit TSV or a LLaVA / lmms-eval JSONL.

Storage-agnostic: the caller passes ``reader(path) -> bytes`` (local paths work without one).
Nothing is downloaded. Every usable row becomes one frozen :class:`Question`; a row that cannot be
used is returned in ``BenchmarkFile.bad_rows`` as ``(row, index, reason)`` and never raises; a file
without one usable row raises :class:`models.errors.UserError` naming the file.

**VLMEvalKit TSV** (``vlmeval/dataset/image_base.py`` ``ImageBaseDataset.__init__``, read with
``pandas.read_csv(sep='\\t')``): columns ``index``, ``image`` (base64) and/or ``image_path``,
``question``, optional ``hint``, option columns ``A``, ``B``, ... (an empty or NA cell = no such
option), ``answer``, ``category``, ``l2-category``, ``split`` and, in circular files, ``g_index``.

- an ``image`` cell of at most 64 characters is the ``index`` of another row whose cell holds the
  base64 (VLMEvalKit's space saver; the rotated copies of a circular file point at their original);
  a cell ``"['<b64>', '<b64>']"`` is a list of images (``toliststr``);
- without ``image``, ``image_path`` cells are paths (a list literal for several), relative to
  ``image_root`` (default: the TSV's folder);
- a VQA-style ``answer`` holds the list of human answers as a Python list literal, as VLMEvalKit
  writes it and reads it back (``vqa_eval.process_line``: ``istype(answer, list)`` then ``eval``)::

      index  image   question            answer
      7      iVBO..  What is written?    ['stop', 'stop', 'stop sign', ...]

- cells pandas reads as NA (``''``, ``NA``, ``N/A``, ``NaN``, ``None``, ``null``, ...) count as
  empty for ``hint`` and the options, exactly as ``pd.isna`` sees them in VLMEvalKit.

**LLaVA / lmms-eval JSONL**: one object a line with ``question_id``, ``image`` (a path, relative to
``image_root``, or a list of them), ``text`` or ``question``, and ``answers`` (a list) or
``answer``; ``category`` optional. Example: ``{"question_id": 3, "image": "a.jpg",
"text": "What colour?", "answers": ["red", "red", "dark red"]}``. A JSON array of such objects is read
too, and LLaMA2-Accessory's ``eval_mm/annotations`` names (``image_path``, ``gt_answers``) are
accepted for ``image`` and ``answers``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from models.errors import UserError

Reader = Callable[[str], bytes]
Image = Union[bytes, str]  # decoded image bytes, or a path for ``reader``

FORMATS = ("tsv", "jsonl")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# pandas.read_csv's default NA strings (pandas/_libs/parsers.pyx STR_NA_VALUES).
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_REF_MAX = 64  # VLMEvalKit: an image cell of <= 64 characters refers to another row
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
_CIRCULAR_OFFSET = 1_000_000  # multiple_choice.mcq_circular_eval: g_index = index % 1e6


@dataclass(frozen=True)
class Question:
    """One benchmark question.

    ``id``: the ``index`` / ``question_id`` as text; ``row``: its 0-based data row in the file;
    ``images``: bytes (decoded base64) or paths; ``options``: letter -> text, in letter order
    (empty for open questions); ``answers``: one for multiple choice and yes/no, the human answers
    for VQA, the reference captions for captioning; ``group``: the CircularEval group (``g_index``,
    else ``index % 1e6`` for integer indices, else ``id``); ``image_key``: which image this is
    (``image_path``, else the index of the row holding the base64, else the JSONL ``image``), the
    pairing key of MME; ``extra``: every other column, as text.
    """

    id: str
    row: int
    images: tuple[Image, ...]
    question: str
    hint: Optional[str] = None
    options: Mapping[str, str] = field(default_factory=dict)
    answers: tuple[str, ...] = ()
    category: Optional[str] = None
    l2_category: Optional[str] = None
    split: Optional[str] = None
    group: str = ""
    image_key: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""


@dataclass(frozen=True)
class BadRow:
    row: int          # 0-based data row
    index: str        # the row's index / question_id, "" when it has none
    reason: str


@dataclass(frozen=True)
class BenchmarkFile:
    path: str
    format: str
    questions: tuple[Question, ...]
    bad_rows: tuple[BadRow, ...]


def read_local(path: str) -> bytes:
    if "://" in path:
        raise UserError(f"{path}: no reader for this URL was given (pass the storage's reader)")
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read benchmark file {path}: {e.strerror or e}") from e


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def join_path(root: str, rel: str) -> str:
    if rel.startswith("/") or "://" in rel or not root:
        return rel
    return root.rstrip("/") + "/" + (rel[2:] if rel.startswith("./") else rel)


def read_benchmark(path: str, fmt: Optional[str] = None, *, reader: Optional[Reader] = None,
                   image_root: Optional[str] = None, require_answer: bool = True,
                   text_only: bool = False) -> BenchmarkFile:
    """Read ``path`` (``fmt`` ``tsv`` | ``jsonl``; default from the extension).

    ``text_only``: a row without an image is a text-only question (a language benchmark, the demo's
    chat turns); off (the field's files), such a row is malformed."""
    fmt = fmt or _format_from_name(path)
    if fmt not in FORMATS:
        raise UserError(f"{path}: benchmark format {fmt!r} is not one of {', '.join(FORMATS)}")
    data = (reader or read_local)(path)
    root = image_root if image_root is not None else parent_of(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    parse = _parse_tsv if fmt == "tsv" else _parse_jsonl
    questions, bad = parse(text, path, root, require_answer, text_only)
    if not questions:
        why = f"; first problem: row {bad[0].row}: {bad[0].reason}" if bad else ""
        raise UserError(f"{path}: no usable question in this {fmt} file ({len(bad)} bad rows){why}")
    return BenchmarkFile(path, fmt, tuple(questions), tuple(bad))


def load_images(question: Question, reader: Optional[Reader] = None) -> list[bytes]:
    """A question's images as bytes (paths read through ``reader``)."""
    return [im if isinstance(im, bytes) else (reader or read_local)(im) for im in question.images]


def _format_from_name(path: str) -> str:
    name = path.lower().rsplit("/", 1)[-1]
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    raise UserError(f"{path}: cannot tell the benchmark format from the name; say tsv or jsonl")


# ----------------------------------------------------------------------------- TSV


def _na(value: Optional[str]) -> bool:
    return value is None or value in NA_STRINGS


def _list_or_one(cell: str) -> list[str]:
    """VLMEvalKit ``toliststr``: ``"[...]"`` is a list literal, anything else one item."""
    if len(cell) > 1 and cell[0] == "[" and cell[-1] == "]":
        value = ast.literal_eval(cell)
        if not isinstance(value, (list, tuple)):
            raise ValueError("not a list")
        return [str(x) for x in value]
    return [cell]


def _decode_image(b64: str) -> bytes:
    try:
        raw = base64.b64decode(b64)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image is not valid base64 ({e})") from None
    if not raw.startswith(_MAGIC) or (raw.startswith(b"RIFF") and raw[8:12] != b"WEBP"):
        raise ValueError("image base64 does not decode to a PNG/JPEG/GIF/BMP/WEBP/TIFF image")
    return raw


def _int_or_none(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        try:
            f = float(text)  # pandas writes an int column holding NA as floats: "12.0"
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _answers(cell: Optional[str]) -> tuple[str, ...]:
    if cell is None or cell == "":
        return ()
    if cell.startswith("[") and cell.endswith("]"):
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            return (cell,)
        if isinstance(value, (list, tuple)):
            return tuple(str(x) for x in value)
    return (cell,)


def _parse_tsv(text: str, path: str, root: str, require_answer: bool, text_only: bool = False):
    csv.field_size_limit(sys.maxsize)
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    except csv.Error as e:
        raise UserError(f"{path}: not a readable TSV ({e})") from e
    if not rows:
        raise UserError(f"{path}: empty TSV file")
    header = rows[0]
    cols = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("index", "question") if c not in cols]
    if missing:
        raise UserError(f"{path}: TSV needs columns {missing} (has {header[:12]})")
    if "image" not in cols and "image_path" not in cols:
        raise UserError(f"{path}: TSV needs an 'image' (base64) or 'image_path' column")
    if require_answer and "answer" not in cols:
        raise UserError(f"{path}: TSV has no 'answer' column (a test split without answers cannot be scored)")
    letters = [c for c in header if len(c) == 1 and c in OPTION_LETTERS]
    known = {"index", "image", "image_path", "question", "hint", "answer", "category", "l2-category",
             "split", "g_index", *letters}
    records, bad = [], []
    for r, values in enumerate(rows[1:]):
        if not values or values == [""]:
            continue  # blank line
        if len(values) != len(header):
            bad.append(BadRow(r, values[0] if values else "", f"{len(values)} cells, header has {len(header)}"))
            continue
        records.append((r, dict(zip(header, values))))
    # The image map: index -> base64 cell, references resolved one level (image_base.py).
    cells: dict[str, str] = {}
    for _, rec in records:  # the first row of an index owns it (a duplicate is reported below)
        if "image" in cols:
            cells.setdefault(rec["index"].strip(), rec["image"])
    seen: set[str] = set()
    questions = []
    for r, rec in records:
        index = rec["index"].strip()
        try:
            if not index:
                raise ValueError("empty index")
            if index in seen:
                raise ValueError(f"duplicate index {index!r}")
            seen.add(index)
            questions.append(_tsv_question(r, index, rec, cells, letters, known, root, require_answer, text_only))
        except (ValueError, SyntaxError) as e:
            bad.append(BadRow(r, index, str(e)))
    return questions, sorted(bad, key=lambda b: b.row)


def _tsv_question(r: int, index: str, rec: dict, cells: dict, letters: list[str], known: set,
                  root: str, require_answer: bool, text_only: bool = False) -> Question:
    question = rec["question"]
    if _na(question):
        raise ValueError("empty question")
    image_cell = rec.get("image", "")
    image_key = index
    if "image" in rec and not _na(image_cell):
        if len(image_cell) <= _REF_MAX:
            target = cells.get(image_cell)
            if target is None:
                raise ValueError(f"image refers to index {image_cell!r}, which is not in the file")
            if len(target) <= _REF_MAX:
                raise ValueError(f"image refers to index {image_cell!r}, whose image is itself a reference")
            image_key, image_cell = image_cell, target
        images: tuple[Image, ...] = tuple(_decode_image(b) for b in _list_or_one(image_cell))
    elif not _na(rec.get("image_path")):
        images = tuple(join_path(root, p) for p in _list_or_one(rec["image_path"]))
    elif text_only:
        images, image_key = (), ""
    else:
        raise ValueError("no image (empty 'image' and 'image_path')")
    if not _na(rec.get("image_path")):
        image_key = rec["image_path"]
    options = {c: rec[c] for c in letters if not _na(rec[c])}
    answers = _answers(rec.get("answer"))
    if require_answer and not answers:
        raise ValueError("empty answer")
    if options and answers and answers[0] not in options:
        raise ValueError(f"answer {answers[0]!r} is not one of the options {''.join(options)}")
    g_index = rec.get("g_index", "")
    as_int = _int_or_none(index)
    if not _na(g_index):
        g = _int_or_none(g_index)
        group = str(g) if g is not None else g_index
    else:
        group = str(as_int % _CIRCULAR_OFFSET) if as_int is not None else index
    opt = lambda k: None if _na(rec.get(k)) else rec[k]  # noqa: E731
    return Question(
        id=index, row=r, images=images, question=question, hint=opt("hint"), options=options,
        answers=answers, category=opt("category"), l2_category=opt("l2-category"), split=opt("split"),
        group=group, image_key=image_key, extra={k: v for k, v in rec.items() if k not in known},
    )


# ----------------------------------------------------------------------------- JSONL


def _parse_jsonl(text: str, path: str, root: str, require_answer: bool, text_only: bool = False):
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of the same objects (lmms-eval / Accessory style)
        try:
            objects = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from e
        lines = [(i, obj, None) for i, obj in enumerate(objects)]
    else:
        lines = []
        for i, line in enumerate(x for x in text.splitlines() if x.strip()):
            try:
                lines.append((i, json.loads(line), None))
            except json.JSONDecodeError as e:
                lines.append((i, None, f"not JSON ({e.msg} at column {e.colno})"))
    questions, bad, seen = [], [], set()
    for r, obj, error in lines:
        qid = str(obj.get("question_id", obj.get("id", ""))) if isinstance(obj, dict) else ""
        try:
            if error:
                raise ValueError(error)
            if not isinstance(obj, dict):
                raise ValueError(f"a line is a {type(obj).__name__}, not an object")
            if not qid:
                raise ValueError("no 'question_id'")
            if qid in seen:
                raise ValueError(f"duplicate question_id {qid!r}")
            seen.add(qid)
            questions.append(_jsonl_question(r, qid, obj, root, require_answer, text_only))
        except ValueError as e:
            bad.append(BadRow(r, qid, str(e)))
    return questions, bad


def _jsonl_question(r: int, qid: str, obj: dict, root: str, require_answer: bool, text_only: bool = False) -> Question:
    question = obj.get("text", obj.get("question"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no 'text' or 'question'")
    image = obj.get("image", obj.get("image_path"))
    paths = image if isinstance(image, list) else [image]
    if text_only and image in (None, "", []):
        paths = []
    elif not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError("no 'image' path")
    raw = obj.get("answers", obj.get("answer", obj.get("gt_answers")))
    if isinstance(raw, list):
        answers = tuple(str(a.get("answer", "")) if isinstance(a, dict) else str(a) for a in raw)
    elif raw is None or raw == "":
        answers = ()
    else:
        answers = (str(raw),)
    if require_answer and not answers:
        raise ValueError("no 'answers' or 'answer'")
    options = obj.get("options") or {}
    if isinstance(options, list):
        options = dict(zip(OPTION_LETTERS, options))
    known = {"question_id", "id", "text", "question", "image", "image_path", "answers", "answer", "gt_answers",
             "category", "l2-category", "split", "hint", "options"}
    opt = lambda k: None if obj.get(k) in (None, "") else str(obj[k])  # noqa: E731
    return Question(
        id=qid, row=r, images=tuple(join_path(root, p) for p in paths), question=question,
        hint=opt("hint"), options={str(k): str(v) for k, v in options.items()}, answers=answers,
        category=opt("category"), l2_category=opt("l2-category"), split=opt("split"), group=qid,
        image_key="|".join(paths), extra={k: json.dumps(v) if not isinstance(v, str) else v
                                          for k, v in obj.items() if k not in known},
    )


def tsv_text(rows: list[Mapping[str, Any]]) -> str:
    """Rows -> a VLMEvalKit TSV (the columns of the first row, in order): the demo's and the tests'
    writer. Images go in as base64 text (or an index reference), answer lists as list literals."""
    header = list(rows[0])
    out = io.StringIO()
    w = csv.writer(out, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if row.get(k) is None else (repr(list(row[k])) if isinstance(row[k], (list, tuple))
                                                     else str(row[k])) for k in header])
    return out.getvalue()
