"""Preprocess's accounting: the tiler's bookkeeping rows (``actors.data.tiler.BOOK_SCHEMA``) and
their dedup verdicts (``actors.data.dedup``) -> the manifest's counts, per source and in total.

    >>> tally = Tally()
    >>> errors = tally.add(book, kinds)          # per source, in source order: the quarantined rows
    >>> totals, per_source = tally.counts(spec.data.sources)
    >>> totals.rows_in == totals.rows_written + totals.rows_quarantined
    True

Pure Arrow logic: it runs on the driver of ``pipelines.stages.preprocess``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from actors.data.dedup import DUPLICATE_IMAGE, DUPLICATE_SAMPLE
from actors.data.manifest import Counts, ImageBytes, SourceCounts, Tokens

_SUMMED = ("text_tokens", "image_tokens", "saved_tokens", "source_bytes", "stored_bytes")


class Tally:
    """Counts rows, reasons, duplicates, tokens and image bytes per source; ``add`` returns the
    quarantined rows (one per copy) for ``errors/``."""

    def __init__(self) -> None:
        self.per_source: dict[str, Counter] = defaultdict(Counter)
        self.reasons: dict[str, Counter] = defaultdict(Counter)

    def add(self, book: pa.Table, kind: np.ndarray) -> pa.Table:
        cols = book.select(["source", "copies", "reason", "truncated", *_SUMMED, "reused"]).to_pylist()
        idx_bad = []
        for i, r in enumerate(cols):
            c = self.per_source[r["source"]]
            c["rows_read"] += 1
            c["rows_reused"] += bool(r["reused"])
            n = r["copies"]
            if n == 0:
                c["subsampled_out"] += 1
            elif kind[i] == DUPLICATE_SAMPLE:
                c["duplicate_samples"] += 1
            elif kind[i] == DUPLICATE_IMAGE:
                c["duplicate_images"] += 1
            elif r["reason"]:
                c["rows_in"] += n
                c["rows_quarantined"] += n
                self.reasons[r["source"]][r["reason"]] += n
                idx_bad += [i] * n
            else:
                c["rows_in"] += n
                c["rows_written"] += n
                c["rows_truncated"] += n * bool(r["truncated"])
                for k in _SUMMED:
                    c[k] += n * (r[k] or 0)
        return take(book, idx_bad)

    def counts(self, sources: list[Any], mix: Optional[dict[str, dict[str, Any]]] = None,
               ) -> tuple[Counts, dict[str, SourceCounts]]:
        """(the totals, per source in ``sources`` order); ``sources``: the spec's (``name``,
        ``ratio``, ``dedup``); ``mix``: per source name, its ``SourceCounts`` mix fields (``layout``,
        ``prompt``, ``prompt_templates``, ``weight``, ``epochs``)."""
        per = {s.name: SourceCounts(**self._counts(self.per_source[s.name], self.reasons[s.name]),
                                    **{k: int(self.per_source[s.name][k]) for k in _SUMMED},
                                    ratio=s.ratio, dedup=s.dedup, **(mix or {}).get(s.name, {}))
               for s in sources}
        return Counts(**self._counts(self._total(), sum(self.reasons.values(), Counter()))), per

    def rows_reused(self) -> int:
        return int(self._total()["rows_reused"])

    def tokens(self) -> Tokens:
        t = self._total()
        return Tokens(text=int(t["text_tokens"]), image=int(t["image_tokens"]), saved=int(t["saved_tokens"]))

    def image_bytes(self, codec: str) -> ImageBytes:
        t = self._total()
        return ImageBytes(source=int(t["source_bytes"]), stored=int(t["stored_bytes"]), codec=codec)

    def _total(self) -> Counter:
        return sum(self.per_source.values(), Counter())

    @staticmethod
    def _counts(c: Counter, reasons: Counter) -> dict[str, Any]:
        return {**{k: int(c[k]) for k in Counts.ROW_COUNTS}, "quarantined_by_reason": dict(sorted(reasons.items()))}


def take(batch: pa.Table, idx: list[int]) -> pa.Table:
    """Rows ``idx`` of ``batch`` (no copy in the common case: every row once, in order)."""
    if len(idx) == batch.num_rows and idx == list(range(batch.num_rows)):
        return batch
    return batch.take(pa.array(idx, pa.int64()))
