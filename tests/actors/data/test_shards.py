"""actors.data.shards: fixed shard and row-group cuts, so batch boundaries never change the files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.data.shards import ShardWriter

SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int32()), ("extra", pa.string())])


def _write(tmp_path, name, cuts):
    table = pa.table({"id": [f"r{i}" for i in range(23)], "n": list(range(23)), "extra": ["x"] * 23}, schema=SCHEMA)
    w = ShardWriter(pafs.LocalFileSystem(), str(tmp_path / name), rows_per_shard=10, schema=SCHEMA,
                    columns=["id", "n"], row_group_rows=4)
    start = 0
    for end in cuts + [23]:
        w.write(table.slice(start, end - start))
        start = end
    w.close()
    return w.names, {n: (tmp_path / name / n).read_bytes() for n in w.names}


def test_batch_boundaries_do_not_change_the_bytes(tmp_path):
    names, a = _write(tmp_path, "a", [1, 2, 9, 17])
    _, b = _write(tmp_path, "b", [12])
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert a == b
    f = pq.ParquetFile(tmp_path / "a" / "part-00001.parquet")
    assert f.metadata.num_rows == 10 and [f.metadata.row_group(i).num_rows for i in range(3)] == [4, 4, 2]
    assert f.schema_arrow.names == ["id", "n"]
    assert pq.read_table(tmp_path / "a" / "part-00002.parquet").column("n").to_pylist() == [20, 21, 22]


def test_nothing_written_means_no_shard(tmp_path):
    w = ShardWriter(pafs.LocalFileSystem(), str(tmp_path / "e"), rows_per_shard=10, schema=SCHEMA, columns=["id"])
    w.write(pa.table({"id": [], "n": [], "extra": []}, schema=SCHEMA))
    w.close()
    assert w.names == [] and not (tmp_path / "e").exists()
