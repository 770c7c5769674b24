"""What curating one input gives back, and the resumable block of inputs (one Ray Data task).

An :class:`Outcome` is one curated sample (LLaVA records + the image files they name) or one
quarantined input (``reason`` + ``detail``), plus counts (``regions_small``: 2, ...). A block
runs a worker function over its items, writes their images, then ``_blocks/<key>.jsonl`` last
(one JSON line per outcome, without image bytes): a block whose file is there is finished, and a
rerun reads it back instead of redoing the work (:func:`run_block`).

Block line (before the driver assembles ``data.jsonl``)::

    {"id": "coco:42", "records": [{"id": "coco:42", "image": "images/coco-42-<hash>.png", "conversations": [...]}],
     "reason": null, "detail": "", "counts": {"regions_marked": 3}, "key": null, "preview": {...}}
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from cluster.layout import join
from cluster.storage import Storage


@dataclass
class Outcome:
    id: str
    records: list[dict] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # path relative to the output dir -> bytes
    reason: Optional[str] = None
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    key: Optional[str] = None  # content hash for the driver's duplicate filter (OCR pages)
    preview: dict[str, Any] = field(default_factory=dict)  # what a preview picture draws

    @classmethod
    def quarantined(cls, id: str, reason: str, detail: str, **counts: int) -> "Outcome":
        return cls(id=id, reason=reason, detail=detail[:300], counts=dict(counts))

    def line(self) -> str:
        d = asdict(self)
        d.pop("images")
        return json.dumps(d, ensure_ascii=False)


def image_name(sample_id: str) -> str:
    """``"sub/a b.pdf#2"`` -> ``"images/sub-a-b.pdf-2-<8 hex>.png"``: readable, and unique per id (the
    hash keeps two ids that clean to the same text apart)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", sample_id).strip("-")[:80]
    return f"images/{clean}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}.png"


def run_block(row: dict, *, storage: Storage, out_dir: str, blocks_dir: str,
              work: Callable[[dict], list[Outcome]]) -> dict:
    """One Ray Data row ``{"key", "items"}`` (items: JSON text of a list) -> ``{"key", "outcomes", "reused",
    "seconds"}`` (the block's wall time in its worker).

    Skips the work when ``<blocks_dir>/<key>.jsonl`` exists (a finished block of an earlier run)."""
    t0 = time.perf_counter()
    done = join(blocks_dir, f"{row['key']}.jsonl")
    if storage.exists(done):
        return {"key": row["key"], "outcomes": storage.read_bytes(done).decode().count("\n"), "reused": True,
                "seconds": time.perf_counter() - t0}
    lines = []
    for item in json.loads(row["items"]):
        for outcome in work(item):
            for rel, data in outcome.images.items():
                storage.write_bytes(join(out_dir, rel), data)
            lines.append(outcome.line())
    storage.write_bytes(done, "".join(line + "\n" for line in lines).encode())
    return {"key": row["key"], "outcomes": len(lines), "reused": False, "seconds": time.perf_counter() - t0}


class BlockRunner:
    """:func:`run_block` as a Ray Data actor (``ActorPoolStrategy``): one process per CPU slot
    keeps its imports and configuration for every block it is given."""

    def __init__(self, *, storage: Storage, out_dir: str, blocks_dir: str, work: Callable[[dict], list[Outcome]]):
        self.kwargs = dict(storage=storage, out_dir=out_dir, blocks_dir=blocks_dir, work=work)

    def __call__(self, row: dict) -> dict:
        return run_block(row, **self.kwargs)


def read_block(storage: Storage, blocks_dir: str, key: str) -> list[dict]:
    text = storage.read_bytes(join(blocks_dir, f"{key}.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
