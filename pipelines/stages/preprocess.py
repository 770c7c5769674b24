"""`sphinx-x preprocess SPEC`: Ray Data turns ``data.sources`` into tiled, tokenized Parquet shards.

The graph (streaming, bounded memory; Ray Data shows a progress bar per operator)::

    read (per source)          parse (actors.data.rows)       tile + tokenize + write shard      driver
    read_binary_files(json) ─► records -> raw rows  ─┐   (actors.data.tiler, actor pool)
    read_webdataset(tar)    ─► samples -> raw rows  ─┼─► union ─► map_batches(Tiler) ─► bookkeeping rows
    read_parquet(parquet)   ─► rows    -> raw rows  ─┘     writes <uuid>-00000.parquet    tally, errors/,
                                                                                       rename to part-XXXXX

Output under ``<data.output>/`` (cluster.layout: ``part-00000.parquet`` ...,
``errors/part-00000.parquet`` ..., ``tokenizer/``, and ``_manifest.json`` written last).

Source formats (``data.sources[].format``, ``auto`` decides by extension; ``path`` is a file
or a directory / prefix; ``s3://…`` and absolute paths are used as they are, relative ones
are under ``storage.uri``; ``image_root`` likewise):

- ``json`` / ``jsonl``: a JSON array or JSON lines of SPHINX/LLaVA records
  ``{"id"?, "image"?: relative path | [paths], "conversations": [{"from": "human"|"gpt", "value"}]}``;
  images are read from ``image_root`` + ``image`` (default ``image_root``: the source's directory).
- ``webdataset``: ``.tar`` shards; per sample ``KEY.json`` (a record as above, without
  ``image``) or ``KEY.txt`` (a caption), and optionally ``KEY.jpg|jpeg|png|webp``.
- ``parquet``: columns ``conversations`` (JSON text or list of ``{from, value}``), ``image``
  (binary, or ``{bytes: binary}`` as HF datasets write it; null = text-only), ``id`` optional.

Shards are written by the tiler actors, never by the driver: the raw rows of each source are
cut (in order, streaming) into blocks of at most ``data.rows_per_shard`` rows; one block is one
tiler call, which writes the block's good rows (copies repeated, fixed row groups) to one file
under ``_tmp/`` and returns only small bookkeeping rows. So a shard holds the good rows of up to
``rows_per_shard`` consecutive raw rows (fewer when rows were quarantined or subsampled out; a
source's last block may be short), and a block is also the unit of work: keep
``rows_per_shard`` at most ``rows / concurrency`` for every actor to get work.

Determinism: block boundaries depend only on the sources, and Ray Data runs with
``preserve_order``, so the driver sees the blocks in source order then record order whatever
the worker timing and renames their files to ``part-00000.parquet``, ... in that order: a re-run
writes identical files. Old shards under the output prefix are deleted first, so a re-run
replaces, never duplicates.

Resuming: a block's files are named by a hash of its rows, under ``_tmp/<fingerprint>/`` (the
fingerprint: tiling, tokenizer, shard format, code version), and an actor skips a block whose
files an earlier run finished (``actors.data.tiler``). So a run that died (driver or workers) and is
started again without ``--force`` redoes only the unfinished blocks and writes the same shards
and manifest as an uninterrupted run (``rows_reused`` says how many rows came back). A killed
actor is restarted by Ray Data and its block retried under the same name. ``--force`` drops the
finished blocks too.

Deduplication (``data.sources[].dedup``, default ``samples``): the actors hash each record's
image bytes (``image_key``) and images + conversation (``sample_key``); the driver walks the
records in source order and drops a good record seen before (in any source), or with
``images`` one whose images were seen before. Shards that lost rows are rewritten without them
(a Ray task per file). Dropped records are counted per source (``duplicate_samples``,
``duplicate_images``) and, like ``subsampled_out``, are not rows in.

Accounting: ``rows_in`` counts every written copy of a record (``ratio`` > 1 repeats a record,
each copy counts; rows that ``ratio`` < 1 leaves out are reported as ``subsampled_out`` and are
not rows in). ``rows_in == rows_written + rows_quarantined`` always; every quarantined copy is
one row of ``errors/``. ``rows_read == subsampled_out + duplicate_samples + duplicate_images +``
the records of ``rows_in``. ``image_bytes`` compares the stored images with their sources. The
stage fails (UserError, exit 1) only when the quarantined share is over
``data.max_quarantine_fraction``, after shards and manifest are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.data import rows as raw
from actors.data.shards import ShardWriter
from actors.data.tiler import BOOK_SCHEMA, ERROR_COLUMNS, SHARD_FORMAT, Tiler, TilerConfig
from cluster import layout as run_layout
from cluster.connect import check_capacity, connect, storage_for
from cluster.layout import Layout
from cluster.logs import Progress
from cluster.placement import placement
from cluster.spec import ClusterSpec, SourceSpec, load_spec
from cluster.stall import stall_watch
from cluster.storage import Storage
from models.errors import UserError
from models.flavours import Flavour, from_name
from models.light_tokenizer import for_workers

log = logging.getLogger(__name__)

_TOKENIZER_TEXT_ROWS = 200_000  # rows of text the debug BPE tokenizer is trained on (at most)
_BATCH_ROWS = 16  # rows per parse batch


class QuarantineError(UserError):
    """Too many rows were quarantined; the shards and manifest are written anyway."""

    def __init__(self, summary: dict, limit: float):
        self.summary = summary
        share = summary["rows_quarantined"] / max(1, summary["rows_in"])
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary["quarantined_by_reason"].items()))
        super().__init__(
            f"{summary['rows_quarantined']} of {summary['rows_in']} rows ({share:.1%}) were quarantined, over "
            f"data.max_quarantine_fraction={limit:.1%} ({reasons}); see {summary['errors_uri']}")


# ----------------------------------------------------------------------------- entry points


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    try:
        summary = run_stage(spec, force=args.force)
    except QuarantineError as err:
        print(format_summary(err.summary))
        raise
    print(format_summary(summary))
    return 0


def is_complete(spec: ClusterSpec) -> bool:
    storage = storage_for(spec)
    return run_layout.preprocess_complete(storage, Layout.from_spec(spec, storage.uri))


def run_stage(spec: ClusterSpec, *, force: bool = False) -> dict:
    """Run the preprocess graph; returns the manifest (plus ``skipped``/``errors_uri``)."""
    storage = storage_for(spec)
    lay = Layout.from_spec(spec, storage.uri)
    if not force and run_layout.preprocess_complete(storage, lay):
        summary = json.loads(storage.read_bytes(lay.manifest))
        log.info("preprocess: %s is complete; skipping (use --force to redo)", lay.manifest)
        return {**summary, "skipped": True}
    if not spec.data.sources:
        raise UserError("data.sources is empty: nothing to preprocess")
    connect(spec)
    check_capacity(spec, "preprocess")
    from ray.data import DataContext

    flavour = from_name(spec.model.flavour, **spec.model.overrides)
    sources = [_resolve_source(storage, lay, i, s) for i, s in enumerate(spec.data.sources)]
    t0 = time.time()
    _clear_output(storage, lay, keep_finished_blocks=not force)
    tokenizer = _tokenizer(spec, flavour, storage, lay, sources)
    config = TilerConfig.from_flavour(flavour, max_seq_len=spec.data.max_seq_len, overflow=spec.data.overflow,
                                      max_pixels=spec.data.max_image_pixels, codec=spec.data.image_codec)
    tmp_uri = _blocks_dir(storage, lay, config, tokenizer)
    options = DataContext.get_current().execution_options
    old_order, options.preserve_order = options.preserve_order, True  # determinism (see module doc)
    try:
        with stall_watch("preprocess"):
            summary = _run_graph(spec, flavour, storage, lay, sources, tokenizer, config, tmp_uri)
    finally:
        options.preserve_order = old_order
    summary["seconds"] = round(time.time() - t0, 2)
    storage.write_bytes(lay.manifest, json.dumps(summary, indent=2, sort_keys=True).encode())
    summary["errors_uri"] = lay.errors
    limit = spec.data.max_quarantine_fraction
    if summary["rows_quarantined"] > limit * summary["rows_in"]:
        raise QuarantineError(summary, limit)
    return summary


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    spec: SourceSpec
    format: str  # json | jsonl | webdataset | parquet
    filesystem: pafs.FileSystem
    files: tuple[str, ...]  # filesystem paths, sorted
    image_root: Optional[str]  # a URI: s3://bucket/key or an absolute local path


def _locate(storage: Storage, lay: Layout, path: str) -> tuple[pafs.FileSystem, str, str]:
    """A spec path -> (filesystem, filesystem path, URI), by the layout's one rule."""
    uri = lay.path(path)
    fs, fs_path = storage.resolve(uri)
    return fs, fs_path, uri


_EXT_FORMAT = {".json": "json", ".jsonl": "jsonl", ".tar": "webdataset", ".parquet": "parquet"}


def _resolve_source(storage: Storage, lay: Layout, i: int, src: SourceSpec) -> _Source:
    fs, path, uri = _locate(storage, lay, src.path)
    where = f"data.sources[{i}] ({src.name}): path {uri}"
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise UserError(f"{where}: cannot be read: {err}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{where}: no such file or prefix")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(f.path for f in infos if f.type == pafs.FileType.File
                       and any(f.path.endswith(e) for e in _EXT_FORMAT) and "/_" not in f.path[len(path):])
    else:
        files = [path]
    if not files:
        raise UserError(f"{where}: holds no .json, .jsonl, .tar or .parquet files")
    fmt = src.format
    if fmt == "auto":
        kinds = {next((v for e, v in _EXT_FORMAT.items() if f.endswith(e)), "jsonl") for f in files}
        kinds = {"json" if k in ("json", "jsonl") else k for k in kinds}
        if len(kinds) > 1:
            raise UserError(f"{where}: mixes formats {sorted(kinds)}; split it or set format")
        fmt = kinds.pop()
        fmt = "auto" if fmt == "json" else fmt  # json vs jsonl decided per file
    image_root = lay.path(src.image_root) if src.image_root else None
    if image_root is None and fmt in ("auto", "json", "jsonl"):
        image_root = uri.rsplit("/", 1)[0] if info.type != pafs.FileType.Directory else uri
    return _Source(spec=src, format=fmt, filesystem=fs, files=tuple(files), image_root=image_root)


def _parse_json_batch(batch: pa.Table, *, source: str, ratio: float, image_root: Optional[str],
                      fmt: str, file_nos: dict) -> pa.Table:
    out = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        out += raw.parse_json_file(data, path, source=source, ratio=ratio, image_root=image_root,
                                   fmt=fmt, file_no=file_nos.get(path))
    return raw.to_table(out)


def _parse_wds_batch(batch: pa.Table, *, source: str, ratio: float) -> pa.Table:
    return raw.to_table([raw.wds_row(s, source=source, ratio=ratio) for s in batch.to_pylist()])


def _parse_parquet_batch(batch: pa.Table, *, source: str, ratio: float) -> pa.Table:
    return raw.to_table([raw.parquet_row(r, source=source, ratio=ratio) for r in batch.to_pylist()])


def _raw_dataset(src: _Source):
    """The raw rows of one source (a lazy Ray Dataset in record order).

    Reading and parsing reserve no CPU: they are I/O-bound and light next to decoding, and an
    actor pool as large as the CPUs would otherwise leave them none (Ray Data would stall).
    """
    import ray.data

    name, ratio = src.spec.name, src.spec.ratio
    files = list(src.files)
    light = dict(num_cpus=0, batch_format="pyarrow")
    if src.format == "webdataset":
        ds = ray.data.read_webdataset(files, filesystem=src.filesystem, decoder=None, num_cpus=0)
        return ds.map_batches(_parse_wds_batch, batch_size=_BATCH_ROWS, fn_kwargs=dict(source=name, ratio=ratio),
                              **light)
    if src.format == "parquet":
        ds = ray.data.read_parquet(files, filesystem=src.filesystem, num_cpus=0)
        return ds.map_batches(_parse_parquet_batch, batch_size=_BATCH_ROWS,
                              fn_kwargs=dict(source=name, ratio=ratio), **light)
    ds = ray.data.read_binary_files(files, filesystem=src.filesystem, include_paths=True, num_cpus=0)
    file_nos = {p: i for i, p in enumerate(files)} if len(files) > 1 else {}
    return ds.map_batches(_parse_json_batch, batch_size=1, **light,
                          fn_kwargs=dict(source=name, ratio=ratio, image_root=src.image_root,
                                         fmt=src.format, file_nos=file_nos))


def _shard_blocks(ds, rows: int):
    """Re-cut a source's raw rows into blocks of at most ``rows`` rows (streaming, order kept).

    One block becomes one shard (see module doc). A JSON file parses into ONE block; the
    re-cut splits it (and joins small ones), deterministically for the same inputs. It runs in
    the (CPU-free) parse tasks: Ray 2.60 gives ``repartition`` no resource argument, so its
    logical op gets the parse op's ``num_cpus=0`` and is fused into it.
    """
    ds = ds.repartition(target_num_rows_per_block=rows)
    op = ds._logical_plan.dag
    if hasattr(op, "ray_remote_args"):
        object.__setattr__(op, "ray_remote_args", {"num_cpus": 0})
    return ds


def _all_raw(sources: list[_Source], rows_per_shard: int):
    datasets = [_shard_blocks(_raw_dataset(s), rows_per_shard) for s in sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer(spec: ClusterSpec, flavour: Flavour, storage: Storage, lay: Layout, sources: list[_Source]):
    """Load ``model.tokenizer`` (or the flavour's), or train the debug BPE on the sources' text."""
    from models.conversation import load_tokenizer, train_bpe_tokenizer

    vocab = int(flavour.llm["vocab_size"])
    path = spec.model.tokenizer or flavour.tokenizer
    if spec.model.weights:
        # published weights bring their own tokenizer (<image> and pad added); the vocab follows it
        from models.weights.hf_llm import load_llm_tokenizer

        uri = lay.path(path) if spec.model.tokenizer else run_layout.join(lay.path(spec.model.weights), "llm")
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_llm_tokenizer(_tokenizer_files(storage, uri, tmp))
    elif path:
        uri = lay.path(path)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_tokenizer(_tokenizer_files(storage, uri, tmp))
    else:
        tokenizer = train_bpe_tokenizer(_source_texts(sources), vocab)
    if not spec.model.weights and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but flavour {flavour.name!r} has "
                        f"vocab_size {vocab}; set model.overrides.llm.vocab_size >= {len(tokenizer)}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, lay.tokenizer)
    return tokenizer


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".msgpack", ".h5", ".gguf")


def _tokenizer_files(storage: Storage, uri: str, tmp: str) -> str:
    """A local directory holding the tokenizer files at ``uri`` (an S3 prefix: only those files are
    downloaded, never the weights beside them)."""
    if not uri.startswith("s3://"):
        if not os.path.isdir(uri):
            raise UserError(f"no tokenizer directory at {uri}")
        return uri
    names = [u for u in storage.list(uri) if not u.endswith(_WEIGHT_SUFFIXES)]
    if not names:
        raise UserError(f"no tokenizer files under {uri}")
    for u in names:
        target = os.path.join(tmp, u[len(uri):].lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(storage.read_bytes(u))
    return tmp


def _source_texts(sources: list[_Source]) -> list[str]:
    """First pass for the debug tokenizer: the turns' text of the good records, in source order.

    Runs on the driver (debug flavours are for small data): the same parsers as the graph,
    reading only the text (Parquet ``conversations`` column, tar members without images).
    """
    texts: list[str] = []
    for src in sources:
        name, ratio = src.spec.name, src.spec.ratio
        for path in src.files:
            if src.format == "parquet":
                table = pq.read_table(path, filesystem=src.filesystem, columns=["conversations"])
                rows = [raw.parquet_row(r, source=name, ratio=ratio) for r in table.to_pylist()]
            elif src.format == "webdataset":
                with src.filesystem.open_input_file(path) as f, tarfile.open(fileobj=f) as tar:
                    samples: dict[str, dict] = defaultdict(dict)
                    for m in tar:
                        key, _, ext = m.name.partition(".")
                        if m.isfile() and ext in ("json", "txt"):
                            samples[key][ext] = tar.extractfile(m).read()
                rows = [raw.wds_row({"__key__": k, **v}, source=name, ratio=ratio) for k, v in samples.items()]
            else:
                with src.filesystem.open_input_file(path) as f:
                    rows = raw.parse_json_file(f.read(), path, source=name, ratio=ratio, image_root=None,
                                               fmt=src.format)
            for r in rows:
                if r["reason"] is None:
                    texts += [t["value"].replace(raw.IMAGE_PLACEHOLDER, " ") for t in json.loads(r["conversations"])]
            if len(texts) >= _TOKENIZER_TEXT_ROWS:
                return texts
    return texts or ["(no text)"]


# ----------------------------------------------------------------------------- the graph


def _run_graph(spec: ClusterSpec, flavour: Flavour, storage: Storage, lay: Layout, sources: list[_Source],
               tokenizer, config: TilerConfig, tmp_uri: str) -> dict:
    remote: dict[str, Any] = {}
    if spec.data.group is not None:
        remote["resources"] = placement(spec, spec.data.group)
    import ray.data

    fs, out_dir = storage.resolve(lay.shards)
    _, tmp_dir = storage.resolve(tmp_uri)
    ds = _all_raw(sources, spec.data.rows_per_shard).map_batches(
        Tiler, batch_format="pyarrow", batch_size=None,  # one block = one shard
        compute=ray.data.ActorPoolStrategy(size=spec.data.concurrency),
        num_cpus=spec.data.num_cpus_per_worker,
        fn_constructor_kwargs=dict(config=config, tokenizer=for_workers(tokenizer), storage=storage,
                                   shard_dir=tmp_dir, filesystem=fs),
        **remote,
    )
    # Ray Data's union interleaves the sources' blocks (each source's stay in order): so the
    # bookkeeping rows are kept per source and everything is decided in source order at the end.
    order = {s.spec.name: k for k, s in enumerate(sources)}
    blocks: list[list[pa.Table]] = [[] for _ in sources]
    rows_read = quarantined = 0
    progress = Progress("preprocess", unit="rows")
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for k, rows in _by_source(batch, order):
            blocks[k].append(rows)
        rows_read += batch.num_rows
        quarantined += sum(1 for r in batch.column("reason").to_pylist() if r)
        progress.update(rows_read, quarantined=quarantined)
    progress.close()
    books = [pa.concat_tables(b) if b else BOOK_SCHEMA.empty_table() for b in blocks]
    kinds = duplicates(books, [s.spec.dedup for s in sources])
    tally = _Tally()
    _, errors_dir = storage.resolve(lay.errors)
    errors = ShardWriter(fs, errors_dir, spec.data.rows_per_shard, BOOK_SCHEMA, ERROR_COLUMNS)
    for book, kind in zip(books, kinds):
        errors.write(tally.add(book, kind))
    errors.close()
    names = _finish_shards(fs, out_dir, tmp_dir, books, kinds)
    storage.delete(lay.shards_tmp)
    return tally.manifest(spec, flavour, tokenizer, names, errors.names, config)


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


def _finish_shards(fs: pafs.FileSystem, out_dir: str, tmp_dir: str, books: list[pa.Table],
                   kinds: list[np.ndarray]) -> list[str]:
    """The actors' files → ``part-00000.parquet``, ... in source and block order (a file that
    lost rows to deduplication is rewritten without them first, by a Ray task: no pixels
    through the driver). Returns the shard names."""
    import ray

    from actors.data.shards import copy_without

    files: list[tuple[str, list[int]]] = []  # (actor's file, its rows to drop), in order
    for book, kind in zip(books, kinds):
        cols = book.select(["shard", "copies", "reason"]).to_pydict()
        at = 0
        for i, (path, copies, reason) in enumerate(zip(cols["shard"], cols["copies"], cols["reason"])):
            if path is None or reason or copies == 0:
                continue
            if not files or files[-1][0] != path:
                files.append((path, []))
                at = 0
            if kind[i] != KEEP:
                files[-1][1].extend(range(at, at + copies))
            at += copies
    rewrite = ray.remote(copy_without).options(num_cpus=0)
    jobs = {k: rewrite.remote(fs, path, tmp_dir, f"{k:05d}-dedup-", drop)
            for k, (path, drop) in enumerate(files) if drop}
    rewritten = dict(zip(jobs, ray.get(list(jobs.values()))))
    names: list[str] = []
    moved: dict[str, str] = {}  # an actor's file -> where it went (identical blocks share a file)
    for k, (path, drop) in enumerate(files):
        source = rewritten[k] if drop else path
        if source is None:  # every row was a duplicate
            continue
        target = f"{out_dir}/{run_layout.shard_name(len(names))}"
        if not drop and path in moved:
            fs.copy_file(moved[path], target)
        else:
            fs.move(source, target)
            moved.setdefault(path, target)
        names.append(run_layout.shard_name(len(names)))
    return names


class _Tally:
    """Counts rows, reasons, duplicates, tokens and image bytes per source; ``add`` returns the
    quarantined rows (one per copy) for ``errors/``."""

    def __init__(self) -> None:
        self.per_source: dict[str, Counter] = defaultdict(Counter)
        self.reasons: dict[str, Counter] = defaultdict(Counter)

    def add(self, book: pa.Table, kind: np.ndarray) -> pa.Table:
        cols = book.select(["source", "copies", "reason", "truncated", "text_tokens", "image_tokens",
                            "saved_tokens", "source_bytes", "stored_bytes", "reused"]).to_pylist()
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
                for k in ("text_tokens", "image_tokens", "saved_tokens", "source_bytes", "stored_bytes"):
                    c[k] += n * (r[k] or 0)
        return _take(book, idx_bad)

    def manifest(self, spec: ClusterSpec, flavour: Flavour, tokenizer, shards: list[str], errors: list[str],
                 config: TilerConfig) -> dict:
        total = sum(self.per_source.values(), Counter())
        by_reason = sum(self.reasons.values(), Counter())
        sources = {}
        for s in spec.data.sources:
            c = self.per_source.get(s.name, Counter())
            sources[s.name] = {k: int(c[k]) for k in _COUNT_KEYS} | {
                "ratio": s.ratio, "dedup": s.dedup, "quarantined_by_reason": dict(sorted(self.reasons[s.name].items()))}
        return {
            "rows_in": int(total["rows_in"]),
            "rows_written": int(total["rows_written"]),
            "rows_quarantined": int(total["rows_quarantined"]),
            "quarantined_by_reason": dict(sorted(by_reason.items())),
            "rows_read": int(total["rows_read"]),
            "subsampled_out": int(total["subsampled_out"]),
            "duplicate_samples": int(total["duplicate_samples"]),
            "duplicate_images": int(total["duplicate_images"]),
            "rows_reused": int(total["rows_reused"]),
            "rows_truncated": int(total["rows_truncated"]),
            "tokens": {"text": int(total["text_tokens"]), "image": int(total["image_tokens"]),
                       "saved": int(total["saved_tokens"]),
                       "total": int(total["text_tokens"] + total["image_tokens"])},
            "image_bytes": {"source": int(total["source_bytes"]), "stored": int(total["stored_bytes"]),
                            "codec": config.codec},
            "sources": sources,
            "shards": shards,
            "shard_format": SHARD_FORMAT,
            "error_shards": [f"errors/{n}" for n in errors],
            "flavour": flavour.name,
            "tiling": tiling_facts(flavour),
            "max_seq_len": spec.data.max_seq_len,
            "overflow": spec.data.overflow,
            "max_image_pixels": spec.data.max_image_pixels,
            "tokenizer": "tokenizer",
            "vocab_size": len(tokenizer),
            "image_token_id": image_token_id(tokenizer),
            "code_version": _code_version(),
        }


def tiling_facts(flavour: Flavour) -> dict:
    """What the shards' pixels and token layout depend on (the geometry of models.tiling, tokens
    per view, where images sit); training refuses a model that differs (pipelines.stages.train)."""
    from models.tiling import TileSpec

    return {**TileSpec.from_flavour(flavour).to_dict(), "tokens_per_view": flavour.tokens_per_view,
            "image_position": flavour.image_position}


def image_token_id(tokenizer) -> int:
    from models.conversation import image_token_id as find

    return find(tokenizer)


def _by_source(table: pa.Table, order: dict[str, int]) -> list[tuple[int, pa.Table]]:
    """``table``'s rows split by source -> [(source index, rows in order)]."""
    if table.num_rows == 0:
        return []
    names = table.column("source").to_pylist()
    if len(set(names)) == 1:
        return [(order[names[0]], table)]
    return [(order[n], _take(table, [i for i, m in enumerate(names) if m == n])) for n in dict.fromkeys(names)]


def _take(batch: pa.Table, idx: list[int]) -> pa.Table:
    """Rows ``idx`` of ``batch`` (no copy in the common case: every row once, in order)."""
    if len(idx) == batch.num_rows and idx == list(range(batch.num_rows)):
        return batch
    return batch.take(pa.array(idx, pa.int64()))


_COUNT_KEYS = ("rows_read", "subsampled_out", "duplicate_samples", "duplicate_images", "rows_in", "rows_written",
               "rows_quarantined", "rows_truncated", "text_tokens", "image_tokens", "saved_tokens", "source_bytes",
               "stored_bytes")


# ----------------------------------------------------------------------------- helpers


def _clear_output(storage: Storage, lay: Layout, *, keep_finished_blocks: bool) -> None:
    """Delete the manifest first (the output is incomplete from now on), then old shards; the
    blocks an interrupted run finished (under ``_tmp/``) stay unless ``keep_finished_blocks`` is off."""
    for uri in (lay.manifest, lay.errors, lay.tokenizer):
        storage.delete(uri)
    if not keep_finished_blocks:
        storage.delete(lay.shards_tmp)
    for uri in storage.list(lay.shards):
        if run_layout.is_shard(uri) and "/" not in uri[len(lay.shards):].strip("/"):
            storage.delete(uri)


def _blocks_dir(storage: Storage, lay: Layout, config: TilerConfig, tokenizer) -> str:
    """``_tmp/<fingerprint>``: where the actors put finished blocks. The fingerprint covers all a
    block's output depends on besides its rows (tiling, tokenizer, shard format, code version), so
    a resumed run reuses only blocks that it would write the same; other runs' blocks are deleted."""
    import dataclasses
    import hashlib

    facts = {"tiler": dataclasses.asdict(config), "format": SHARD_FORMAT, "code": _code_version(),
             "vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    key = hashlib.blake2b(json.dumps(facts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    base = lay.shards_tmp.rstrip("/")
    for run in {uri[len(base):].strip("/").split("/")[0] for uri in storage.list(base)} - {key}:
        storage.delete(run_layout.join(base, run))
    return run_layout.join(base, key)


def _code_version() -> str:
    import subprocess
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        pkg = version("sphinx-x")
    except PackageNotFoundError:
        pkg = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pkg}+{sha}" if sha else pkg


def format_summary(s: dict) -> str:
    """The one-screen summary printed at the end of the stage."""
    if s.get("skipped"):
        return f"preprocess: already complete ({s['rows_written']} rows in {len(s['shards'])} shards); --force to redo"
    tok = s["tokens"]
    lines = [
        f"preprocess: {s['flavour']} (grid {s['tiling']['grid']}, tile {s['tiling']['tile_size']}) "
        f"in {s.get('seconds', 0):.1f}s",
        f"  rows in {s['rows_in']}  written {s['rows_written']}  quarantined {s['rows_quarantined']}  "
        f"truncated {s['rows_truncated']}  (read {s['rows_read']}, subsampled out {s['subsampled_out']})",
    ]
    for reason, n in s["quarantined_by_reason"].items():
        lines.append(f"    {reason:<18} {n}")
    lines.append(f"  tokens {tok['total']} (text {tok['text']}, image {tok['image']}); saved by skip tokens {tok['saved']}")
    dup = s.get("duplicate_samples", 0) + s.get("duplicate_images", 0)
    img = s.get("image_bytes") or {}
    if img.get("source"):
        lines.append(f"  images stored in {img['stored'] / 1e6:.1f} MB ({img['codec']}, lossless): "
                     f"{img['stored'] / img['source']:.2f}x their {img['source'] / 1e6:.1f} MB of sources")
    if dup:
        lines.append(f"  duplicates dropped: {s.get('duplicate_samples', 0)} samples, "
                     f"{s.get('duplicate_images', 0)} by image")
    if s.get("rows_reused"):
        lines.append(f"  resumed: {s['rows_reused']} of {s['rows_read']} rows came from blocks an earlier run finished")
    lines.append(f"  {'source':<20} {'in':>8} {'written':>8} {'quarantined':>11} {'duplicates':>10} {'ratio':>6}")
    for name, c in s["sources"].items():
        d = c.get("duplicate_samples", 0) + c.get("duplicate_images", 0)
        lines.append(f"  {name:<20} {c['rows_in']:>8} {c['rows_written']:>8} {c['rows_quarantined']:>11} {d:>10} "
                     f"{c['ratio']:>6g}")
    lines.append(f"  {len(s['shards'])} shard(s), {len(s['error_shards'])} error shard(s)"
                 + (f" -> {s['errors_uri']}" if s.get("errors_uri") and s["error_shards"] else ""))
    return "\n".join(lines)
