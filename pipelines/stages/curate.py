"""`sphinx-x curate {som,ocr,all} SPEC`: curated sets as Ray Data stages (docs/architecture.md "Stages").

Two kinds, each from its ``curate:`` section (``cluster.spec.CurateSection``), each writing a LLaVA
JSONL source that ``data.sources`` reads as it is (``format: jsonl``; images beside it)::

    curate.som: COCO instances + images ──► marked images + mark questions   (actors.curate.som)
    curate.ocr: PDFs / page images     ──► page images + transcription,        (actors.curate.ocr)
                                           text-of-region, where-is-this-text

    <output>/data.jsonl        {"id", "image": "images/<id>.png", "conversations": [...], ...}  the source
    <output>/images/           the images data.jsonl names
    <output>/errors.jsonl      quarantined inputs: {"id", "reason", "detail"}
    <output>/previews/         a few curated samples drawn with their boxes beside their tiles, for a person
    <output>/_blocks/<k>.jsonl finished blocks (reused by a rerun without --force)
    <output>/_manifest.json    counts per reason, written last: the kind is complete

The graph: the driver lists the inputs (the COCO images; the files under ``curate.ocr.input``)
and cuts them into blocks of ``curate.block_size``, each keyed by a hash of its items, the
section's settings and the code version; Ray Data maps the blocks over ``curate.concurrency``
actors of ``curate.num_cpus_per_worker`` CPUs (``actors.curate.outcome.BlockRunner``): a block
writes its images, then its block file last, so a rerun after a crash redoes only unfinished
blocks. The driver then reads the block files in order (``preserve_order``): quarantined inputs
go to ``errors.jsonl``, OCR pages whose text was seen before are dropped as ``duplicate``
(content hash, first kept), and the rest is ``data.jsonl``. Counts:
``items == samples + quarantined`` (an OCR item is a page; a PDF that cannot be opened counts as
one quarantined item).

    $ sphinx-x curate som spec.yaml            # only curate.som
    $ sphinx-x curate all spec.yaml --force    # both, redone
    $ sphinx-x run spec.yaml                   # curate (both kinds the spec has), then preprocess, ...
    $ sphinx-x curate ocr --input docs/ -o out/ocr          # one-off: no spec, local storage at OUT
    $ sphinx-x curate som --annotations instances.json --images val2017/ -o out/som
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import time
from functools import partial
from typing import Any, Callable

from cluster.capacity import Demand, Work, check_capacity
from cluster.connect import connect
from cluster.layout import Layout, join
from cluster.location import Location
from cluster.logs import Progress
from cluster.placement import placement
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec
from cluster.storage import Storage
from models.errors import UserError
from pipelines.provenance import code_version
from pipelines.stage import StageBase

log = logging.getLogger(__name__)

KINDS = ("som", "ocr")
MANIFEST_VERSION = 1


class CurateStage(StageBase):
    name = "curate"
    help = "curate Set-of-Mark (som) and OCR-intensive (ocr) sets into sources data.sources reads"
    spec_optional = True  # the one-off form: `curate ocr --input DIR -o OUT`

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("kind", choices=[*KINDS, "all"], help="which curate section to run (all: every one the spec has)")
        parser.add_argument("--input", default=None, metavar="PREFIX", help="one-off ocr: PDFs / page images under it")
        parser.add_argument("--engine", default="none", choices=["none", "tesseract"],
                            help="one-off ocr: the engine for pages without a text layer")
        parser.add_argument("--annotations", default=None, metavar="JSON", help="one-off som: a COCO instances file")
        parser.add_argument("--images", default=None, metavar="DIR", help="one-off som: where its file_names are")
        parser.add_argument("-o", "--output", default=None, metavar="OUT",
                            help="one-off: where the curated source goes (OUT/som and OUT/ocr with all)")

    def one_off_spec(self, args: argparse.Namespace) -> ClusterSpec:
        """The spec of `sphinx-x curate ocr --input DIR -o OUT` / `curate som --annotations F --images DIR -o OUT`:
        local storage at OUT (inputs: local paths, or s3:// read with the AWS environment)."""
        from cluster.spec import parse_spec

        kinds = list(KINDS) if args.kind == "all" else [args.kind]
        missing = [flag for kind, flags in (("ocr", ("input",)), ("som", ("annotations", "images"))) if kind in kinds
                   for flag in flags if not getattr(args, flag)]
        if not args.output or missing:
            raise UserError("sphinx-x curate: give a SPEC, or -o OUT with --input (ocr) / --annotations and --images "
                            f"(som){'; missing --' + ', --'.join(missing) if missing else ''}")
        here = lambda p: p if "://" in p else os.path.abspath(p)  # noqa: E731
        out = here(args.output)
        section: dict[str, Any] = {}
        if "ocr" in kinds:
            section["ocr"] = {"input": here(args.input), "engine": args.engine, "output": out if len(kinds) == 1 else "ocr"}
        if "som" in kinds:
            section["som"] = {"annotations": here(args.annotations), "images": here(args.images),
                              "output": out if len(kinds) == 1 else "som"}
        return parse_spec({"name": "curate", "storage": {"uri": out, "endpoint_url": None}, "curate": section})

    def used(self, spec: ClusterSpec) -> bool:
        return bool(kinds_of(spec))

    def demand(self, spec: ClusterSpec) -> Demand:
        c = spec.curate
        if not kinds_of(spec):
            return Demand(self.name)
        return Demand(self.name, (Work("curate actors", c.concurrency,
                                       {"CPU": c.num_cpus_per_worker, **placement(spec, c.group)}, group=c.group),))

    def outputs(self, layout: Layout) -> dict[str, str]:
        return {f"{k}_{what}": getattr(layout, f"curated_{what}")(k) for k in KINDS
                for what in ("records", "errors", "manifest")}

    def is_complete(self, ctx: RunContext) -> bool:
        return all(ctx.storage.exists(ctx.layout.curated_manifest(k)) for k in _kinds(ctx))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        kinds = _kinds(ctx)
        if not kinds:
            return {"skipped": True, "why": "the spec has no curate.som / curate.ocr"}
        summary: dict[str, Any] = {}
        for kind in kinds:
            if not ctx.force and ctx.storage.exists(ctx.layout.curated_manifest(kind)):
                summary[kind] = {**read_manifest(ctx.storage, ctx.layout, kind), "skipped": True}
                continue
            summary[kind] = curate(ctx, kind)
        # the totals `run` prints in its one line per stage (pipelines.stage.short_summary)
        summary["rows_written"] = sum(summary[k]["records"] for k in kinds)
        summary["rows_quarantined"] = sum(sum(summary[k]["quarantined"].values()) for k in kinds)
        return summary

    def report(self, ctx: RunContext, summary: dict[str, Any]) -> None:
        for kind in KINDS:
            if kind in summary:
                print(format_summary(summary[kind]), flush=True)
        if "why" in summary:
            print(f"curate: nothing to do ({summary['why']})", flush=True)


STAGE = CurateStage()


def kinds_of(spec: ClusterSpec) -> list[str]:
    return [k for k in KINDS if getattr(spec.curate, k) is not None]


def _kinds(ctx: RunContext) -> list[str]:
    """The kinds this command runs: the verb's ``kind`` (``all``/none under `run`: every configured one)."""
    asked = ctx.option("kind")
    configured = kinds_of(ctx.spec)
    if asked in (None, "all"):
        return configured
    if asked not in configured:
        raise UserError(f"curate {asked}: the spec has no curate.{asked} section")
    return [asked]


def run_stage(spec: ClusterSpec, *, kind: str = "all", force: bool = False) -> dict:
    """``STAGE.run`` on a context built here (tests and benchmarks call this)."""
    return STAGE.run(RunContext.build(spec, force=force, options={"kind": kind}))


def read_manifest(storage: Storage, layout: Layout, kind: str) -> dict:
    return json.loads(storage.read_bytes(layout.curated_manifest(kind)))


def format_summary(m: dict) -> str:
    q = ", ".join(f"{r} {n}" for r, n in sorted(m.get("quarantined", {}).items())) or "none"
    return (f"curate {m['kind']}: {m['items']} items -> {m['samples']} samples ({m['records']} records) in "
            f"{m['seconds']:.1f}s; quarantined: {q}" + ("  [already complete]" if m.get("skipped") else "")
            + f"\n  source: {m['source']['path']}")


# ----------------------------------------------------------------------------- the graph


def curate(ctx: RunContext, kind: str) -> dict:
    spec, storage, lay = ctx.spec, ctx.storage, ctx.layout
    t0 = time.time()
    inputs = _inputs(ctx, kind)
    items, early = inputs["items"], inputs["quarantined"]
    _clear(storage, lay, kind, force=ctx.force)
    fingerprint = {"section": getattr(spec.curate, kind).model_dump(mode="json"), "code": code_version(),
                   "extra": inputs["fingerprint"]}
    size = spec.curate.block_size
    blocks = [items[i:i + size] for i in range(0, len(items), size)]
    keys = [_block_key(b, fingerprint) for b in blocks]
    blocks_dir = lay.curated_blocks(kind)
    for uri in storage.list(blocks_dir):  # blocks of other settings or inputs: never reused
        if uri.rsplit("/", 1)[-1].removesuffix(".jsonl") not in set(keys):
            storage.delete(uri)
    t1 = time.time()
    reused, busy = _run_blocks(spec, storage, kind, [{"key": k, "items": json.dumps(b)} for k, b in zip(keys, blocks)],
                         inputs["work"], lay.curated(kind), blocks_dir)
    t2 = time.time()
    outcomes = list(early) + [o for k in keys for o in _read_block(storage, blocks_dir, k)]
    manifest = _assemble(ctx, kind, outcomes, inputs["other_files"])
    manifest.update(seconds=round(time.time() - t0, 2), blocks=len(blocks), blocks_reused=reused,
                    phases={"inputs": round(t1 - t0, 2), "blocks": round(t2 - t1, 2), "assemble": round(time.time() - t2, 2),
                            "workers_busy": round(busy, 2)},
                    code_version=code_version())
    storage.write_bytes(lay.curated_manifest(kind), json.dumps(manifest, indent=1).encode())
    return manifest


def _block_key(items: list, fingerprint: dict) -> str:
    blob = json.dumps({"items": items, "fp": fingerprint}, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def _run_blocks(spec: ClusterSpec, storage: Storage, kind: str, rows: list[dict], work: Callable,
                out_dir: str, blocks_dir: str) -> tuple[int, float]:
    """Ray Data over the blocks; returns how many were reused from an earlier run and the seconds
    the workers spent on blocks (summed over workers)."""
    if not rows:
        return 0, 0.0
    from actors.curate.outcome import BlockRunner

    connect(spec)
    check_capacity(spec, STAGE.demand(spec))
    import ray.data
    from ray.data import DataContext

    c = spec.curate
    remote: dict[str, Any] = {"resources": placement(spec, c.group)} if c.group else {}
    # an actor pool, as preprocess's tilers: Ray Data's resource budget ran a task pool one task at
    # a time on a 2-CPU head ("backpressured: ResourceBudget"); the actors hold their CPUs and all run
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        BlockRunner, fn_constructor_kwargs=dict(storage=storage, out_dir=out_dir, blocks_dir=blocks_dir, work=work),
        num_cpus=c.num_cpus_per_worker, compute=ray.data.ActorPoolStrategy(size=min(c.concurrency, len(rows))),
        **remote)
    options = DataContext.get_current().execution_options
    old, options.preserve_order = options.preserve_order, True
    done = reused = 0
    busy = 0.0
    progress = Progress(f"curate {kind}", total=len(rows), unit="blocks")
    try:
        for row in ds.iter_rows():
            done += 1
            reused += bool(row["reused"])
            busy += float(row["seconds"])
            progress.update(done, reused=reused)
    finally:
        options.preserve_order = old
        progress.close()
    return reused, busy


def _read_block(storage: Storage, blocks_dir: str, key: str) -> list[dict]:
    from actors.curate.outcome import read_block

    return read_block(storage, blocks_dir, key)


def _assemble(ctx: RunContext, kind: str, outcomes: list[dict], other_files: int) -> dict:
    """Block outcomes in order -> data.jsonl, errors.jsonl, previews; returns the manifest's counts."""
    storage, lay = ctx.storage, ctx.layout
    records, errors, seen, counts, quarantined = [], [], {}, {}, {}
    previews = []
    samples = 0
    for o in outcomes:
        for k, v in (o.get("counts") or {}).items():
            counts[k] = counts.get(k, 0) + v
        reason, detail = o.get("reason"), o.get("detail", "")
        if not reason and o.get("key"):
            if o["key"] in seen:
                reason, detail = "duplicate", f"the same text as {seen[o['key']]}"
            else:
                seen[o["key"]] = o["id"]
        if reason:
            quarantined[reason] = quarantined.get(reason, 0) + 1
            errors.append({"id": o["id"], "reason": reason, "detail": detail})
            continue
        samples += 1
        records += o["records"]
        if len(previews) < ctx.spec.curate.previews and o.get("preview"):
            previews.append((o["id"], o["preview"]))
    storage.write_bytes(lay.curated_records(kind), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in records).encode())
    storage.write_bytes(lay.curated_errors(kind), "".join(json.dumps(e) + "\n" for e in errors).encode())
    _write_previews(ctx, kind, previews)
    _drop_unused_images(storage, lay, kind, {r["image"] for r in records if isinstance(r.get("image"), str)})
    section = getattr(ctx.spec.curate, kind)
    return {"version": MANIFEST_VERSION, "kind": kind, "items": len(outcomes), "samples": samples,
            "records": len(records), "quarantined": dict(sorted(quarantined.items())), "counts": dict(sorted(counts.items())),
            "other_files": other_files, "teacher": section.teacher.model if kind == "som" and section.teacher else None,
            "source": {"path": lay.curated_records(kind).uri, "format": "jsonl",
                       "image_root": lay.curated(kind).uri},
            "errors": lay.curated_errors(kind).uri, "previews": lay.curated_previews(kind).uri}


def _write_previews(ctx: RunContext, kind: str, previews: list[tuple[str, dict]]) -> None:
    """``previews/NN.png``, as `sphinx-x tiles` draws: the sample's image with its boxes (marks'
    regions, text lines) in red, beside the canvas the model sees (kept and skipped tiles)."""
    from PIL import Image, ImageDraw

    from models.flavours import from_name
    from models.tiling import TileSpec, load_and_tile
    from pipelines.tiles import describe, render_png

    storage, lay = ctx.storage, ctx.layout
    flavour = from_name(ctx.spec.model.flavour, **ctx.spec.model.overrides)
    tile = TileSpec.from_flavour(flavour)
    for n, (sid, p) in enumerate(previews):
        data = storage.read_bytes(join(lay.curated(kind), p["image"]))
        image = Image.open(io.BytesIO(data)).convert("RGB")
        draw = ImageDraw.Draw(image)
        width = max(1, round(min(image.size) / 300))
        for box in p.get("boxes", []):
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 0, 0), width=width)
        tiled = load_and_tile(data, tile)
        tiles = render_png(tiled, tile, {**describe(tiled, tile, flavour.tokens_per_view), "image": sid,
                                         "flavour": flavour.name})
        scale = tiles.height / image.height
        shown = image.resize((max(1, round(image.width * scale)), tiles.height))
        out = Image.new("RGB", (shown.width + tiles.width, tiles.height), (255, 255, 255))
        out.paste(shown, (0, 0))
        out.paste(tiles, (shown.width, 0))
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        storage.write_bytes(join(lay.curated_previews(kind), f"{n:02d}.png"), buf.getvalue())


def _drop_unused_images(storage: Storage, lay: Layout, kind: str, used: set[str]) -> None:
    base = lay.curated(kind)
    for uri in storage.list(lay.curated_images(kind)):
        if Location.parse(uri).relative_to(base) not in used:
            storage.delete(uri)


def _clear(storage: Storage, lay: Layout, kind: str, *, force: bool) -> None:
    """The manifest first (incomplete from now on), then what is rebuilt from the blocks; with
    ``--force`` the finished blocks and images too. Only these names are deleted, never the folder."""
    for uri in (lay.curated_manifest(kind), lay.curated_records(kind), lay.curated_errors(kind),
                lay.curated_previews(kind)):
        storage.delete(uri)
    if force:
        storage.delete(lay.curated_blocks(kind))
        storage.delete(lay.curated_images(kind))


# ----------------------------------------------------------------------------- inputs


def _inputs(ctx: RunContext, kind: str) -> dict:
    return _som_inputs(ctx) if kind == "som" else _ocr_inputs(ctx)


def _som_inputs(ctx: RunContext) -> dict:
    """The COCO file -> one item per image; an image entry without a usable ``file_name`` is
    quarantined here (``bad_annotation`` / ``outside_root``)."""
    from actors.curate.regions import index_coco
    from actors.curate.som import SomConfig, curate_image

    section, storage, lay = ctx.spec.curate.som, ctx.storage, ctx.layout
    ann_uri = lay.path(section.annotations)
    if not storage.exists(ann_uri):
        raise UserError(f"curate.som.annotations: {ann_uri.uri} does not exist")
    try:
        coco = index_coco(json.loads(storage.read_bytes(ann_uri)))
    except ValueError as err:
        raise UserError(f"curate.som.annotations: {ann_uri.uri}: {err}") from None
    root = lay.path(section.images)
    items, early = [], []
    for img in coco["images"]:
        sid = f"som:{img.get('id')}"
        name, w, h = img.get("file_name"), img.get("width"), img.get("height")
        if not isinstance(name, str) or not name or not all(isinstance(v, int) and v > 0 for v in (w, h)):
            early.append({"id": sid, "reason": "bad_annotation", "detail": f"image entry {str(img)[:120]} needs "
                          "file_name, width and height", "records": [], "counts": {}})
            continue
        try:
            uri = root / name
        except UserError as err:
            early.append({"id": sid, "reason": "outside_root", "detail": str(err)[:300], "records": [], "counts": {}})
            continue
        items.append({"id": sid, "image": uri.uri, "width": w, "height": h,
                      "annotations": coco["by_image"].get(img.get("id"), [])})
    from models.flavours import from_name
    from models.tiling import TileSpec

    tile = TileSpec.from_flavour(from_name(ctx.spec.model.flavour, **ctx.spec.model.overrides))
    config = SomConfig(section=section, categories=coco["categories"], max_image_bytes=ctx.spec.data.max_image_bytes,
                       max_image_pixels=ctx.spec.data.max_image_pixels, tile=tile)
    return {"items": items, "quarantined": early, "other_files": 0,
            "work": partial(curate_image, config=config, storage=storage),
            "fingerprint": {"categories": {str(k): v for k, v in sorted(coco["categories"].items(), key=str)},
                            "max_image_bytes": config.max_image_bytes, "tile": repr(tile)}}


def _ocr_inputs(ctx: RunContext) -> dict:
    from actors.curate.ocr import OcrConfig, curate_file, input_kind

    section, storage, lay = ctx.spec.curate.ocr, ctx.storage, ctx.layout
    prefix = lay.path(section.input)
    files = sorted(storage.list(prefix))
    if not files:
        raise UserError(f"curate.ocr.input: nothing under {prefix.uri}")
    outputs = [lay.curated(k) for k in KINDS]  # an output inside the input prefix is never read back
    locs = [loc for loc in map(Location.parse, files) if not any(loc.is_under(o) for o in outputs)]
    items = [{"id": loc.relative_to(prefix) or loc.name, "uri": loc.uri, "kind": input_kind(loc.name)} for loc in locs]
    config = OcrConfig.from_spec(ctx.spec)
    if section.engine == "tesseract":
        from actors.curate.ocr_engine import check_tesseract

        check_tesseract(section.engine_languages)  # fails clearly, before any task starts
    wanted = [i for i in items if i["kind"] is not None]
    return {"items": wanted, "quarantined": [], "other_files": len(items) - len(wanted),
            "work": partial(curate_file, config=config, storage=storage), "fingerprint": config.fingerprint()}
