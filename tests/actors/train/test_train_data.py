"""actors.train.data: the planned rows come back in plan order, repeats included."""

from __future__ import annotations

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from actors.train.data import ReadPlannedRows, merge_pack, plan_entries
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


def _sample_shard(tmp_path) -> str:
    path = str(tmp_path / "part-00000.parquet")
    rows = [{"id": f"s{i}", "input_ids": list(range(1, 2 + i)), "labels": [5] * (1 + i), "num_tokens": 1 + i,
             "image_tokens": 3 * (i % 2), "saved_tokens": i % 2, "views": bytes([i]) * (i % 2),
             "view_counts": [1] if i % 2 else [], "kept": [True, False] if i % 2 else [],
             "tile_size": 4, "grid": 1 + i % 2} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def test_packed_entries_come_back_as_one_concatenated_row_each(tmp_path):
    read = ReadPlannedRows(StorageSection(uri=str(tmp_path)), [_sample_shard(tmp_path)])
    entries = {"file": np.array([np.array([0, 0]), np.array([0]), np.array([0, 0, 0])], dtype=object),
               "row": np.array([np.array([1, 4]), np.array([2]), np.array([5, 0, 3])], dtype=object),
               "_pos": np.array([7, 8, 9])}
    table = read(entries).to_pylist()
    assert [r["id"] for r in table] == ["s1+s4", "s2", "s5+s0+s3"]
    assert [r["_pos"] for r in table] == [7, 8, 9]
    first = table[0]
    assert first["seq_lens"] == [2, 5] and first["input_ids"] == [1, 2, 1, 2, 3, 4, 5]
    assert first["num_tokens"] == 7 and first["image_tokens"] == 3 and first["views"] == bytes([1])
    assert first["view_counts"] == [1] and first["kept"] == [True, False] and first["grid"] == 2
    assert table[2]["seq_lens"] == [6, 1, 4] and table[2]["views"] == bytes([5, 3])
    assert table[2]["view_counts"] == [1, 1] and table[2]["image_tokens"] == 6


def test_packed_samples_with_different_geometry_are_refused():
    from models.errors import UserError

    rows = [{"id": "a", "input_ids": [1], "view_counts": [1], "tile_size": 4, "grid": 2},
            {"id": "b", "input_ids": [1], "view_counts": [1], "tile_size": 8, "grid": 2}]
    with pytest.raises(UserError, match="different tile_size"):
        merge_pack(rows)


def test_plan_entries_of_packs_list_each_rows_samples():
    plan = np.arange(2 * 1 * 1 * 2).reshape(2, 1, 1, 2)  # 4 packed rows
    where = np.stack([np.zeros(6, dtype=np.int64), np.arange(6)], axis=1)
    packs = [np.array([5]), np.array([0, 3]), np.array([1, 2]), np.array([4])]
    entries = plan_entries(plan, where, packs=packs, start_step=1)[0]
    assert entries["_pos"].tolist() == [2, 3]
    assert [r.tolist() for r in entries["row"]] == [[1, 2], [4]]


def test_stored_images_come_back_as_the_views_serving_cuts(tmp_path):
    """Rows as preprocess stores them (images + plans) → raw views, bit for bit load_and_tile's;
    packed rows concatenate them in order; a row of another geometry is refused."""
    import io

    from PIL import Image

    from models.errors import UserError
    from models.stored_image import store
    from models.tiling import TileSpec, load_and_tile

    spec = TileSpec(grid=2, tile_size=16, mean_u8=(10, 20, 30))
    rng = np.random.default_rng(0)
    sources = []
    for w, h in [(50, 20), (20, 50), (33, 33)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        sources.append(buf.getvalue())
    stored = [store(b, spec) for b in sources]
    rows = [{"id": f"i{i}", "input_ids": [1, 2], "images": [s.data], "plans": s.plan, "kept": s.kept.tolist(),
             "view_counts": [s.n_views], "tile_size": 16, "grid": 2} for i, s in enumerate(stored)]
    rows.append({"id": "text", "input_ids": [3], "images": [], "plans": [], "kept": [], "view_counts": [],
                 "tile_size": 16, "grid": 2})
    path = str(tmp_path / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = ReadPlannedRows(StorageSection(uri=str(tmp_path)), [path], tile=spec)
    out = read({"file": np.array([0, 0, 0, 0]), "row": np.array([2, 0, 3, 1]), "_pos": np.arange(4)}).to_pylist()
    assert "images" not in out[0] and "plans" not in out[0]
    for r, k in zip(out, [2, 0, None, 1]):
        want = load_and_tile(sources[k], spec).views.tobytes() if k is not None else b""
        assert r["views"] == want
    packed = read({"file": np.array([np.array([0, 0])], dtype=object), "row": np.array([np.array([1, 0])], dtype=object),
                   "_pos": np.array([0])}).to_pylist()[0]
    assert packed["views"] == load_and_tile(sources[1], spec).views.tobytes() + load_and_tile(sources[0], spec).views.tobytes()
    with pytest.raises(UserError, match="the manifest says grid 3"):
        ReadPlannedRows(StorageSection(uri=str(tmp_path)), [path], tile=TileSpec(grid=3, tile_size=16))(
            {"file": np.array([0]), "row": np.array([0]), "_pos": np.arange(1)})
