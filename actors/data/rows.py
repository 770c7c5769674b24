"""Source records -> uniform *raw rows*: the first stage of the preprocess graph.

Every source format becomes the same row, so the tiling stage (``actors.data.tiler``) and the
shard writer never see the format again:

| column | type | meaning |
|---|---|---|
| ``source`` | string | the source's name (spec ``data.sources[].name``) |
| ``id`` | string | the record's ``id``, else generated (see below) |
| ``copies`` | int32 | how often the row is written (ratio; 0 = subsampled out) |
| ``conversations`` | string | the ``conversations`` list as JSON text |
| ``image_paths`` | list<string> | full image paths (JSON sources), else empty |
| ``image_bytes`` | list<binary> | image bytes (WebDataset / Parquet sources), else empty |
| ``reason``, ``stage``, ``detail`` | string | null while the row is good; set once it is quarantined |
| ``boxes`` | string | region rows: JSON ``[[image, x1, y1, x2, y2], ...]`` in pixels, named ``<box:k>`` in the text; else null |

Before (one JSONL line of source ``vqa`` with ``image_root: s3://b/img``)::

    {"id": "7", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, ...]}

After::

    {source: "vqa", id: "7", copies: 1, conversations: '[{"from": "human", ...}]',
     image_paths: ["b/img/a.jpg"], image_bytes: [], reason: None, stage: None, detail: None}

Image references (JSON sources) resolve inside the source's ``image_root`` or the spec's
``allowed_image_prefixes`` (:func:`resolve_image`): an absolute path, a ``../`` that climbs out,
another bucket or ``/dev/zero`` is quarantined as ``outside_root`` here, before anything is read.

Hostile input never aborts the stage: a JSONL line that is not UTF-8 or not JSON loses that line
only (``invalid_text`` / ``invalid_json``, with its line number); a JSON array that breaks off
loses the broken record and, when its end cannot be found, the unreadable remainder as ONE
``invalid_json`` row; lone surrogates are ``invalid_text``, nesting deeper than Python's recursion
limit ``too_deep``, integers over 4300 digits ``invalid_number``; anything else a record raises is
``unexpected_error`` with the exception type (docs/security.md lists what was tried).

Boxes: a ``llava`` record (JSON / JSONL, a WebDataset ``.json``, a Parquet ``boxes`` column of lists
or JSON text) may carry ``"boxes": [[image, x1, y1, x2, y2], ...]`` in pixels of its images, named
in its text by ``<box:k>`` slots, as the region layouts' samples do (:func:`record_boxes`)::

    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhere is the red square?"},
     {"from": "gpt", "value": "<box:0>"}], "boxes": [[0, 40.5, 12.25, 98.0, 69.75]]}
    -> boxes: '[[0, 40.5, 12.25, 98.0, 69.75]]' (the tiler writes the slot as ``[x1,y1,x2,y2]``)

Layouts (``data.sources[].layout``, ``actors.data.layouts``): ``llava`` records are read as above;
any other layout turns a record (or, for annotation files, the whole file) into samples first, and
each sample becomes a row here: its images resolved like a record's, its bad records quarantined
with the layout's reason, a leading ``system`` turn kept as the conversation's first turn.

Ids: a record's ``id`` (string or int) is kept; otherwise ``source:index`` (index of the
record in its file; ``source:file_no:index`` when the source has several files; WebDataset
rows use ``source:__key__``, Parquet rows without ``id`` a content hash ``source:sha1``).

Ratio (deterministic, streaming): ``copies = floor(ratio) + (u < frac(ratio))`` with ``u`` in
[0, 1) from a SHA-1 of ``source:id``. So 0.3 keeps ~30 % of rows, 2.5 writes every row twice
and half of them three times. Each copy counts as a row in (``rows_in``), so
``rows_in == rows_written + rows_quarantined`` holds copy by copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa

from actors.data.json_records import Broken, array_items, error_detail, quarantine_reason
from actors.data.layouts import Context, Reading, Rejected, Sample
from actors.data.layouts import get as get_layout
from actors.data.regions import check_boxes
from cluster.location import Location
from models.conversation import IMAGE
from models.errors import UserError

RAW_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("id", pa.string()),
    ("copies", pa.int32()),
    ("conversations", pa.string()),
    ("image_paths", pa.list_(pa.string())),
    ("image_bytes", pa.list_(pa.binary())),
    ("reason", pa.string()),
    ("stage", pa.string()),
    ("detail", pa.string()),
    ("boxes", pa.string()),
])

ROLES = {"human", "gpt"}
SYSTEM_ROLE = "system"  # a layout's leading turn: the conversation's system prompt (actors.data.tiler)
_REJECTED_MAX = 2000  # characters of a rejected record kept in errors/
IMAGE_PLACEHOLDER = IMAGE
_DETAIL_MAX = 300


def copies_for(ratio: float, key: str) -> int:
    """How many times the row keyed ``key`` is written under ``ratio`` (deterministic)."""
    base = math.floor(ratio)
    frac = ratio - base
    if frac <= 0:
        return int(base)
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64
    return int(base) + (1 if u < frac else 0)


def raw_row(source: str, row_id: str, ratio: float, *, conversations: Any = None,
            image_paths: Iterable[str] = (), image_bytes: Iterable[bytes] = (),
            reason: Optional[str] = None, detail: Optional[str] = None, boxes: Optional[list] = None) -> dict:
    """One raw row; ``conversations`` is stored as JSON text (the raw text when invalid).

    A good row whose id, conversations or image paths are not valid Unicode (a lone surrogate,
    from a ``\\ud800`` escape or a byte that is not UTF-8) becomes an ``invalid_text`` row; a
    quarantined row's strings are escaped so that it always fits ``RAW_SCHEMA``."""
    try:
        text = conversations if isinstance(conversations, str) else json.dumps(conversations, ensure_ascii=False)
    except (ValueError, RecursionError, TypeError) as err:
        text = f"<not serialisable: {type(err).__name__}>"
        if reason is None:
            reason, detail = quarantine_reason(err), error_detail("conversations", err)
    paths = list(image_paths)
    if reason is None and not all(_is_unicode(t) for t in (source, row_id, text, *paths)):
        reason, detail = "invalid_text", "a string holds a lone surrogate or a byte that is not UTF-8"
    if reason:
        source, row_id, text, paths = _text(source), _text(row_id), _text(text), [_text(p) for p in paths]
    return {
        "source": source, "id": row_id, "copies": copies_for(ratio, f"{source}:{row_id}"),
        "conversations": text, "image_paths": paths, "image_bytes": list(image_bytes),
        "reason": reason, "stage": "parse" if reason else None,
        "detail": _text(detail[:_DETAIL_MAX]) if detail else None,
        "boxes": json.dumps(boxes) if boxes and not reason else None,
    }


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _text(text: str) -> str:
    """``text`` with lone surrogates escaped (``\\udc80``): Arrow strings must be UTF-8."""
    return text if _is_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


# ----------------------------------------------------------------------------- image references


def resolve_image(ref: str, root: str, allowed: Sequence[str] = ()) -> tuple[Optional[str], Optional[str], str]:
    """A record's image reference -> ``(uri, None, "")``, or ``(None, reason, detail)``.

    A relative ``ref`` is joined to ``root`` (``./`` and ``..`` are resolved; a ``..`` above the
    bucket or ``/`` leaves); an ``s3://`` URI or an absolute / ``~`` path is taken as it is. The
    result must lie inside one of ``allowed`` (default: ``root`` alone), component-wise, else the
    reason is ``outside_root``; a URL of another scheme is ``unsupported_image_uri``.

        >>> resolve_image("a/../b.jpg", "s3://bk/img")
        ('s3://bk/img/b.jpg', None, '')
        >>> resolve_image("../x.jpg", "s3://bk/img")[1], resolve_image("/dev/zero", "s3://bk/img")[1]
        ('outside_root', 'outside_root')
        >>> resolve_image("s3://bk/other/x.jpg", "s3://bk/img", ["s3://bk/img", "s3://bk/other"])[0]
        's3://bk/other/x.jpg'
    """
    if "://" in ref and not ref.startswith("s3://"):
        return None, "unsupported_image_uri", f"{ref}: preprocess reads images from s3:// or local paths only " \
                                              "(no URL fetches)"
    prefixes = tuple(allowed) or (root,)
    try:
        base = Location.parse(root)
        if ref.startswith("s3://") or os.path.isabs(ref) or ref.startswith("~"):
            loc = Location.parse(ref)
        elif base.is_s3:
            key = posixpath.normpath(posixpath.join(base.key, ref))
            if key == ".." or key.startswith("../"):
                raise UserError(f"it climbs above the bucket root s3://{base.bucket}")
            loc = Location(base.bucket, "" if key == "." else key)
        else:
            loc = Location(None, os.path.normpath(os.path.join(base.key, ref)))
        if any(loc.is_under(Location.parse(p)) for p in prefixes):
            return loc.uri, None, ""
    except (UserError, ValueError) as err:
        return None, "outside_root", f"image {ref!r:.120}: {err}"
    return None, "outside_root", f"image {ref!r:.120} resolves to {loc.uri[:120]}, outside {', '.join(prefixes)} " \
                                 "(data.sources[].image_root / allowed_image_prefixes)"


def validate_record(record: Any) -> tuple[Optional[str], str, list, list[str]]:
    """Check a SPHINX/LLaVA record. Returns (reason or None, detail, conversations, images).

    Reasons: ``bad_field`` (not an object, missing / non-list ``conversations``, a turn that
    is not ``{"from": str, "value": str}``, a non-string ``image``), ``unknown_role`` (``from``
    not human/gpt), ``image_mismatch`` (``<image>`` placeholders that do not match the
    images: a placeholder without an image, or several placeholders for fewer images).
    """
    if not isinstance(record, dict):
        return "bad_field", f"record is a {type(record).__name__}, not an object", [], []
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        what = "missing" if conv is None else f"a {type(conv).__name__}" if not isinstance(conv, list) else "empty"
        return "bad_field", f"'conversations' is {what}; expected a non-empty list of turns", [], []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return "bad_field", f"conversations[{i}] is a {type(turn).__name__}, not an object", conv, []
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                got = "missing" if key not in turn else f"a {type(turn[key]).__name__}"
                return "bad_field", f"conversations[{i}].{key} is {got}; expected a string", conv, []
        if turn["from"] not in ROLES:
            return "unknown_role", f"conversations[{i}].from is {turn['from']!r}; expected one of {sorted(ROLES)}", conv, []
    image = record.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str) and image:
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        images = list(image)
    else:
        return "bad_field", f"'image' is {image!r:.80}; expected a path or a list of paths", conv, []
    reason, detail = check_placeholders(conv, len(images))
    return reason, detail, conv, images


def check_placeholders(conversations: list, n_images: int) -> tuple[Optional[str], str]:
    """``image_mismatch`` when the ``<image>`` placeholders cannot be matched to the images."""
    n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations)
    if n_ph and n_ph != n_images:
        return "image_mismatch", f"{n_ph} <image> placeholder(s) but {n_images} image(s)"
    return None, ""  # no placeholder: models.conversation puts the images at the start of turn 1


def record_id(record: Any, fallback: str) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else fallback


def record_boxes(record: dict, conversations: list, n_images: int) -> tuple[Optional[str], str, Optional[list]]:
    """A valid record's optional ``boxes`` -> ``(None, "", boxes or None)``, or ``("bad_box", detail, None)``.

    ``boxes`` is ``[[image, x1, y1, x2, y2], ...]`` in pixels of the record's images, named in its
    text by ``<box:k>`` slots (the region layouts' convention, ``actors.data.layouts.base``); the
    tiler writes each slot as SPHINX's box text in the flavour's canvas frame. Refused here: a
    malformed or empty box, a box of an image the record does not have (a region without an
    image), a slot naming no box (``actors.data.regions.check_boxes``); a box outside its image
    is refused by the tiler, which knows the image's size (stage ``boxes``)."""
    boxes = record.get("boxes")
    detail = check_boxes(conversations, boxes, n_images)
    if detail:
        return "bad_box", detail, None
    return None, "", [list(b) for b in boxes] if boxes else None


def _record_row(source: str, record: Any, fallback_id: str, ratio: float, image_root: Optional[str],
                allowed: Sequence[str] = ()) -> dict:
    reason, detail, conv, images = validate_record(record)
    row_id = record_id(record, fallback_id)
    if not reason:
        reason, detail, boxes = record_boxes(record, conv, len(images))
    if reason:
        return raw_row(source, row_id, ratio, conversations=conv or record, reason=reason, detail=detail)
    paths = []
    for ref in images:
        if image_root is None:  # the tokenizer's text pass: images are never read
            paths.append(ref)
            continue
        uri, reason, detail = resolve_image(ref, image_root, allowed)
        if reason:
            return raw_row(source, row_id, ratio, conversations=conv, reason=reason, detail=detail)
        paths.append(uri)
    return raw_row(source, row_id, ratio, conversations=conv, image_paths=paths, boxes=boxes)


def _guarded_row(source: str, row_id: str, ratio: float, where: str, raw_text: str, build) -> dict:
    """``build()``, or the row quarantined with the reason of what it raised (the per-row boundary)."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - one record never aborts the stage
        return raw_row(source, row_id, ratio, conversations=raw_text[:_DETAIL_MAX], reason=quarantine_reason(err),
                       detail=error_detail(where, err))


# ----------------------------------------------------------------------------- layouts


def check_turns(conversations: list, n_images: int) -> tuple[Optional[str], str]:
    """A layout's turns: an optional leading ``system`` turn, then ``human`` / ``gpt`` turns of
    strings, ``<image>`` placeholders that match the images."""
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "bad_field", f"turn {i} has no text"
        if turn.get("from") not in ROLES and not (i == 0 and turn.get("from") == SYSTEM_ROLE):
            return "unknown_role", f"turn {i} has role {turn.get('from')!r}"
    if not any(t["from"] != SYSTEM_ROLE for t in conversations):
        return "bad_field", "no human or gpt turn"
    return check_placeholders(conversations, n_images)


def _clip(raw: Any) -> str:
    """A rejected record as short JSON text for ``errors/``."""
    try:
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError, TypeError):
        text = repr(type(raw))
    return text[:_REJECTED_MAX]


def _sample_row(source: str, item: Any, ratio: float, image_root: Optional[str], allowed: Sequence[str]) -> dict:
    """A layout's :class:`Sample` or :class:`Rejected` -> a raw row (images resolved as a record's)."""
    if isinstance(item, Rejected):
        return raw_row(source, item.id, ratio, conversations=_clip(item.raw), reason=item.reason, detail=item.detail)
    conv = item.conversations
    reason, detail = check_turns(conv, len(item.images))
    if reason:
        return raw_row(source, item.id, ratio, conversations=conv, reason=reason, detail=detail)
    paths, blobs = [], []
    for ref in item.images:
        if isinstance(ref, bytes):
            blobs.append(ref)
        elif image_root is None:  # the tokenizer's text pass: images are never read
            paths.append(ref)
        else:
            uri, reason, detail = resolve_image(ref, image_root, allowed)
            if reason:
                return raw_row(source, item.id, ratio, conversations=conv, reason=reason, detail=detail)
            paths.append(uri)
    if paths and blobs:
        return raw_row(source, item.id, ratio, conversations=conv, reason="bad_field",
                       detail="a sample mixes image paths and inline image bytes")
    return raw_row(source, item.id, 0.0 if item.left_out else ratio, conversations=conv, image_paths=paths,
                   image_bytes=blobs, boxes=[list(b) for b in item.boxes] or None)


def layout_rows(data: Any, index: int, *, source: str, ratio: float, reading: Reading, image_root: Optional[str],
                allowed: Sequence[str] = (), side: Any = None, prefix: str = "", where: str = "") -> list[dict]:
    """One record (record layouts) or one whole document (annotation layouts) -> raw rows.

    A layout that raises part-way loses the rest of what it was reading as ONE row (id
    ``prefix:index``, or ``prefix:file`` for a document) with the reason of what it raised."""
    layout = get_layout(reading.layout)
    ctx = Context(source, layout, reading, side, prefix or source)
    rows: list[dict] = []
    try:
        for item in layout.read(data, index, ctx):
            rows.append(_guarded_row(source, item.id, ratio, where, "",
                                     lambda: _sample_row(source, item, ratio, image_root, allowed)))
    except Exception as err:  # noqa: BLE001 - a record (or document) never aborts the stage
        rid = f"{ctx.prefix}:file" if layout.document else ctx.fallback(index)
        rows.append(raw_row(source, rid, ratio, conversations=_clip(data if not layout.document else ""),
                            reason=quarantine_reason(err), detail=error_detail(where, err)))
    return rows


def _document_rows(data: bytes, path: str, *, source: str, ratio: float, reading: Reading,
                   image_root: Optional[str], allowed: Sequence[str], side: Any, prefix: str) -> list[dict]:
    """An annotation file (one JSON document, or RefCOCO's refs pickle) -> raw rows; a file that
    does not decode is ONE ``invalid_json`` row (``prefix:file``)."""
    try:
        doc = get_layout(reading.layout).decode(data)
    except Exception as err:  # noqa: BLE001 - the file is lost as one row, the other files are read
        return [raw_row(source, f"{prefix}:file", ratio, conversations=data[:_DETAIL_MAX].decode("utf-8", "replace"),
                        reason=quarantine_reason(err), detail=error_detail(path, err))]
    return layout_rows(doc, 0, source=source, ratio=ratio, reading=reading, image_root=image_root, allowed=allowed,
                       side=side, prefix=prefix, where=path)


# ----------------------------------------------------------------------------- JSON / JSONL


def parse_json_file(data: bytes, path: str, *, source: str, ratio: float, image_root: Optional[str],
                    fmt: str = "auto", file_no: Optional[int] = None,
                    image_prefixes: Sequence[str] = (), reading: Reading = Reading(), side: Any = None) -> list[dict]:
    """A JSON array or JSONL file -> raw rows, one per record (bad records become quarantined rows).

    ``image_root`` None keeps image references as given (the tokenizer's text pass, which reads
    no image); else they must resolve inside ``image_prefixes`` (default ``image_root``).
    A JSONL line is decoded on its own (``line N`` in the detail). A JSON array is read record by
    record when it does not parse whole: a record that fails is lost alone, and when its end
    cannot be found (a file cut short) the rest of the file becomes ONE ``invalid_json`` row
    (id ``source:file``) naming the byte offset and line where reading stopped.

    ``reading`` names the source's layout (``actors.data.layouts``): a record layout reads each
    record as above; an annotation layout reads the file as one document (``side``: its parsed
    annotations file).
    """
    prefix = source if file_no is None else f"{source}:{file_no}"
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte order mark
    layout = None if reading.layout == "llava" else get_layout(reading.layout)
    if layout is not None and layout.document:
        return _document_rows(data, path, source=source, ratio=ratio, reading=reading, image_root=image_root,
                              allowed=image_prefixes, side=side, prefix=prefix)
    if fmt == "auto":
        fmt = "jsonl" if path.endswith(".jsonl") else ("json" if data.lstrip()[:1] == b"[" else "jsonl")

    def record(rec: Any, i: int, raw_text: str, where: str) -> list[dict]:
        if layout is not None:
            return layout_rows(rec, i, source=source, ratio=ratio, reading=reading, image_root=image_root,
                               allowed=image_prefixes, prefix=prefix, where=where)
        return [_guarded_row(source, f"{prefix}:{i}", ratio, where, raw_text,
                             lambda: _record_row(source, rec, f"{prefix}:{i}", ratio, image_root, image_prefixes))]

    if fmt == "json":
        rows = []
        for i, item in enumerate(array_items(data)):
            if isinstance(item, Broken):
                row_id = f"{prefix}:file" if item.rest else f"{prefix}:{i}"
                rows.append(raw_row(source, row_id, ratio, conversations=item.text[:_DETAIL_MAX],
                                    reason=item.reason, detail=f"{path}: {item.detail}"))
            else:
                rows += record(item, i, "", f"{path} record {i}")
        return rows
    rows = []
    for i, line_bytes in enumerate(data.split(b"\n")):
        if not line_bytes.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            line = line_bytes.decode("utf-8").rstrip("\r")
            rec = json.loads(line)
        except Exception as err:  # noqa: BLE001 - this line is lost, the others are read
            text = line_bytes.decode("utf-8", "backslashreplace")[:_DETAIL_MAX]
            rows.append(raw_row(source, f"{prefix}:{i}", ratio, conversations=text, reason=quarantine_reason(err),
                                detail=error_detail(where, err)))
            continue
        rows += record(rec, i, line[:_DETAIL_MAX], where)
    return rows


# ----------------------------------------------------------------------------- WebDataset

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def wds_row(sample: dict, *, source: str, ratio: float) -> dict:
    """One WebDataset sample (``decoder=None``: bytes per extension) -> a raw row.

    Columns used: ``__key__``; ``json`` (a record with ``conversations``, optional ``boxes``) or ``txt`` (a
    caption: becomes ``<image>\\nDescribe the image briefly.`` / caption); one of
    ``jpg|jpeg|png|webp`` (the image bytes; none = a text-only sample).
    """
    key = str(sample.get("__key__") or "")
    return _guarded_row(source, f"{source}:{key}", ratio, f"sample {key!r}", "",
                        lambda: _wds_row(sample, key, source=source, ratio=ratio))


def _wds_row(sample: dict, key: str, *, source: str, ratio: float) -> dict:
    row_id, boxes = f"{source}:{key}", None
    sample = {k: _blob(v) for k, v in sample.items()}  # a batch fills absent extensions with None/NaN
    image = next((sample[k] for k in WDS_IMAGE_KEYS if sample.get(k) is not None), None)
    images = [image] if image is not None else []
    if sample.get("json") is not None:
        try:
            record = json.loads(sample["json"].decode("utf-8"))
        except (ValueError, RecursionError) as err:
            return raw_row(source, row_id, ratio, conversations="", reason=quarantine_reason(err),
                           detail=error_detail(f"{key}.json", err))
        row_id = record_id(record, row_id)
        if isinstance(record, dict) and images:
            record = {**record, "image": "<bytes>"}
        reason, detail, conv, _ = validate_record(record)
        if not reason:
            reason, detail, boxes = record_boxes(record, conv, len(images))
    elif sample.get("txt") is not None:
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
        conv = [{"from": "human", "value": "<image>\nDescribe the image briefly." if images else "Continue."},
                {"from": "gpt", "value": caption}]
        reason, detail = (None, "") if caption else ("bad_field", f"{key}.txt is empty")
    else:
        reason, detail, conv = "bad_field", f"sample {key!r} has neither .json nor .txt", []
    if reason:
        return raw_row(source, row_id, ratio, conversations=conv, reason=reason, detail=detail)
    return raw_row(source, row_id, ratio, conversations=conv, image_bytes=images, boxes=boxes)


def _blob(value: Any) -> Optional[bytes]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value.encode() if isinstance(value, str) else None


# ----------------------------------------------------------------------------- Parquet


def parquet_rows(rec: dict, index: int, *, source: str, ratio: float, reading: Reading = Reading(),
                 image_root: Optional[str] = None, image_prefixes: Sequence[str] = ()) -> list[dict]:
    """One Parquet row -> raw rows: the llava layout's :func:`parquet_row`, or a record layout's
    samples (``index``: the row's place in its file, for ids; ``image_root`` resolves image paths)."""
    if reading.layout == "llava":
        return [parquet_row(rec, source=source, ratio=ratio)]
    # ids of rows without one: a content hash (row numbers restart with every batch)
    digest = hashlib.sha1(_dumps_sorted(rec).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return layout_rows(rec, 0, source=source, ratio=ratio, reading=reading, image_root=image_root,
                       allowed=image_prefixes, prefix=f"{source}:{digest}", where=f"parquet row {index}")


def parquet_row(rec: dict, *, source: str, ratio: float) -> dict:
    """One Parquet row -> a raw row.

    Columns: ``conversations`` (JSON text, or a list of ``{from, value}`` structs), ``image``
    (binary bytes, or a struct with ``bytes`` as Hugging Face datasets store images; null =
    text-only; any other type is ``bad_field``), ``id`` (optional), ``boxes`` (optional: lists
    ``[image, x1, y1, x2, y2]`` or their JSON text, :func:`record_boxes`).
    """
    return _guarded_row(source, record_id(rec, f"{source}:row"), ratio, "parquet row", "",
                        lambda: _parquet_row(rec, source=source, ratio=ratio))


def _parquet_row(rec: dict, *, source: str, ratio: float) -> dict:
    conv = rec.get("conversations")
    image, problem = _image_bytes(rec.get("image"))
    images = [image] if image is not None else []
    if isinstance(conv, (bytes, str)):
        text = conv.decode("utf-8", errors="replace") if isinstance(conv, bytes) else conv
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        try:
            conv = json.loads(text)
        except (ValueError, RecursionError) as err:
            return raw_row(source, record_id(rec, f"{source}:{digest}"), ratio, conversations=text[:_DETAIL_MAX],
                           reason=quarantine_reason(err), detail=error_detail("conversations", err))
    else:
        digest = hashlib.sha1(_dumps_sorted(conv).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    row_id = record_id(rec, f"{source}:{digest}")
    if problem:
        return raw_row(source, row_id, ratio, conversations=conv, reason="bad_field", detail=problem)
    record = {"conversations": conv}
    if images:
        record["image"] = "<bytes>"
    reason, detail, conv, _ = validate_record(record)
    if not reason:
        reason, detail, boxes = record_boxes(_boxes_decoded(rec), conv, len(images))
    if reason:
        return raw_row(source, row_id, ratio, conversations=conv or record, reason=reason, detail=detail)
    return raw_row(source, row_id, ratio, conversations=conv, image_bytes=images, boxes=boxes)


def _boxes_decoded(rec: dict) -> dict:
    """A Parquet row whose ``boxes`` is JSON text, with that text parsed (left as it is when it
    does not parse: :func:`record_boxes` names the problem)."""
    text = rec.get("boxes")
    if isinstance(text, (str, bytes)):
        try:
            return {**rec, "boxes": json.loads(text)}
        except (ValueError, RecursionError):
            pass
    return rec


def _image_bytes(value: Any) -> tuple[Optional[bytes], str]:
    """A Parquet ``image`` cell -> (bytes or None, the problem when it is of another type)."""
    if isinstance(value, dict):
        if value.get("bytes") is None:
            return None, f"'image' is a struct without bytes (keys {sorted(value)[:5]}); expected inline bytes"
        value = value["bytes"]
    if value is None or isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value) if value is not None else None), ""
    return None, f"'image' is a {type(value).__name__}; expected binary image bytes or {{bytes: binary}}"


def _dumps_sorted(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (ValueError, RecursionError, TypeError):
        return repr(type(value))


def to_table(rows: list[dict]) -> pa.Table:
    """The rows as a ``RAW_SCHEMA`` table; a row Arrow refuses becomes an ``unexpected_error`` row
    instead of failing the batch."""
    try:
        return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    safe = []
    for row in rows:
        try:
            pa.Table.from_pylist([row], schema=RAW_SCHEMA)
            safe.append(row)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as err:
            bad = raw_row(_text(str(row.get("source"))), _text(str(row.get("id"))), 1.0, reason="unexpected_error",
                          detail=error_detail("raw row", err))
            safe.append({**bad, "copies": row["copies"] if isinstance(row.get("copies"), int) else 1})
    return pa.Table.from_pylist(safe, schema=RAW_SCHEMA)
