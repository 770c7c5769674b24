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

Before (one JSONL line of source ``vqa`` with ``image_root: s3://b/img``)::

    {"id": "7", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, ...]}

After::

    {source: "vqa", id: "7", copies: 1, conversations: '[{"from": "human", ...}]',
     image_paths: ["b/img/a.jpg"], image_bytes: [], reason: None, stage: None, detail: None}

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
from typing import Any, Iterable, Optional

import pyarrow as pa

from models.conversation import IMAGE

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
])

ROLES = {"human", "gpt"}
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
            reason: Optional[str] = None, detail: Optional[str] = None) -> dict:
    """One raw row; ``conversations`` is stored as JSON text (the raw text when invalid)."""
    text = conversations if isinstance(conversations, str) else json.dumps(conversations, ensure_ascii=False)
    return {
        "source": source, "id": row_id, "copies": copies_for(ratio, f"{source}:{row_id}"),
        "conversations": text, "image_paths": list(image_paths), "image_bytes": list(image_bytes),
        "reason": reason, "stage": "parse" if reason else None,
        "detail": detail[:_DETAIL_MAX] if detail else None,
    }


def join_path(root: Optional[str], rel: str) -> str:
    """``image_root`` + a record's relative image path (absolute paths are kept)."""
    if not root or rel.startswith("/") or "://" in rel:
        return rel
    return root.rstrip("/") + "/" + (rel[2:] if rel.startswith("./") else rel)


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


def _record_row(source: str, record: Any, fallback_id: str, ratio: float, image_root: Optional[str]) -> dict:
    reason, detail, conv, images = validate_record(record)
    row_id = record_id(record, fallback_id)
    if reason:
        return raw_row(source, row_id, ratio, conversations=conv or record, reason=reason, detail=detail)
    return raw_row(source, row_id, ratio, conversations=conv, image_paths=[join_path(image_root, p) for p in images])


# ----------------------------------------------------------------------------- JSON / JSONL


def parse_json_file(data: bytes, path: str, *, source: str, ratio: float, image_root: Optional[str],
                    fmt: str = "auto", file_no: Optional[int] = None) -> list[dict]:
    """A JSON array or JSONL file -> raw rows, one per record (bad lines become quarantined rows).

    A JSON array that does not parse at all becomes ONE ``invalid_json`` row (id
    ``source:file``) since its records cannot be told apart.
    """
    prefix = source if file_no is None else f"{source}:{file_no}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return [raw_row(source, f"{prefix}:file", ratio, conversations="", reason="invalid_json",
                        detail=f"{path}: not UTF-8 text: {err}")]
    if fmt == "auto":
        fmt = "jsonl" if path.endswith(".jsonl") else ("json" if text.lstrip().startswith("[") else "jsonl")
    if fmt == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            return [raw_row(source, f"{prefix}:file", ratio, conversations=text[:_DETAIL_MAX], reason="invalid_json",
                            detail=f"{path}: {err}")]
        if not isinstance(records, list):
            records = [records]
        return [_record_row(source, r, f"{prefix}:{i}", ratio, image_root) for i, r in enumerate(records)]
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append(raw_row(source, f"{prefix}:{i}", ratio, conversations=line[:_DETAIL_MAX],
                                reason="invalid_json", detail=f"{path} line {i + 1}: {err}"))
            continue
        rows.append(_record_row(source, record, f"{prefix}:{i}", ratio, image_root))
    return rows


# ----------------------------------------------------------------------------- WebDataset

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def wds_row(sample: dict, *, source: str, ratio: float) -> dict:
    """One WebDataset sample (``decoder=None``: bytes per extension) -> a raw row.

    Columns used: ``__key__``; ``json`` (a record with ``conversations``) or ``txt`` (a
    caption: becomes ``<image>\\nDescribe the image briefly.`` / caption); one of
    ``jpg|jpeg|png|webp`` (the image bytes; none = a text-only sample).
    """
    key = str(sample.get("__key__") or "")
    row_id = f"{source}:{key}"
    sample = {k: _blob(v) for k, v in sample.items()}  # a batch fills absent extensions with None/NaN
    image = next((sample[k] for k in WDS_IMAGE_KEYS if sample.get(k) is not None), None)
    images = [image] if image is not None else []
    if sample.get("json") is not None:
        try:
            record = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return raw_row(source, row_id, ratio, conversations="", reason="invalid_json", detail=f"{key}.json: {err}")
        row_id = record_id(record, row_id)
        if isinstance(record, dict) and images:
            record = {**record, "image": "<bytes>"}
        reason, detail, conv, _ = validate_record(record)
    elif sample.get("txt") is not None:
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
        conv = [{"from": "human", "value": "<image>\nDescribe the image briefly." if images else "Continue."},
                {"from": "gpt", "value": caption}]
        reason, detail = (None, "") if caption else ("bad_field", f"{key}.txt is empty")
    else:
        reason, detail, conv = "bad_field", f"sample {key!r} has neither .json nor .txt", []
    if reason:
        return raw_row(source, row_id, ratio, conversations=conv, reason=reason, detail=detail)
    return raw_row(source, row_id, ratio, conversations=conv, image_bytes=images)


def _blob(value: Any) -> Optional[bytes]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value.encode() if isinstance(value, str) else None


# ----------------------------------------------------------------------------- Parquet


def parquet_row(rec: dict, *, source: str, ratio: float) -> dict:
    """One Parquet row -> a raw row.

    Columns: ``conversations`` (JSON text, or a list of ``{from, value}`` structs), ``image``
    (binary bytes, or a struct with ``bytes`` as Hugging Face datasets store images; null =
    text-only), ``id`` (optional).
    """
    conv = rec.get("conversations")
    image = rec.get("image")
    if isinstance(image, dict):
        image = image.get("bytes")
    images = [bytes(image)] if image is not None else []
    if isinstance(conv, (bytes, str)):
        text = conv.decode("utf-8", errors="replace") if isinstance(conv, bytes) else conv
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        try:
            conv = json.loads(text)
        except json.JSONDecodeError as err:
            return raw_row(source, record_id(rec, f"{source}:{digest}"), ratio, conversations=text[:_DETAIL_MAX],
                           reason="invalid_json", detail=f"conversations: {err}")
    else:
        digest = hashlib.sha1(json.dumps(conv, sort_keys=True, default=str).encode()).hexdigest()[:16]
    record = {"conversations": conv}
    if images:
        record["image"] = "<bytes>"
    reason, detail, conv, _ = validate_record(record)
    row_id = record_id(rec, f"{source}:{digest}")
    if reason:
        return raw_row(source, row_id, ratio, conversations=conv or record, reason=reason, detail=detail)
    return raw_row(source, row_id, ratio, conversations=conv, image_bytes=images)


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
