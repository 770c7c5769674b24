"""The decode + tile + tokenize stage of preprocess: a Ray Data callable class (actor pool).

Needs the raw-row columns of ``actors.data.rows`` (``source, id, copies, conversations,
image_paths, image_bytes, reason, stage, detail``) and produces the shard columns
(``actors.data.manifest.SHARD_SCHEMA``) plus the bookkeeping columns ``copies, truncated, reason,
stage, detail, sample_key, image_key, source_bytes, stored_bytes`` (the writer keeps the shard columns of
good rows and sends the others to ``errors/``; the driver deduplicates by the keys).

Images are stored as ``models.stored_image`` gives them: the scaled image, losslessly
compressed (``images``), and where it sits on the canvas (``plans``: w', h', x0, y0 per image);
training cuts the views from them with the same tiling code as serving.

Before (one raw row)::

    {id: "7", source: "vqa", copies: 1, image_paths: ["s3://b/img/a.jpg"], image_bytes: [],
     conversations: '[{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", ...}]',
     reason: None, ...}

After (debug flavour, S = 48, G = 2, a 2:1 wide image)::

    {id: "7", source: "vqa", input_ids: [1, ..., 5 x 57, ...], labels: [-100, ..., 812, ...],
     num_tokens: 80, text_tokens: 23, image_tokens: 57, saved_tokens: 36,
     images: [<WebP of the 96×48 scaled image>], plans: [96, 48, 0, 0], view_counts: [3],
     kept: [T, T, F, F], tile_size: 48, grid: 2, copies: 1, truncated: False, reason: None,
     stage: None, detail: None, sample_key: "5f0c…", image_key: "a81e…", source_bytes: 31412,
     stored_bytes: 9120}

A bad row never raises: it leaves with ``reason`` / ``stage`` / ``detail`` set and empty
shard columns. Stages: ``fetch`` (``missing_image``, ``fetch_error``, ``too_large``: over
``max_image_bytes``, found by the size before reading, and never more than that many bytes plus
one read), ``decode`` (``corrupt_image``, ``too_many_pixels``, ``unsupported_mode``; any other
exception of the decoder is ``corrupt_image`` with its type), ``tokenize`` (the reasons of
``models.conversation.ConversationError``, e.g. ``too_long``, ``image_mismatch``), ``boxes``
(``bad_box``: a region's box outside its decoded image, ``actors.data.regions``); anything else
one row raises is ``unexpected_error`` (stage ``tile``) with the exception type.
Image bytes are fetched with a small thread pool (parallel S3 GETs); decoding is sequential
so that one actor uses one CPU.

Shard mode (``Tiler(..., shard_dir=...)``, what ``pipelines.stages.preprocess`` uses): a batch is one
whole shard. The actor writes its good rows itself (each repeated ``copies`` times, in batch
order, row groups of 64: the same rows always give the same bytes) to
``<shard_dir>/<key>-00000.parquet`` and returns only the bookkeeping columns (``BOOK_SCHEMA``: no
pixels, no token ids) with ``shard`` = that file (null when no row was good), so pixels never
travel to the driver; the driver renames the files to ``part-XXXXX.parquet`` in batch order.
Memory stays bounded: the batch is tiled and written ``_CHUNK_ROWS`` rows at a time.

Resuming: ``key`` is a hash of the block's raw rows (:func:`block_key`), so the same block
always gets the same file. The bookkeeping rows are written last, to ``<key>.book.parquet``:
when that file is there (and the shard it names), the block was finished by an earlier run and
is returned from it (``reused`` = True) without fetching or tiling anything.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from actors.data.manifest import SHARD_SCHEMA
from actors.data.regions import fill
from actors.data.shards import ShardWriter
from cluster.storage import Storage
from models.conversation import SYSTEM_PROMPT, ConversationError, tokenize_conversation
from models.boxes import BoxError
from models.errors import UserError
from models.stored_image import store
from models.tiling import ImageError, TileSpec, image_token_count, tokens_saved

# the shard columns (actors.data.manifest.SHARD_SCHEMA), then bookkeeping for the driver
OUT_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [
    ("copies", pa.int32()),
    ("truncated", pa.bool_()),
    ("reason", pa.string()),
    ("stage", pa.string()),
    ("detail", pa.string()),
    ("sample_key", pa.string()),
    ("image_key", pa.string()),
    ("source_bytes", pa.int64()),
    ("stored_bytes", pa.int64()),
])
SHARD_COLUMNS = SHARD_SCHEMA.names
ERROR_COLUMNS = ["id", "source", "stage", "reason", "detail"]
BOOK_COLUMNS = ["id", "source", "num_tokens", "text_tokens", "image_tokens", "saved_tokens", "copies", "truncated",
                "reason", "stage", "detail", "sample_key", "image_key", "source_bytes", "stored_bytes"]
BOOK_SCHEMA = pa.schema([OUT_SCHEMA.field(c) for c in BOOK_COLUMNS] + [("shard", pa.string()),
                                                                       ("reused", pa.bool_())])
_FETCH_THREADS = 8
_CHUNK_ROWS = 16  # rows fetched + tiled at a time in shard mode (bounds the actor's memory)


@dataclass(frozen=True)
class TilerConfig:
    """What the stage needs from the spec and the flavour (small and picklable); build it with
    :meth:`from_flavour` so the geometry is the model's own (models.tiling.TileSpec)."""

    tile: TileSpec  # grid, tile size, padding colour, pad (top_left | centre), skip_tokens
    tokens_per_view: int
    image_position: str  # models.conversation: "inline" | "after_bos"
    max_seq_len: int
    overflow: str
    max_pixels: int
    codec: str = "webp"  # models.stored_image.CODECS
    max_image_bytes: int = 64 * 2**20  # spec data.max_image_bytes

    @classmethod
    def from_flavour(cls, flavour: Any, *, max_seq_len: int, overflow: str = "truncate",
                     max_pixels: int = 64_000_000, codec: str = "webp",
                     max_image_bytes: int = 64 * 2**20) -> "TilerConfig":
        return cls(tile=TileSpec.from_flavour(flavour), tokens_per_view=flavour.tokens_per_view,
                   image_position=flavour.image_position, max_seq_len=max_seq_len, overflow=overflow,
                   max_pixels=max_pixels, codec=codec, max_image_bytes=max_image_bytes)

    @property
    def tile_spec(self) -> TileSpec:
        return self.tile


class _Quarantine(Exception):
    def __init__(self, stage: str, reason: str, detail: str):
        self.stage, self.reason, self.detail = stage, reason, detail
        super().__init__(f"{stage}/{reason}: {detail}")


class ImageFetcher:
    """Reads image bytes by URI (``s3://bucket/key`` or a local path) through ``cluster.storage``,
    at most ``max_bytes`` of them (the rows have confined the URIs: ``actors.data.rows``)."""

    def __init__(self, storage: Optional[Storage] = None, max_bytes: int = 64 * 2**20):
        self._storage = storage
        self.max_bytes = max_bytes

    def read(self, uri: str) -> bytes:
        """The image's bytes; any failure (a URL scheme we never fetch, another bucket we cannot
        read, a missing object, not a regular file, over ``max_bytes``) is a quarantine reason for
        the row, never an error of the stage. The size is checked before reading, and at most
        ``max_bytes + 1`` bytes are read (a file that grows, a size the store does not tell)."""
        if uri.startswith(("http://", "https://")) or ("://" in uri and not uri.startswith("s3://")):
            raise _Quarantine("fetch", "unsupported_image_uri",
                              f"{uri}: preprocess reads images from s3:// or local paths only (no URL fetches)")
        try:
            if self._storage is not None:
                fs, path = self._storage.resolve(uri)
            elif uri.startswith("s3://"):
                raise _Quarantine("fetch", "fetch_error", f"{uri}: no S3 storage configured")
            else:
                fs, path = pafs.LocalFileSystem(), uri
        except _Quarantine:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the cause, the row carries it
            raise _Quarantine("fetch", "fetch_error", f"{uri}: {err}") from None
        cap = self.max_bytes
        try:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise _Quarantine("fetch", "missing_image", f"{uri}: no such file")
            if info.type != pafs.FileType.File:  # a directory, /dev/zero, a FIFO (would block)...
                raise _Quarantine("fetch", "fetch_error", f"{uri}: not a regular file ({info.type.name})")
            if info.size is not None and info.size > cap:
                raise _Quarantine("fetch", "too_large", f"{uri}: {info.size} bytes, over data.max_image_bytes={cap}")
            with fs.open_input_stream(path, compression=None) as f:  # no on-the-fly .gz expansion
                data = f.read(cap + 1)
        except _Quarantine:
            raise
        except FileNotFoundError:
            raise _Quarantine("fetch", "missing_image", f"{uri}: no such file") from None
        except OSError as err:
            if "not found" in str(err).lower() or "NoSuchKey" in str(err) or "does not exist" in str(err):
                raise _Quarantine("fetch", "missing_image", f"{uri}: {err}") from None
            raise _Quarantine("fetch", "fetch_error", f"{uri}: {err}") from None
        except Exception as err:  # noqa: BLE001 - e.g. access denied on another bucket
            raise _Quarantine("fetch", "fetch_error", f"{uri}: {type(err).__name__}: {err}") from None
        if len(data) > cap:
            raise _Quarantine("fetch", "too_large", f"{uri}: over data.max_image_bytes={cap} bytes")
        return data


class Tiler:
    """Ray Data UDF: ``ds.map_batches(Tiler, fn_constructor_kwargs=..., batch_format="pyarrow")``."""

    def __init__(self, config: TilerConfig, tokenizer: Any, storage: Optional[Storage] = None,
                 shard_dir: Optional[str] = None, filesystem: Optional[pafs.FileSystem] = None):
        """``shard_dir`` (a path of ``filesystem``, default ``storage.filesystem``) turns on shard mode."""
        self.config = config
        self.spec = config.tile_spec
        self.tokenizer = tokenizer
        self.fetcher = ImageFetcher(storage, config.max_image_bytes)
        self.pool = ThreadPoolExecutor(_FETCH_THREADS)
        self.shard_dir = shard_dir
        self.fs = filesystem or (storage.filesystem if storage is not None else pafs.LocalFileSystem())

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.shard_dir is not None:
            return self._write_shard(batch)
        rows = batch.to_pylist()
        fetched = self._fetch_all(rows)
        out = [self._process(row, fetched) for row in rows]
        return pa.Table.from_pylist(out, schema=OUT_SCHEMA)

    def _write_shard(self, batch: pa.Table) -> pa.Table:
        """Shard mode: tile ``batch``, write its good rows to one file, return the bookkeeping rows
        (or the ones an earlier run wrote for this very block: see the module doc)."""
        key = block_key(batch)
        book_path = f"{self.shard_dir}/{key}.book.parquet"
        done = self._finished(book_path)
        if done is not None:
            return done
        writer = _OneFile(self.fs, self.shard_dir, key)
        books = []
        for start in range(0, batch.num_rows, _CHUNK_ROWS):
            rows = batch.slice(start, _CHUNK_ROWS).to_pylist()
            fetched = self._fetch_all(rows)
            out = pa.Table.from_pylist([self._process(row, fetched) for row in rows], schema=OUT_SCHEMA)
            good = [i for i, r in enumerate(rows) if _active(r) for _ in range(r["copies"])
                    if out.column("reason")[i].as_py() is None]
            if good:
                writer.write(out.take(pa.array(good, pa.int64())))
            books.append(out.select(BOOK_COLUMNS))
        shard = writer.close()
        book = pa.concat_tables(books) if books else OUT_SCHEMA.empty_table().select(BOOK_COLUMNS)
        book = book.append_column("shard", pa.array([shard] * book.num_rows, pa.string()))
        book = book.append_column("reused", pa.array([False] * book.num_rows, pa.bool_()))
        _write_atomic(self.fs, book_path, book)
        return book

    def _finished(self, book_path: str) -> Optional[pa.Table]:
        """The bookkeeping rows of a block an earlier run finished, or None (then do it now)."""
        import pyarrow.parquet as pq

        if self.fs.get_file_info(book_path).type != pafs.FileType.File:
            return None
        try:
            book = pq.read_table(book_path, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid):
            return None  # a torn file: redo the block
        shards = {s for s in book.column("shard").to_pylist() if s is not None}
        if any(self.fs.get_file_info(s).type != pafs.FileType.File for s in shards):
            return None
        return book.set_column(book.schema.get_field_index("reused"), "reused", pa.array([True] * book.num_rows))

    # -- fetch: all images of the batch in parallel, errors kept per URI
    def _fetch_all(self, rows: list[dict]) -> dict[str, Any]:
        uris = sorted({u for r in rows if _active(r) for u in (r["image_paths"] or [])})

        def get(uri: str) -> Any:
            try:
                return self.fetcher.read(uri)
            except _Quarantine as q:
                return q
        return dict(zip(uris, self.pool.map(get, uris)))

    def _process(self, row: dict, fetched: dict[str, Any]) -> dict:
        base = {"id": row["id"], "source": row["source"], "copies": row["copies"], "truncated": False}
        if row["reason"]:
            return {**base, "reason": row["reason"], "stage": row["stage"], "detail": row["detail"]}
        if row["copies"] == 0:  # subsampled out: counted by the writer, not processed
            return base
        try:
            return {**base, **self._sample(row, fetched)}
        except _Quarantine as q:
            return {**base, "reason": q.reason, "stage": q.stage, "detail": _utf8(q.detail[:300])}
        except Exception as err:  # noqa: BLE001 - one row never aborts the stage (docs/security.md)
            return {**base, "reason": "unexpected_error", "stage": "tile",
                    "detail": _utf8(f"{type(err).__name__}: {err}"[:300])}

    def _sample(self, row: dict, fetched: dict[str, Any]) -> dict:
        cfg = self.config
        images = []
        for uri in row["image_paths"] or []:
            data = fetched[uri]
            if isinstance(data, _Quarantine):
                raise data
            images.append((uri, data))
        images += [(f"image {i}", data) for i, data in enumerate(row["image_bytes"] or [])]
        for name, data in images:
            if len(data) > cfg.max_image_bytes:  # inline bytes (WebDataset / Parquet)
                raise _Quarantine("fetch", "too_large",
                                  f"{name}: {len(data)} bytes, over data.max_image_bytes={cfg.max_image_bytes}")
        stored = []
        for name, data in images:
            try:
                stored.append(store(data, self.spec, max_pixels=cfg.max_pixels, codec=cfg.codec))
            except ImageError as err:
                raise _Quarantine("decode", err.reason, f"{name}: {err.detail}") from None
            except Exception as err:  # noqa: BLE001 - a decoder error outside models.tiling's list
                raise _Quarantine("decode", "corrupt_image", f"{name}: {type(err).__name__}: {err}") from None
        counts = [image_token_count(*t.original_size, self.spec, cfg.tokens_per_view) for t in stored]
        conversation = json.loads(row["conversations"])
        if row.get("boxes"):  # region tasks: pixel boxes -> the canvas frame of these very images
            try:
                conversation = fill(conversation, json.loads(row["boxes"]), [t.original_size for t in stored],
                                    self.spec)
            except BoxError as err:
                raise _Quarantine("boxes", err.reason, err.detail) from None
        turns, system = conversation, SYSTEM_PROMPT
        if turns and turns[0].get("from") == "system":  # a layout's system turn (actors.data.rows)
            turns, system = turns[1:], turns[0]["value"]
        try:
            tok = tokenize_conversation(turns, self.tokenizer, image_tokens=counts, system=system,
                                        max_seq_len=cfg.max_seq_len, overflow=cfg.overflow,
                                        image_position=cfg.image_position)
        except ConversationError as err:
            raise _Quarantine("tokenize", getattr(err, "reason", "bad_conversation"), str(err)) from None
        except UserError as err:  # any other user-fixable problem is still a row problem
            raise _Quarantine("tokenize", getattr(err, "reason", "bad_conversation"), str(err)) from None
        input_ids = np.asarray(tok.input_ids, np.int32)
        kept_images = stored[:tok.images_kept]  # truncation never cuts an image: it drops whole ones
        total = tok.image_token_count
        image_key = _digest(*(hashlib.blake2b(data, digest_size=16).digest() for _, data in images)) if images else None
        return {
            "input_ids": input_ids.tolist(),
            "labels": np.asarray(tok.labels, np.int32).tolist(),
            "num_tokens": len(input_ids),
            "text_tokens": len(input_ids) - total,
            "image_tokens": total,
            "saved_tokens": sum(tokens_saved(t.kept, cfg.tokens_per_view) for t in kept_images),
            "images": [t.data for t in kept_images],
            "plans": [v for t in kept_images for v in t.plan],
            "view_counts": [t.n_views for t in kept_images],
            "kept": [bool(k) for t in kept_images for k in t.kept],
            "tile_size": cfg.tile.tile_size,
            "grid": cfg.tile.grid,
            "truncated": bool(tok.truncated),
            "image_key": image_key,
            "sample_key": _digest((image_key or "").encode(),
                                  json.dumps(conversation, sort_keys=True, separators=(",", ":")).encode()),
            "source_bytes": sum(len(data) for _, data in images[:tok.images_kept]),
            "stored_bytes": sum(len(t.data) for t in kept_images),
        }


def block_key(batch: pa.Table) -> str:
    """A name for a block of raw rows that only its content decides (sources, ids, copies,
    conversations, image references and inline image bytes, quarantine reasons)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("source", "id", "copies", "conversations", "image_paths", "image_bytes", "reason", "boxes"):
        h.update(name.encode())
        col = batch.column(name) if name in batch.column_names else pa.nulls(batch.num_rows)
        for value in col.to_pylist():
            if isinstance(value, list) and value and isinstance(value[0], bytes):  # inline images
                value = [hashlib.blake2b(v, digest_size=16).hexdigest() for v in value]
            h.update(repr(value).encode() + b"\x00")
    return h.hexdigest()


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _write_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write a small Parquet file so that it is either whole or absent (S3 PUTs are; a local
    file is written beside and renamed)."""
    import pyarrow.parquet as pq

    if isinstance(fs, pafs.S3FileSystem):  # one PUT: no copy-and-delete "rename" needed
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f)
        return
    tmp = f"{path}.partial"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, path)


class _OneFile:
    """All rows of one shard into ``directory/<key>-00000.parquet`` (created on the first row)."""

    def __init__(self, fs: pafs.FileSystem, directory: str, key: str):
        self.writer = ShardWriter(fs, directory, 2**62, OUT_SCHEMA, SHARD_COLUMNS, prefix=f"{key}-")

    def write(self, table: pa.Table) -> None:
        self.writer.write(table)

    def close(self) -> Optional[str]:
        """The file's path, or None when no row was written."""
        self.writer.close()
        return f"{self.writer.dir}/{self.writer.names[0]}" if self.writer.names else None


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _active(row: dict) -> bool:
    return not row["reason"] and row["copies"] > 0
