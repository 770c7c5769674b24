"""Helpers for the layout tests: read a file or records through ``actors.data.rows`` as the
preprocess graph does (no Ray)."""

from __future__ import annotations

import json

import pytest

from actors.data import rows as raw
from actors.data.layouts import Reading


@pytest.fixture
def read():
    def _read(layout: str, data, *, path: str = "d/file.json", side=None, image_root: str = "s3://b/img",
              **reading) -> list[dict]:
        blob = data if isinstance(data, bytes) else json.dumps(data).encode()
        rows = raw.parse_json_file(blob, path, source="s", ratio=1.0, image_root=image_root,
                                   reading=Reading(layout=layout, **reading), side=side)
        raw.to_table(rows)  # every row fits the raw schema
        return rows
    return _read


@pytest.fixture
def conv():
    """A raw row's turns."""
    return lambda row: json.loads(row["conversations"])
