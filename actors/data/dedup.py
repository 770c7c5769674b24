"""Which records preprocess drops as duplicates, from the tiler's bookkeeping rows (driver side,
pure Arrow logic, so that it can also run in a Ray task).

Before (one source's bookkeeping rows, ``actors.data.tiler.BOOK_SCHEMA``; mode ``samples``)::

    {copies: 1, reason: None, sample_key: "5f0c…", image_key: "a81e…"}
    {copies: 1, reason: None, sample_key: "5f0c…", image_key: "a81e…"}   # the same record again
    {copies: 1, reason: "missing_image", sample_key: None, image_key: None}

After: ``[KEEP, DUPLICATE_SAMPLE, KEEP]`` (a quarantined or subsampled-out row is never a
duplicate: it is counted as what it is).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

KEEP, DUPLICATE_SAMPLE, DUPLICATE_IMAGE = 0, 1, 2


def duplicates(books: list[pa.Table], modes: list[str]) -> list[np.ndarray]:
    """Per source (in source order), int8 [rows]: KEEP, DUPLICATE_SAMPLE or DUPLICATE_IMAGE.

    A good record is a duplicate when an earlier good record (this source or an earlier one)
    had the same ``sample_key`` (image contents + conversation), or, for a source with
    ``dedup: images``, the same ``image_key``. Every source's records are remembered, whatever
    its own mode; ``off`` only keeps its own records. The first one seen is the one kept.
    """
    samples: set[str] = set()
    images: set[str] = set()
    out = []
    for book, mode in zip(books, modes):
        cols = book.select(["copies", "reason", "sample_key", "image_key"]).to_pydict()
        kind = np.zeros(book.num_rows, np.int8)
        for i, (copies, reason, s_key, i_key) in enumerate(zip(*cols.values())):
            if copies == 0 or reason or s_key is None:
                continue
            if mode != "off" and s_key in samples:
                kind[i] = DUPLICATE_SAMPLE
            elif mode == "images" and i_key is not None and i_key in images:
                kind[i] = DUPLICATE_IMAGE
            samples.add(s_key)
            if i_key is not None:
                images.add(i_key)
        out.append(kind)
    return out
