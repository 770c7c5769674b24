"""actors.data.dedup and actors.data.tally: the driver's dedup verdicts and accounting, on
hand-made bookkeeping rows (no Ray)."""

from __future__ import annotations

import pyarrow as pa

from actors.data.dedup import DUPLICATE_IMAGE, DUPLICATE_SAMPLE, KEEP, duplicates
from actors.data.tally import Tally
from actors.data.tiler import BOOK_SCHEMA


def _book(source: str, rows: list[tuple]) -> pa.Table:
    """rows: (copies, reason, sample_key, image_key)."""
    out = []
    for i, (copies, reason, s_key, i_key) in enumerate(rows):
        out.append({"id": f"{source}:{i}", "source": source, "num_tokens": 10, "text_tokens": 4, "image_tokens": 6,
                    "saved_tokens": 2, "copies": copies, "truncated": False, "reason": reason, "stage": None,
                    "detail": None, "sample_key": s_key, "image_key": i_key, "source_bytes": 100,
                    "stored_bytes": 40, "shard": None, "reused": False})
    return pa.Table.from_pylist(out, schema=BOOK_SCHEMA)


class _Src:
    def __init__(self, name, dedup, ratio=1.0):
        self.name, self.dedup, self.ratio = name, dedup, ratio


def test_duplicates_within_and_across_sources_and_the_counts():
    a = _book("a", [(1, None, "s1", "i1"), (1, None, "s1", "i1"), (0, None, "s2", None),
                    (1, "missing_image", None, None)])
    b = _book("b", [(2, None, "s3", "i1"), (1, None, "s1", "i9"), (1, None, "s4", None)])
    kinds = duplicates([a, b], ["samples", "images"])
    assert kinds[0].tolist() == [KEEP, DUPLICATE_SAMPLE, KEEP, KEEP]
    assert kinds[1].tolist() == [DUPLICATE_IMAGE, DUPLICATE_SAMPLE, KEEP]
    assert duplicates([a], ["off"])[0].tolist() == [KEEP] * 4

    tally = Tally()
    errors = [tally.add(book, kind) for book, kind in zip([a, b], kinds)]
    assert [e.num_rows for e in errors] == [1, 0]
    totals, per = tally.counts([_Src("a", "samples"), _Src("b", "images")])
    assert (totals.rows_read, totals.subsampled_out, totals.duplicate_samples, totals.duplicate_images) == (7, 1, 2, 1)
    assert (totals.rows_in, totals.rows_written, totals.rows_quarantined) == (3, 2, 1)
    assert totals.quarantined_by_reason == {"missing_image": 1} and per["b"].quarantined_by_reason == {}
    assert per["a"].rows_written == 1 and per["b"].rows_written == 1 and per["b"].dedup == "images"
    assert tally.tokens().total == 20 and tally.image_bytes("webp").stored == 80
