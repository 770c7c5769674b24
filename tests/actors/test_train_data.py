"""actors.train_data: the planned rows come back in plan order, repeats included."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.train_data import ReadPlannedRows, plan_entries


def _shards(tmp_path, n_files=3, rows=10) -> list[str]:
    files = []
    for k in range(n_files):
        path = str(tmp_path / f"part-{k:05d}.parquet")
        pq.write_table(pa.table({"id": [f"{k}:{i}" for i in range(rows)],
                                 "views": [bytes([k, i]) for i in range(rows)]}), path)
        files.append(path)
    return files


def test_read_planned_rows_keeps_entry_order_across_files_and_repeats(tmp_path):
    read = ReadPlannedRows({"uri": str(tmp_path)}, _shards(tmp_path), cache_files=2)
    file, row = np.array([2, 0, 2, 1, 0, 0, 2]), np.array([3, 1, 3, 9, 0, 5, 0])
    table = read({"file": file, "row": row, "_pos": np.arange(40, 47)})
    assert table.column("id").to_pylist() == [f"{f}:{r}" for f, r in zip(file, row)]
    assert table.column("views").to_pylist() == [bytes([f, r]) for f, r in zip(file, row)]
    assert table.column("_pos").to_pylist() == list(range(40, 47))


def test_plan_entries_positions_start_at_the_resumed_step():
    plan = np.arange(4 * 2 * 1 * 3).reshape(4, 2, 1, 3)  # steps, world, accum, micro
    where = np.stack([np.arange(24) // 10, np.arange(24) % 10], axis=1)
    entries = plan_entries(plan, where, start_step=1)
    assert entries[1]["_pos"].tolist() == list(range(3, 12))
    assert entries[1]["file"].tolist() == (plan[1:, 1].reshape(-1) // 10).tolist()
    assert entries[1]["row"].tolist() == (plan[1:, 1].reshape(-1) % 10).tolist()
