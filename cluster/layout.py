"""The run layout (docs/architecture.md "Run layout"): every path a run reads or writes, derived
from the spec once. No other module types a run path; each stage's "complete" test reads
these paths (``pipelines.stages``).

One rule resolves every path setting (``data.sources[].path``/``image_root``, ``data.output``,
``train.output``, ``model.weights``/``tokenizer``, ``serve.models[].checkpoint``): a relative
path is under ``storage.uri``; an ``s3://`` URI or an absolute local path is taken as given.

    >>> lay = Layout.from_spec(spec, storage_uri="s3://sphinx-x/runs/local")
    >>> lay.shards, lay.manifest
    ('s3://sphinx-x/runs/local/shards', 's3://sphinx-x/runs/local/shards/_manifest.json')
    >>> lay.export                       # train.output: /data/train (absolute: as given)
    '/data/train/export'

    <data.output>/                 preprocess
        part-00000.parquet ...       shards (renamed from _tmp/ in source order)
        errors/part-00000.parquet    quarantined rows with their reason
        tokenizer/                   the tokenizer every later stage uses
        _tmp/                        the tiler actors' files until the driver renames them
        _manifest.json               written last: the stage is complete
    <train.output>/                train
        checkpoints/checkpoint_*/    Ray Train run (DeepSpeed shards of every rank)
        metrics.jsonl, loss.png      rank 0's per-step history
        export_check.pt, export.json a fixed batch + the trained engine's logits; export summary
        export/ ... export/_SUCCESS  the consolidated model directory, _SUCCESS written last
        summary.json                 written last: the stage is complete
    <eval.output>/                 eval
        <benchmark>/predictions.jsonl, scores.json   per sample; scores.json written last
        summary.txt, summary.png     one table across benchmarks
        _answers/<model key>/block-*.jsonl           the batch engine's finished blocks
    <curate.som.output>/, <curate.ocr.output>/   curate
        data.jsonl, images/          the curated LLaVA source (data.sources reads it)
        errors.jsonl                 quarantined items: id, reason, detail
        previews/                    a few pictures of curated samples
        _blocks/<key>.jsonl          finished blocks, reused by a rerun
        _manifest.json               written last: counts per reason
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cluster.location import Location
from cluster.spec import ClusterSpec

JOB_SPEC_NAME = "job-spec.yaml"  # the spec, as a Ray Job's working directory carries it
TRAIN_EXPORT = "@train"  # serve.models[].checkpoint naming this run's train export

MANIFEST = "_manifest.json"
SHARD_PREFIX = "part-"
CHECKPOINT_RUN = "checkpoints"  # the Ray Train run name under train.output
SUCCESS = "_SUCCESS"
CURATED_DEFAULTS = {"som": "curated/som", "ocr": "curated/ocr"}  # cluster.spec's curate.*.output defaults


def resolve(base_uri: str, setting: str) -> Location:
    """A path setting -> its Location: relative ones under ``base_uri``, others as given
    (:meth:`cluster.location.Location.parse`; a relative setting never leaves ``base_uri``)."""
    return Location.parse(setting, base=Location.parse(base_uri))


def join(*parts: str) -> Location:
    """``join("s3://b/run", "shards/", "x")`` -> the Location ``s3://b/run/shards/x`` (never above the head)."""
    head, *rest = parts
    return Location.parse(head) / "/".join(p.strip("/") for p in rest if p and p.strip("/"))


def storage_root(spec: ClusterSpec) -> Location:
    """``storage.uri`` as a Location (an s3:// URI or an absolute local path)."""
    return Location.parse(spec.storage.uri)


@dataclass(frozen=True)
class Layout:
    """Every path of one run (see the module docstring), each a :class:`~cluster.location.Location`
    (a URI string that also knows its bucket, key, name, parent and children): picklable, typed."""

    root: Location
    shards: Location
    train: Location
    evals: Location  # eval.output
    curated_som: Location  # curate.som.output (its default when the spec has no curate.som)
    curated_ocr: Location  # curate.ocr.output

    @classmethod
    def from_spec(cls, spec: ClusterSpec, storage_uri: Optional[str] = None) -> "Layout":
        root = Location.parse(storage_uri) if storage_uri else storage_root(spec)
        cur = spec.curate
        return cls(root=root, shards=resolve(root, spec.data.output), train=resolve(root, spec.train.output),
                   evals=resolve(root, spec.eval.output),
                   curated_som=resolve(root, cur.som.output if cur.som else CURATED_DEFAULTS["som"]),
                   curated_ocr=resolve(root, cur.ocr.output if cur.ocr else CURATED_DEFAULTS["ocr"]))

    def path(self, setting: str) -> Location:
        """Any other path setting of the spec, by the one rule."""
        return resolve(self.root, setting)

    # -- preprocess
    @property
    def manifest(self) -> Location:
        return join(self.shards, MANIFEST)

    @property
    def errors(self) -> Location:
        return join(self.shards, "errors")

    @property
    def tokenizer(self) -> Location:
        return join(self.shards, "tokenizer")

    @property
    def shards_tmp(self) -> Location:
        return join(self.shards, "_tmp")

    def shard(self, k: int) -> Location:
        return join(self.shards, shard_name(k))

    # -- train
    @property
    def checkpoints(self) -> Location:
        return join(self.train, CHECKPOINT_RUN)

    @property
    def metrics(self) -> Location:
        return join(self.train, "metrics.jsonl")

    @property
    def loss_png(self) -> Location:
        return join(self.train, "loss.png")

    @property
    def export(self) -> Location:
        return join(self.train, "export")

    @property
    def export_success(self) -> Location:
        return join(self.export, SUCCESS)

    @property
    def export_check(self) -> Location:
        return join(self.train, "export_check.pt")

    @property
    def export_summary(self) -> Location:
        return join(self.train, "export.json")

    @property
    def train_summary(self) -> Location:
        return join(self.train, "summary.json")

    # -- serve
    def checkpoint(self, setting: str) -> Location:
        """A ``serve.models[].checkpoint``: ``@train`` is this run's export; others by the rule."""
        return self.export if setting == TRAIN_EXPORT else self.path(setting)

    # -- eval
    def eval_dir(self, benchmark: str) -> Location:
        return join(self.evals, benchmark)

    def eval_predictions(self, benchmark: str) -> Location:
        return join(self.evals, benchmark, "predictions.jsonl")

    def eval_scores(self, benchmark: str) -> Location:
        return join(self.evals, benchmark, "scores.json")

    @property
    def eval_summary_txt(self) -> Location:
        return join(self.evals, "summary.txt")

    @property
    def eval_summary_png(self) -> Location:
        return join(self.evals, "summary.png")

    @property
    def eval_answers(self) -> Location:
        """The batch engine's finished blocks (reused by a rerun on the same model)."""
        return join(self.evals, "_answers")

    # -- curate (kind: "som" | "ocr")
    def curated(self, kind: str) -> Location:
        return {"som": self.curated_som, "ocr": self.curated_ocr}[kind]

    def curated_records(self, kind: str) -> Location:
        """The LLaVA JSONL source ``data.sources`` reads (images under ``images/`` beside it)."""
        return join(self.curated(kind), "data.jsonl")

    def curated_images(self, kind: str) -> Location:
        return join(self.curated(kind), "images")

    def curated_errors(self, kind: str) -> Location:
        return join(self.curated(kind), "errors.jsonl")

    def curated_manifest(self, kind: str) -> Location:
        return join(self.curated(kind), MANIFEST)

    def curated_previews(self, kind: str) -> Location:
        return join(self.curated(kind), "previews")

    def curated_blocks(self, kind: str) -> Location:
        """Finished blocks (records + errors of one task), reused by a rerun without --force."""
        return join(self.curated(kind), "_blocks")


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:05d}.parquet"


def is_shard(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(SHARD_PREFIX) and base.endswith(".parquet")
