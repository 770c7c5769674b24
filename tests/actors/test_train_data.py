"""actors.train_data: the planned rows come back in plan order, repeats included."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.train_data import ReadPlannedRows, plan_entries
from cluster.spec import StorageSection


def _shards(tmp_path, n_files=3, rows=10) -> list[str]:
    files = []
    for k in range(n_files):
        path = str(tmp_path / f"part-{k:05d}.parquet")
        pq.write_table(pa.table({"id": [f"{k}:{i}" for i in range(rows)],
                                 "views": [bytes([k, i]) for i in range(rows)]}), path, row_group_size=4)
        files.append(path)
    return files


def test_read_planned_rows_keeps_entry_order_across_files_and_repeats(tmp_path):
    # row groups of 4 rows; a cache smaller than two groups evicts as it goes
    read = ReadPlannedRows(StorageSection(uri=str(tmp_path)), _shards(tmp_path), cache_bytes=1)
    file, row = np.array([2, 0, 2, 1, 0, 0, 2, 1]), np.array([3, 1, 3, 9, 0, 5, 0, 4])
    for _ in range(2):  # the second pass reads through the cache
        table = read({"file": file, "row": row, "_pos": np.arange(40, 48)})
        assert table.column("id").to_pylist() == [f"{f}:{r}" for f, r in zip(file, row)]
        assert table.column("views").to_pylist() == [bytes([f, r]) for f, r in zip(file, row)]
        assert table.column("_pos").to_pylist() == list(range(40, 48))


def test_read_planned_rows_reads_each_row_group_once_when_it_fits(tmp_path, monkeypatch):
    read = ReadPlannedRows(StorageSection(uri=str(tmp_path)), _shards(tmp_path))
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, *a, **k: reads.append(g) or real(self, g, *a, **k))
    rng = np.random.default_rng(0)
    for _ in range(5):
        file, row = rng.integers(0, 3, 8), rng.integers(0, 10, 8)
        read({"file": file, "row": row, "_pos": np.arange(8)})
    assert len(reads) <= 3 * 3  # 3 files × 3 row groups of 4, 4, 2 rows


def test_plan_entries_positions_start_at_the_resumed_step():
    plan = np.arange(4 * 2 * 1 * 3).reshape(4, 2, 1, 3)  # steps, world, accum, micro
    where = np.stack([np.arange(24) // 10, np.arange(24) % 10], axis=1)
    entries = plan_entries(plan, where, start_step=1)
    assert entries[1]["_pos"].tolist() == list(range(3, 12))
    assert entries[1]["file"].tolist() == (plan[1:, 1].reshape(-1) // 10).tolist()
    assert entries[1]["row"].tolist() == (plan[1:, 1].reshape(-1) % 10).tolist()
