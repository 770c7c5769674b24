"""The training input: one ordered Ray Dataset per rank, reading the Parquet shards by plan.

``actors.train.batching.plan_batches`` fixes which row every rank sees at every step. This module
turns that plan into datasets that Ray Train hands to the workers unsplit
(``ray.train.get_dataset_shard(f"rank{r}")``): rank r's dataset is its plan entries, in
order, and a ``map_batches`` stage reads each entry's row from its shard (only the row
groups it needs, cached per process). So ``iter_torch_batches(batch_size=micro_batch)``
yields exactly the planned, length-grouped micro-batches, step after step, with no shuffle.

Before → after (``ReadPlannedRows``)::

    {_pos: 12, file: 1, row: 7}
    → {_pos: 12, id: "vqa:7", input_ids: [...], labels: [...], views: b"...", ...}

The shards store each image compressed with its plan (``images``, ``plans``: see
``models.stored_image``); the reader cuts the views from them here, on the Ray Data CPU
workers, with the tiling code serving uses (``views``: uint8 [Σ(1 + kept), S, S, 3] as bytes).
Shards of format 1 (before compressed images) hold ``views`` already and are read as they are.

``_pos = ((step · grad_accum) + micro) · micro_batch + slot`` is the row's place in rank r's
stream; the worker checks it, so an out-of-order stream fails loudly instead of training on
the wrong samples. A row written several times (source ``ratio`` > 1) is several rows here.

Packed training rows (``actors.train.batching.pack_rows``): an entry's ``file`` / ``row`` are lists,
the samples of one training row; ``ReadPlannedRows`` reads them all and concatenates each
entry's samples into one row (``merge_pack``) with ``seq_lens``::

    {_pos: 12, file: [1, 0], row: [7, 3]}
    → {_pos: 12, id: "vqa:7+chat:3", input_ids: [...7's..., ...3's...], seq_lens: [412, 97], ...}
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from models.tiling import TileSpec

# CPUs each rank's Ray Data reader reserves beside the train workers
READER_CPUS = 0.25

PLAN_COLUMNS = ["id", "num_tokens"]


def read_index(storage, layout, shards: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(shard URIs, ``[n, 2]`` (file, row) of every row, num_tokens [n]).

    ``shards``: the manifest's shard names (``part-00000.parquet``, ...) under ``layout.shards``.
    """
    import pyarrow.parquet as pq

    from models.errors import UserError

    files, where, lengths = [], [], []
    for k, name in enumerate(shards):
        uri = f"{layout.shards}/{name}"
        fs, path = storage.resolve(uri)
        try:
            table = pq.read_table(path, columns=["num_tokens"], filesystem=fs)
        except (FileNotFoundError, OSError) as err:
            raise UserError(f"the manifest lists {name}, which cannot be read under {layout.shards}: {err}; "
                            "run `sphinx-x preprocess SPEC --force`") from None
        files.append(uri)
        where.append(np.stack([np.full(table.num_rows, k), np.arange(table.num_rows)], axis=1))
        lengths.append(table.column("num_tokens").to_numpy())
    if not files:
        raise UserError(f"no shards under {layout.shards}; run `sphinx-x preprocess SPEC` first")
    return files, np.concatenate(where).astype(np.int64), np.concatenate(lengths).astype(np.int64)


def plan_entries(plan: np.ndarray, where: np.ndarray, *, start_step: int = 0,
                 packs: Optional[list[np.ndarray]] = None) -> list[dict[str, Any]]:
    """plan [steps, world, accum, micro] → per rank ``{_pos, file, row}`` columns from ``start_step``.

    With ``packs`` (sample indices per packed row; the plan then indexes packs), ``file`` and
    ``row`` hold one list per entry: that training row's samples."""
    steps, world, accum, micro = plan.shape
    out = []
    for rank in range(world):
        rows = plan[start_step:, rank].reshape(-1)
        pos = np.arange(len(rows), dtype=np.int64) + start_step * accum * micro
        if packs is None:
            out.append({"_pos": pos, "file": where[rows, 0], "row": where[rows, 1]})
        else:
            out.append({"_pos": pos, "file": [where[packs[r], 0] for r in rows],
                        "row": [where[packs[r], 1] for r in rows]})
    return out


SUMMED = ("num_tokens", "text_tokens", "image_tokens", "saved_tokens")
CONCATENATED = ("input_ids", "labels", "view_counts", "kept")


def merge_pack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Shard rows (dicts) → one packed row: ids joined by ``+``, token lists, views and masks
    concatenated in order, counts summed, ``seq_lens`` the samples' lengths."""
    from models.errors import UserError

    out = dict(rows[0])
    out["seq_lens"] = [len(r["input_ids"]) for r in rows]
    if len(rows) == 1:
        return out
    out["id"] = "+".join(str(r["id"]) for r in rows)
    for key in SUMMED:
        if key in out:
            out[key] = sum(int(r[key]) for r in rows)
    for key in CONCATENATED:
        if key in out:
            out[key] = [x for r in rows for x in (r[key] or [])]
    if "views" in out:
        out["views"] = b"".join(r["views"] or b"" for r in rows)
    with_images = [r for r in rows if r.get("view_counts")]
    for key in ("tile_size", "grid"):
        values = {int(r[key]) for r in with_images if key in r}
        if len(values) > 1:
            raise UserError(f"rows {[r['id'] for r in with_images]} have different {key} {sorted(values)}; "
                            "one run's shards are tiled with one geometry")
        if values:
            out[key] = values.pop()
    return out


class ReadPlannedRows:
    """map_batches UDF: plan entries ``{_pos, file, row}`` → the shard rows, in entry order.

    The plan visits rows in a seeded random order, so a batch of entries touches many shards.
    Reading whole shards per batch (an early version) re-read ~100x the data it used and, on
    the embedded S3, burnt about a core beside training. Rows are read by Parquet *row group*
    (64 rows as preprocess writes them; ranged reads), and the groups stay in an LRU cache of
    ``cache_bytes``, so each group is read about once per pass when the dataset fits the cache.
    """

    def __init__(self, storage_section, files: list[str], cache_bytes: int = 512 << 20,
                 tile: Optional[TileSpec] = None):
        """``tile``: the shards' geometry (the manifest's ``tiling``); needed when rows hold images."""
        self.storage_section = storage_section  # cluster.spec.StorageSection
        self.files = files
        self.tile = tile
        self.cache_bytes = cache_bytes
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cached = 0
        self._meta: dict[int, tuple[Any, np.ndarray]] = {}  # file -> (ParquetFile, row-group starts)
        self._storage = None

    def _file(self, k: int) -> tuple[Any, np.ndarray]:
        import pyarrow.parquet as pq

        if k not in self._meta:
            if self._storage is None:
                from cluster.storage import open_storage

                self._storage = open_storage(self.storage_section)
            fs, path = self._storage.resolve(self.files[k])
            pf = pq.ParquetFile(fs.open_input_file(path))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._meta[k] = (pf, np.cumsum([0] + sizes))
        return self._meta[k]

    def _group(self, k: int, g: int) -> pa.Table:
        key = (k, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        table = self._file(k)[0].read_row_group(g)
        self._groups[key] = table
        self._cached += table.nbytes
        while self._cached > self.cache_bytes and len(self._groups) > 1:
            _, old = self._groups.popitem(last=False)
            self._cached -= old.nbytes
        return table

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        first = batch["file"][0] if len(batch["file"]) else 0
        if np.ndim(first) == 0:  # one sample per entry
            return self._cut_views(self._read(batch))
        counts = [len(np.atleast_1d(f)) for f in batch["file"]]
        flat = {"file": np.concatenate([np.atleast_1d(f) for f in batch["file"]]),
                "row": np.concatenate([np.atleast_1d(r) for r in batch["row"]]),
                "_pos": np.repeat(np.asarray(batch["_pos"], dtype=np.int64), counts)}
        table = self._cut_views(self._read(flat))
        samples = table.to_pylist()
        packed, k = [], 0
        for n in counts:
            packed.append(merge_pack(samples[k:k + n]))
            k += n
        return pa.Table.from_pylist(packed, schema=table.schema.append(pa.field("seq_lens", pa.list_(pa.int32()))))

    def _cut_views(self, table: pa.Table) -> pa.Table:
        """Stored images (``images``, ``plans``, ``kept``) → ``views`` bytes, row by row."""
        from models.errors import UserError
        from models.stored_image import row_views
        from models.tiling import ImageError

        if "images" not in table.column_names:
            return table
        if self.tile is None:
            raise UserError("the shards hold images but the reader was given no tiling (the manifest's)")
        cols = table.select(["id", "images", "plans", "kept", "grid", "tile_size"]).to_pydict()
        views = []
        for i, images in enumerate(cols["images"]):
            if images and (cols["grid"][i], cols["tile_size"][i]) != (self.tile.grid, self.tile.tile_size):
                raise UserError(f"row {cols['id'][i]!r}: grid {cols['grid'][i]} tile {cols['tile_size'][i]}, but "
                                f"the manifest says grid {self.tile.grid} tile {self.tile.tile_size}")
            try:
                views.append(row_views(images or [], cols["plans"][i] or [], cols["kept"][i] or [], self.tile))
            except ImageError as err:
                raise UserError(f"row {cols['id'][i]!r} of the shards: {err}") from None
        return table.drop_columns(["images", "plans"]).append_column("views", pa.array(views, pa.binary()))

    def _read(self, batch: dict[str, np.ndarray]) -> pa.Table:
        files, rows = np.asarray(batch["file"], dtype=np.int64), np.asarray(batch["row"], dtype=np.int64)
        groups = np.empty_like(rows)
        for k in np.unique(files):
            where = files == k
            starts = self._file(int(k))[1]
            groups[where] = np.searchsorted(starts, rows[where], side="right") - 1
        parts, order = [], []
        for k, g in dict.fromkeys(zip(files.tolist(), groups.tolist())):  # one take per row group
            where = np.flatnonzero((files == k) & (groups == g))
            start = self._file(k)[1][g]
            parts.append(self._group(k, g).take(pa.array(rows[where] - start)))
            order.append(where)
        table = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
        return table.append_column("_pos", pa.array(np.asarray(batch["_pos"], dtype=np.int64)))


def rank_datasets(files: list[str], storage_section, entries: list[dict[str, np.ndarray]], *,
                  tile: Optional[TileSpec] = None, num_cpus: Optional[float] = None,
                  rows_per_task: int = 64) -> dict[str, Any]:
    """``{"rank0": Dataset, ...}``: each rank's planned rows, in plan order (no shuffle).

    Each rank's reader reserves :data:`READER_CPUS` (what the train stage's demand counts).
    """
    import ray.data

    num_cpus = READER_CPUS if num_cpus is None else num_cpus

    datasets = {}
    for rank, cols in enumerate(entries):
        ds = ray.data.from_items([{"_pos": int(p), "file": np.asarray(f).tolist(), "row": np.asarray(r).tolist()}
                                 for p, f, r in zip(cols["_pos"], cols["file"], cols["row"])],
                                 override_num_blocks=max(1, len(cols["_pos"]) // rows_per_task))
        ds = ds.map_batches(ReadPlannedRows,
                            fn_constructor_kwargs=dict(storage_section=storage_section, files=files, tile=tile),
                            batch_size=rows_per_task, batch_format="numpy", num_cpus=num_cpus,
                            compute=ray.data.ActorPoolStrategy(size=1))
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False
        datasets[f"rank{rank}"] = ds
    return datasets
