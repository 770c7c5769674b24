"""`sphinx-x preprocess SPEC`: Ray Data turns ``data.sources`` into tiled, tokenized Parquet shards.

The graph (streaming, bounded memory; Ray Data shows a progress bar per operator)::

    read (per source)          parse (actors.data.rows)       tile + tokenize + write shard      driver
    read_binary_files(json) ─► records -> raw rows  ─┐   (actors.data.tiler, actor pool)
    read_webdataset(tar)    ─► samples -> raw rows  ─┼─► union ─► map_batches(Tiler) ─► bookkeeping rows
    read_parquet(parquet)   ─► rows    -> raw rows  ─┘     writes <uuid>-00000.parquet    tally, errors/,
                                                                                       rename to part-XXXXX

Output under ``<data.output>/`` (cluster.layout: ``part-00000.parquet`` ...,
``errors/part-00000.parquet`` ..., ``tokenizer/``, and ``_manifest.json`` written last: an
``actors.data.manifest.Manifest``, whose ``SHARD_SCHEMA`` are the shards' columns).

This module is the graph and the stage; beside it: ``preprocess_sources`` (resolving
``data.sources``), ``preprocess_tokenizer`` (``tokenizer/``), ``preprocess_report`` (the printed
summary); on the Arrow side ``actors.data.dedup`` and ``actors.data.tally`` (the counts).

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

Layouts (``data.sources[].layout``, docs/interfaces.md "Source layouts"): beside the container
format, how a record is laid out: ``llava`` (the records above, the default), chat sets
(``sharegpt``, ``messages``, ``ultrachat``) and the annotation files of public datasets
(``coco_captions``, ``vqa``, ``textvqa``, ``ocrvqa``, ``docvqa``, ``refcoco``, ``vg_regions``, read
whole, with their ``annotations`` file), asked with per-task prompts (``actors.data.prompts``).
Mixture: each record is written ``epochs`` = ratio x weight (x the temperature factor of
``data.mixture_temperature``, for which every source is parsed once more to count it) times on
average (``actors.data.mixture``); the manifest records each source's layout, prompts, weight, epochs.

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
``data.max_quarantine_fraction``, after shards and manifest are written; the manifest records
that gate (``quarantine_gate``), so the stage is complete only when it passed and training refuses
shards that failed it.

Hostile rows (docs/security.md): image references are confined to ``image_root`` /
``allowed_image_prefixes`` (``outside_root``), reads are capped by ``data.max_image_bytes``
(``too_large``), and a record that is not UTF-8, not JSON, too deep or otherwise unreadable is
quarantined alone (``actors.data.rows``): one row never stops the stage.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from actors.data import rows as raw
from actors.data.dedup import KEEP, duplicates
from actors.data import mixture, prompts
from actors.data.layouts import LAYOUTS, Reading, load_side
from actors.data.manifest import SHARD_FORMAT, Manifest, QuarantineGate, Tiling, TokenizerFacts
from actors.data.shards import ShardWriter
from actors.data.tally import Tally, take
from actors.data.tiler import BOOK_SCHEMA, ERROR_COLUMNS, Tiler, TilerConfig
from cluster import layout as run_layout
from cluster.capacity import Demand, Work, check_capacity
from cluster.connect import connect
from cluster.layout import Layout
from cluster.logs import Progress
from cluster.output_guard import check_force_output
from cluster.placement import placement
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec
from cluster.stall import stall_watch
from cluster.storage import Storage
from models.errors import UserError
from models.flavours import Flavour, from_name
from models.light_tokenizer import for_workers
from pipelines.provenance import code_version
from pipelines.stage import StageBase
from pipelines.stages.preprocess_report import QuarantineError, format_summary
from pipelines.stages.preprocess_sources import Source, resolve_source
from pipelines.stages.preprocess_tokenizer import prepare_tokenizer
from pipelines.upstream import read_parquet_cpu_free, repartition_without_cpus

log = logging.getLogger(__name__)

_BATCH_ROWS = 16  # rows per parse batch


# ----------------------------------------------------------------------------- entry points


class PreprocessStage(StageBase):
    """`sphinx-x preprocess SPEC`: ``data.sources`` -> tiled, tokenized Parquet shards + manifest."""

    name = "preprocess"
    help = "tile and tokenize data.sources into Parquet shards"

    def demand(self, spec: ClusterSpec) -> Demand:
        d = spec.data
        return Demand(self.name, (Work("tiling actors", d.concurrency,
                                       {"CPU": d.num_cpus_per_worker, **placement(spec, d.group)}, group=d.group),))

    def outputs(self, layout: Layout) -> dict[str, str]:
        return {"shards": layout.shards, "errors": layout.errors, "tokenizer": layout.tokenizer,
                "manifest": layout.manifest}

    def is_complete(self, ctx: RunContext) -> bool:
        """The manifest exists AND passed the quarantine gate (as written, and under the spec's
        ``data.max_quarantine_fraction`` now): a run that failed the gate is redone, and fails the
        same way until the data or the limit changes."""
        lay = ctx.layout
        if not ctx.storage.exists(lay.manifest):
            return False
        try:
            manifest = Manifest.from_json(ctx.storage.read_bytes(lay.manifest), where=lay.manifest)
        except UserError:
            return False  # unreadable or from a newer sphinx-x: redo it
        return manifest.gate_failure(ctx.spec.data.max_quarantine_fraction) is None

    def run(self, ctx: RunContext) -> dict:
        try:
            return _run(ctx)
        except QuarantineError as err:
            print(format_summary(err.summary), flush=True)
            raise

    def report(self, ctx: RunContext, summary: dict) -> None:
        print(format_summary(summary), flush=True)


STAGE = PreprocessStage()


def run_stage(spec: ClusterSpec, *, force: bool = False) -> dict:
    """``STAGE.run`` on a context built here (tests, benchmarks and the demo call this)."""
    return STAGE.run(RunContext.build(spec, force=force))


def is_complete(spec: ClusterSpec) -> bool:
    return STAGE.is_complete(RunContext.build(spec))


def _run(ctx: RunContext) -> dict:
    """Run the preprocess graph; returns the manifest (plus ``skipped``/``errors_uri``)."""
    spec, storage, lay, force = ctx.spec, ctx.storage, ctx.layout, ctx.force
    if not force and STAGE.is_complete(ctx):
        summary = Manifest.from_json(storage.read_bytes(lay.manifest), where=lay.manifest).to_dict()
        log.info("preprocess: %s is complete; skipping (use --force to redo)", lay.manifest)
        return {**summary, "skipped": True}
    if not spec.data.sources:
        raise UserError("data.sources is empty: nothing to preprocess")
    connect(spec)
    check_capacity(spec, STAGE.demand(spec))
    from ray.data import DataContext

    flavour = from_name(spec.model.flavour, **spec.model.overrides)
    sources = [resolve_source(storage, lay, i, s, spec.data.prompt_seed) for i, s in enumerate(spec.data.sources)]
    t0 = time.time()
    _clear_output(storage, lay, keep_finished_blocks=not force, spec=spec)
    tokenizer = prepare_tokenizer(spec, flavour, storage, lay, sources)
    config = TilerConfig.from_flavour(flavour, max_seq_len=spec.data.max_seq_len, overflow=spec.data.overflow,
                                      max_pixels=spec.data.max_image_pixels, codec=spec.data.image_codec,
                                      max_image_bytes=spec.data.max_image_bytes)
    tmp_uri = _blocks_dir(storage, lay, config, tokenizer)
    options = DataContext.get_current().execution_options
    old_order, options.preserve_order = options.preserve_order, True  # determinism (see module doc)
    try:
        with stall_watch("preprocess"):
            epochs = _epochs(spec, sources)
            manifest = _run_graph(spec, flavour, storage, lay, sources, tokenizer, config, tmp_uri, epochs)
    finally:
        options.preserve_order = old_order
    limit = spec.data.max_quarantine_fraction
    manifest = replace(manifest, seconds=round(time.time() - t0, 2),
                       quarantine_gate=QuarantineGate.check(manifest.counts, limit))
    # written even when the gate fails (the counts are the report); is_complete and training
    # read the gate from it, so a failed run is never taken as done
    storage.write_bytes(lay.manifest, manifest.to_json().encode())
    summary = {**manifest.to_dict(), "errors_uri": lay.errors}
    if not manifest.quarantine_gate.passed:
        raise QuarantineError(summary, limit)
    return summary


# ----------------------------------------------------------------------------- the graph


def _parse_json_batch(batch: pa.Table, *, source: str, ratio: float, image_root: Optional[str],
                      image_prefixes: tuple[str, ...], fmt: str, file_nos: dict, reading: Reading,
                      side_fs: Optional[pafs.FileSystem]) -> pa.Table:
    side = load_side(side_fs, reading)
    out = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        out += raw.parse_json_file(data, path, source=source, ratio=ratio, image_root=image_root,
                                   image_prefixes=image_prefixes, fmt=fmt, file_no=file_nos.get(path),
                                   reading=reading, side=side)
    return raw.to_table(out)


def _parse_wds_batch(batch: pa.Table, *, source: str, ratio: float) -> pa.Table:
    return raw.to_table([raw.wds_row(s, source=source, ratio=ratio) for s in batch.to_pylist()])


def _parse_parquet_batch(batch: pa.Table, *, source: str, ratio: float, reading: Reading,
                         image_root: Optional[str], image_prefixes: tuple[str, ...]) -> pa.Table:
    return raw.to_table([row for i, r in enumerate(batch.to_pylist())
                         for row in raw.parquet_rows(r, i, source=source, ratio=ratio, reading=reading,
                                                     image_root=image_root, image_prefixes=image_prefixes)])


def _epochs(spec: ClusterSpec, sources: list[Source]) -> dict[str, float]:
    """Each source's ``epochs`` (``actors.data.mixture``): ratio x weight, times the temperature
    factor when ``data.mixture_temperature`` is set, for which every source is parsed once first to
    count its records (the parse step only: no image is read)."""
    temperature = spec.data.mixture_temperature
    sizes = None
    if temperature is not None:  # one pass over every source's parse step, its source column alone
        datasets = [_raw_dataset(s, 1.0).select_columns(["source"]) for s in sources]
        sizes = {s.spec.name: 0 for s in sources}
        every = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        for batch in every.iter_batches(batch_size=None, batch_format="pyarrow"):
            for name, n in Counter(batch.column("source").to_pylist()).items():
                sizes[name] += n
        log.info("preprocess: source sizes for data.mixture_temperature=%g: %s", temperature, sizes)
    return mixture.plan([(s.spec.name, s.spec.ratio, s.spec.weight) for s in sources], sizes, temperature)


def _raw_dataset(src: Source, ratio: float):
    """The raw rows of one source (a lazy Ray Dataset in record order); each record written
    ``ratio`` times on average (its ``epochs``).

    Reading and parsing reserve no CPU: they are I/O-bound and light next to decoding, and an
    actor pool as large as the CPUs would otherwise leave them none (Ray Data would stall).
    """
    import ray.data

    name = src.spec.name
    files = list(src.files)
    light = dict(num_cpus=0, batch_format="pyarrow")
    if src.format == "webdataset":
        ds = ray.data.read_webdataset(files, filesystem=src.filesystem, decoder=None, num_cpus=0)
        return ds.map_batches(_parse_wds_batch, batch_size=_BATCH_ROWS, fn_kwargs=dict(source=name, ratio=ratio),
                              **light)
    if src.format == "parquet":
        ds = read_parquet_cpu_free(files, filesystem=src.filesystem, num_cpus=0)
        return ds.map_batches(_parse_parquet_batch, batch_size=_BATCH_ROWS,
                              fn_kwargs=dict(source=name, ratio=ratio, reading=src.reading, image_root=src.image_root,
                                             image_prefixes=src.image_prefixes), **light)
    ds = ray.data.read_binary_files(files, filesystem=src.filesystem, include_paths=True, num_cpus=0)
    file_nos = {p: i for i, p in enumerate(files)} if len(files) > 1 else {}
    return ds.map_batches(_parse_json_batch, batch_size=1, **light,
                          fn_kwargs=dict(source=name, ratio=ratio, image_root=src.image_root,
                                         image_prefixes=src.image_prefixes, fmt=src.format, file_nos=file_nos,
                                         reading=src.reading, side_fs=src.side_filesystem))


def _shard_blocks(ds, rows: int):
    """Re-cut a source's raw rows into blocks of at most ``rows`` rows (streaming, order kept).

    One block becomes one shard (see module doc). A JSON file parses into ONE block; the
    re-cut splits it (and joins small ones), deterministically for the same inputs. It runs in
    the (CPU-free) parse tasks (``pipelines.upstream.repartition_without_cpus``).
    """
    return repartition_without_cpus(ds.repartition(target_num_rows_per_block=rows))


def _all_raw(sources: list[Source], rows_per_shard: int, epochs: dict[str, float]):
    datasets = [_shard_blocks(_raw_dataset(s, epochs[s.spec.name]), rows_per_shard) for s in sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _run_graph(spec: ClusterSpec, flavour: Flavour, storage: Storage, lay: Layout, sources: list[Source],
               tokenizer, config: TilerConfig, tmp_uri: str, epochs: dict[str, float]) -> Manifest:
    remote: dict[str, Any] = {}
    if spec.data.group is not None:
        remote["resources"] = placement(spec, spec.data.group)
    import ray.data

    fs, out_dir = storage.resolve(lay.shards)
    _, tmp_dir = storage.resolve(tmp_uri)
    ds = _all_raw(sources, spec.data.rows_per_shard, epochs).map_batches(
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
    tally = Tally()
    _, errors_dir = storage.resolve(lay.errors)
    errors = ShardWriter(fs, errors_dir, spec.data.rows_per_shard, BOOK_SCHEMA, ERROR_COLUMNS)
    for book, kind in zip(books, kinds):
        errors.write(tally.add(book, kind))
    errors.close()
    names = _finish_shards(fs, out_dir, tmp_dir, books, kinds)
    storage.delete(lay.shards_tmp)
    return _manifest(spec, flavour, tokenizer, config, tally, names, errors.names, _mix(sources, epochs))


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


def _mix(sources: list[Source], epochs: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per source, what the manifest says of its place in the mix (``SourceCounts``' version-3 fields)."""
    out = {}
    for s in sources:
        kind = s.reading.prompt or (LAYOUTS[s.reading.layout].prompt if s.reading.layout in LAYOUTS else None)
        out[s.spec.name] = dict(layout=s.reading.layout, prompt=kind,
                                prompt_templates=prompts.templates_of(kind) if kind else (),
                                weight=s.spec.weight, epochs=round(epochs[s.spec.name], 6))
    return out


def _manifest(spec: ClusterSpec, flavour: Flavour, tokenizer, config: TilerConfig, tally: Tally,
              shards: list[str], errors: list[str], mix: dict[str, dict[str, Any]]) -> Manifest:
    counts, per_source = tally.counts(spec.data.sources, mix)
    return Manifest(
        flavour=flavour.name, shard_format=SHARD_FORMAT, shards=tuple(shards),
        error_shards=tuple(f"errors/{n}" for n in errors), tiling=Tiling.from_flavour(flavour),
        tokenizer=TokenizerFacts.of(tokenizer), max_seq_len=spec.data.max_seq_len, overflow=spec.data.overflow,
        max_image_pixels=spec.data.max_image_pixels, counts=counts, rows_reused=tally.rows_reused(),
        tokens=tally.tokens(), image_bytes=tally.image_bytes(config.codec), sources=per_source,
        code_version=code_version(), seconds=0.0, mixture_temperature=spec.data.mixture_temperature,
    )


def _by_source(table: pa.Table, order: dict[str, int]) -> list[tuple[int, pa.Table]]:
    """``table``'s rows split by source -> [(source index, rows in order)]."""
    if table.num_rows == 0:
        return []
    names = table.column("source").to_pylist()
    if len(set(names)) == 1:
        return [(order[names[0]], table)]
    return [(order[n], take(table, [i for i, m in enumerate(names) if m == n])) for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------- helpers


def _clear_output(storage: Storage, lay: Layout, *, keep_finished_blocks: bool,
                  spec: Optional[ClusterSpec] = None) -> None:
    """Delete the manifest first (the output is incomplete from now on), then old shards; the
    blocks an interrupted run finished (under ``_tmp/``) stay unless ``keep_finished_blocks`` is off.

    With ``keep_finished_blocks`` off (``--force``) and a ``spec``, ``data.output`` is checked first
    (``cluster.output_guard``): never a root, a home folder or a folder holding the sources."""
    if not keep_finished_blocks and spec is not None:
        check_force_output(spec, "data.output", lay.root)
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

    facts = {"tiler": dataclasses.asdict(config), "format": SHARD_FORMAT, "code": code_version(),
             "vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    key = hashlib.blake2b(json.dumps(facts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    base = lay.shards_tmp.rstrip("/")
    for run in {uri[len(base):].strip("/").split("/")[0] for uri in storage.list(base)} - {key}:
        storage.delete(run_layout.join(base, run))
    return run_layout.join(base, key)
