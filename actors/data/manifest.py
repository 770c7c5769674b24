"""The contract between preprocess and training: the shard schema and ``_manifest.json``.

Preprocess (``pipelines.stages.preprocess``) and the synthetic shards
(``pipelines.demo.synthetic_shards``) build a :class:`Manifest` and write it last, beside the
shards; training (``pipelines.stages.train``) only loads it and checks it against its model.

    >>> m = Manifest.from_json(storage.read_bytes(lay.manifest), where=lay.manifest)
    >>> m.shards, m.tiling.tile.grid, m.tokenizer.vocab_size, m.counts.rows_written
    (('part-00000.parquet', 'part-00001.parquet'), 2, 400, 48)

On disk the keys are flat as they always were (``rows_written``, ``tiling``, ``vocab_size``,
``sources``…) plus ``version``. A file without ``version`` is version 1 (written before the key
existed). Version 2 adds ``quarantine_gate`` (``{"max_quarantine_fraction": 0.05, "passed":
false}``, or null where no gate ran: the synthetic shards); a version-1 file has no gate recorded
and is judged by its counts alone (:meth:`Manifest.gate_failure`). Version 3 adds the mix: per
source its ``layout``, ``prompt`` (the kind, null for conversations) and ``prompt_templates`` (every
template its rows may have been asked with), ``weight`` and ``epochs`` (how often each record is
written on average: ratio x weight x the temperature factor), and ``mixture_temperature`` at the
top (null: off); older files read as layout ``llava``, no prompt, weight 1, epochs = ratio.
Reading a newer version, or a
file with a key missing or of the wrong type, raises ``UserError`` naming the key; keys this
version does not know are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from models.errors import UserError
from models.tiling import TileSpec

VERSION = 3  # the manifest layout this code writes (it reads 1 to 3; see from_dict)

# What the shards hold: 1 = raw views (before 2026-12); 2 = compressed scaled images + plans.
SHARD_FORMAT = 2

# The shard columns (format 2): one row per written copy of a good record.
SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),                  # sample id (generated ``source:index`` if absent)
    ("source", pa.string()),              # source name
    ("input_ids", pa.list_(pa.int32())),  # images expanded to their image tokens
    ("labels", pa.list_(pa.int32())),     # -100 off assistant spans
    ("num_tokens", pa.int32()),           # len(input_ids): length grouping
    ("text_tokens", pa.int32()),
    ("image_tokens", pa.int32()),
    ("saved_tokens", pa.int32()),         # tokens the skip tokens saved
    ("images", pa.list_(pa.binary())),    # per image: the scaled image, lossless (models.stored_image)
    ("plans", pa.list_(pa.int32())),      # per image w', h', x0, y0, concatenated
    ("view_counts", pa.list_(pa.int32())),  # views per image (1 + kept)
    ("kept", pa.list_(pa.bool_())),       # G*G per image, concatenated
    ("tile_size", pa.int32()),            # S
    ("grid", pa.int32()),                 # G
])


def shard_schema(shard_format: int = SHARD_FORMAT) -> pa.Schema:
    """The shard columns of ``shard_format``: 2 is :data:`SHARD_SCHEMA`; 1 held the cut views
    (``views``: binary, uint8 [V, S, S, 3]) instead of ``images`` + ``plans``."""
    if shard_format == 2:
        return SHARD_SCHEMA
    if shard_format == 1:
        return pa.schema([f for f in SHARD_SCHEMA if f.name not in ("images", "plans")] + [("views", pa.binary())])
    raise UserError(f"shard format {shard_format} is not one this sphinx-x knows (1 or {SHARD_FORMAT})")


# ----------------------------------------------------------------------------- reading


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Keys:
    """Typed access to one JSON object of the manifest; errors name the key's full path."""

    def __init__(self, data: Any, path: str, where: str):
        self.path, self.where = path, where
        if not isinstance(data, dict):
            raise self._error(f"{path.rstrip('.') or 'the manifest'} is not a JSON object")
        self.data = data

    def _error(self, what: str) -> UserError:
        return UserError(f"the shard manifest{f' at {self.where}' if self.where else ''}: {what}; "
                         "rerun `sphinx-x preprocess SPEC --force`")

    def _get(self, key: str, ok, kind: str):
        if key not in self.data:
            raise self._error(f"key {self.path + key!r} is missing")
        value = self.data[key]
        if not ok(value):
            raise self._error(f"key {self.path + key!r} is {type(value).__name__} {value!r:.40}, expected {kind}")
        return value

    def integer(self, key: str) -> int:
        return self._get(key, _is_int, "an integer")

    def number(self, key: str) -> float:
        return float(self._get(key, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"))

    def text(self, key: str) -> str:
        return self._get(key, lambda v: isinstance(v, str), "a string")

    def flag(self, key: str) -> bool:
        return self._get(key, lambda v: isinstance(v, bool), "true or false")

    def texts(self, key: str) -> tuple[str, ...]:
        return tuple(self._get(key, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                               "a list of strings"))

    def integers(self, key: str) -> tuple[int, ...]:
        return tuple(self._get(key, lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
                               "a list of integers"))

    def tally(self, key: str) -> dict[str, int]:
        value = self._get(key, lambda v: isinstance(v, dict) and all(_is_int(x) for x in v.values()),
                          "an object of integers")
        return dict(sorted(value.items()))

    def obj(self, key: str) -> "_Keys":
        return _Keys(self._get(key, lambda v: isinstance(v, dict), "an object"), f"{self.path}{key}.", self.where)


# ----------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Tiling:
    """What the shards' pixels and token layout depend on: the geometry (``models.tiling``),
    tokens per view and where images sit. Training refuses a model whose tiling differs."""

    tile: TileSpec
    tokens_per_view: int
    image_position: str  # models.conversation: "inline" | "after_bos"

    @classmethod
    def from_flavour(cls, flavour: Any) -> "Tiling":
        return cls(tile=TileSpec.from_flavour(flavour), tokens_per_view=flavour.tokens_per_view,
                   image_position=flavour.image_position)

    def to_dict(self) -> dict[str, Any]:
        """``{grid, tile_size, canvas, mean_u8, pad, skip_tokens, tokens_per_view, image_position}``."""
        return {**self.tile.to_dict(), "tokens_per_view": self.tokens_per_view, "image_position": self.image_position}

    @classmethod
    def _read(cls, k: _Keys) -> "Tiling":
        try:
            # resample: recorded only when it is the release's (models.tiling.TileSpec.to_dict)
            resample = k.text("resample") if "resample" in k.data else "project"
            tile = TileSpec(grid=k.integer("grid"), tile_size=k.integer("tile_size"), mean_u8=k.integers("mean_u8"),
                            pad=k.text("pad"), skip_tokens=k.flag("skip_tokens"), resample=resample)
        except ValueError as err:
            raise k._error(f"{k.path.rstrip('.')}: {err}") from None
        return cls(tile=tile, tokens_per_view=k.integer("tokens_per_view"), image_position=k.text("image_position"))


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer the shards were tokenized with (saved at ``path``, relative to the shards)."""

    path: str  # "tokenizer"
    vocab_size: int
    image_token_id: int

    @classmethod
    def of(cls, tokenizer: Any, path: str = "tokenizer") -> "TokenizerFacts":
        from models.conversation import image_token_id

        return cls(path=path, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer))


@dataclass(frozen=True)
class Counts:
    """Rows by fate. ``rows_read`` = ``subsampled_out`` + ``duplicate_samples`` + ``duplicate_images``
    + the records of ``rows_in``; ``rows_in`` = ``rows_written`` + ``rows_quarantined`` (each copy of a
    ``ratio`` > 1 record counts)."""

    rows_read: int
    subsampled_out: int
    duplicate_samples: int
    duplicate_images: int
    rows_in: int
    rows_written: int
    rows_quarantined: int
    rows_truncated: int
    quarantined_by_reason: dict[str, int]

    ROW_COUNTS = ("rows_read", "subsampled_out", "duplicate_samples", "duplicate_images", "rows_in", "rows_written",
             "rows_quarantined", "rows_truncated")

    @classmethod
    def all_written(cls, rows: int) -> "Counts":
        """``rows`` records read, each written once (the synthetic shards)."""
        return cls(rows_read=rows, subsampled_out=0, duplicate_samples=0, duplicate_images=0, rows_in=rows,
                   rows_written=rows, rows_quarantined=0, rows_truncated=0, quarantined_by_reason={})

    def to_dict(self) -> dict[str, Any]:
        return {**{f: getattr(self, f) for f in self.ROW_COUNTS},
                "quarantined_by_reason": dict(self.quarantined_by_reason)}

    @classmethod
    def _fields(cls, k: _Keys) -> dict[str, Any]:
        return {**{f: k.integer(f) for f in cls.ROW_COUNTS}, "quarantined_by_reason": k.tally("quarantined_by_reason")}


@dataclass(frozen=True)
class SourceCounts(Counts):
    """One source's counts, its tokens and image bytes, the spec's ``ratio`` and ``dedup``, and
    (version 3) its place in the mix: ``layout``, ``prompt`` kind and the ``prompt_templates`` its
    rows were asked with, ``weight``, and ``epochs``: how often a record is written on average
    before dedup and quarantine (left out: ``ratio``)."""

    text_tokens: int
    image_tokens: int
    saved_tokens: int
    source_bytes: int
    stored_bytes: int
    ratio: float
    dedup: str
    layout: str = "llava"
    prompt: Optional[str] = None
    prompt_templates: tuple[str, ...] = ()
    weight: float = 1.0
    epochs: Optional[float] = None

    _MORE = ("text_tokens", "image_tokens", "saved_tokens", "source_bytes", "stored_bytes")

    def __post_init__(self) -> None:
        if self.epochs is None:  # before version 3 (and the synthetic shards): ratio alone
            object.__setattr__(self, "epochs", float(self.ratio))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **{f: getattr(self, f) for f in self._MORE}, "ratio": self.ratio,
                "dedup": self.dedup, "layout": self.layout, "prompt": self.prompt,
                "prompt_templates": list(self.prompt_templates), "weight": self.weight,
                "epochs": self.epochs}

    @classmethod
    def _read(cls, k: _Keys, version: int = VERSION) -> "SourceCounts":
        mix: dict[str, Any] = {}
        if version >= 3:
            prompt = None if k.data.get("prompt", ...) is None else k.text("prompt")
            mix = dict(layout=k.text("layout"), prompt=prompt, prompt_templates=k.texts("prompt_templates"),
                       weight=k.number("weight"), epochs=k.number("epochs"))
        return cls(**cls._fields(k), **{f: k.integer(f) for f in cls._MORE}, ratio=k.number("ratio"),
                   dedup=k.text("dedup"), **mix)


@dataclass(frozen=True)
class Tokens:
    text: int
    image: int
    saved: int  # image tokens the skip tokens saved

    @property
    def total(self) -> int:
        return self.text + self.image


@dataclass(frozen=True)
class ImageBytes:
    source: int  # bytes of the source images of the written rows
    stored: int  # bytes of those images as the shards store them
    codec: str   # models.stored_image.CODECS


@dataclass(frozen=True)
class QuarantineGate:
    """The quarantine gate as preprocess checked it: ``passed`` iff ``rows_quarantined <=
    max_quarantine_fraction * rows_in``. A manifest whose gate failed is written (its counts are
    the report) but the stage is not complete and training refuses it."""

    max_quarantine_fraction: float
    passed: bool

    @classmethod
    def check(cls, counts: Counts, limit: float) -> "QuarantineGate":
        return cls(max_quarantine_fraction=limit, passed=counts.rows_quarantined <= limit * counts.rows_in)


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest:
    """``<data.output>/_manifest.json``: what the shards are and how they were made.

    ``shards``: the shard names under the output (``part-00000.parquet``, ...), in order;
    ``error_shards``: the quarantined rows (``errors/part-00000.parquet``, ...). ``counts`` are the
    totals, ``sources`` the same per source (in spec order). ``seconds``: the stage's wall time.
    """

    flavour: str
    shard_format: int
    shards: tuple[str, ...]
    error_shards: tuple[str, ...]
    tiling: Tiling
    tokenizer: TokenizerFacts
    max_seq_len: int
    overflow: str
    max_image_pixels: int
    counts: Counts
    rows_reused: int  # rows that came from blocks an interrupted run finished
    tokens: Tokens
    image_bytes: ImageBytes
    sources: dict[str, SourceCounts]
    code_version: str
    seconds: float
    # None: no gate ran (the synthetic shards) or a version-1 file; see gate_failure
    quarantine_gate: Optional[QuarantineGate] = None
    mixture_temperature: Optional[float] = None  # data.mixture_temperature (version 3)
    version: int = VERSION

    def gate_failure(self, limit: float) -> Optional[str]:
        """Why these shards must not be used under ``data.max_quarantine_fraction`` = ``limit``
        (the recorded gate failed, or the counts are over ``limit``), or None when they may."""
        c = self.counts
        share = f"{c.rows_quarantined} of {c.rows_in} rows were quarantined"
        gate = self.quarantine_gate
        if gate is not None and not gate.passed:
            return f"{share}, over data.max_quarantine_fraction={gate.max_quarantine_fraction:g} when preprocessed"
        if c.rows_quarantined > limit * c.rows_in:
            return f"{share}, over data.max_quarantine_fraction={limit:g}"
        return None

    @property
    def shard_schema(self) -> pa.Schema:
        return shard_schema(self.shard_format)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout (flat keys, as version 1 files have them)."""
        return {
            "version": self.version,
            **self.counts.to_dict(),
            "rows_reused": self.rows_reused,
            "tokens": {"text": self.tokens.text, "image": self.tokens.image, "saved": self.tokens.saved,
                       "total": self.tokens.total},
            "image_bytes": {"source": self.image_bytes.source, "stored": self.image_bytes.stored,
                            "codec": self.image_bytes.codec},
            "sources": {name: c.to_dict() for name, c in self.sources.items()},
            "shards": list(self.shards),
            "shard_format": self.shard_format,
            "error_shards": list(self.error_shards),
            "flavour": self.flavour,
            "tiling": self.tiling.to_dict(),
            "max_seq_len": self.max_seq_len,
            "overflow": self.overflow,
            "max_image_pixels": self.max_image_pixels,
            "tokenizer": self.tokenizer.path,
            "vocab_size": self.tokenizer.vocab_size,
            "image_token_id": self.tokenizer.image_token_id,
            "code_version": self.code_version,
            "seconds": self.seconds,
            "quarantine_gate": None if self.quarantine_gate is None else {
                "max_quarantine_fraction": self.quarantine_gate.max_quarantine_fraction,
                "passed": self.quarantine_gate.passed},
            "mixture_temperature": self.mixture_temperature,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "") -> "Manifest":
        """The inverse of :meth:`to_dict`; ``where`` (a URI) goes into the errors."""
        k = _Keys(data, "", where)
        version = k.integer("version") if "version" in k.data else 1
        if version > VERSION:
            raise UserError(f"the shard manifest{f' at {where}' if where else ''} has version {version}, newer than "
                            f"this sphinx-x reads ({VERSION}); upgrade it or rerun `sphinx-x preprocess SPEC --force`")
        shard_format = k.integer("shard_format")
        if shard_format > SHARD_FORMAT:
            raise UserError(f"the shards{f' at {where}' if where else ''} are in format {shard_format}, newer than "
                            f"this sphinx-x reads ({SHARD_FORMAT}); upgrade it or rerun "
                            "`sphinx-x preprocess SPEC --force`")
        tokens, images, sources = k.obj("tokens"), k.obj("image_bytes"), k.obj("sources")
        return cls(
            version=version, flavour=k.text("flavour"), shard_format=shard_format, shards=k.texts("shards"),
            error_shards=k.texts("error_shards"), tiling=Tiling._read(k.obj("tiling")),
            tokenizer=TokenizerFacts(path=k.text("tokenizer"), vocab_size=k.integer("vocab_size"),
                                     image_token_id=k.integer("image_token_id")),
            max_seq_len=k.integer("max_seq_len"), overflow=k.text("overflow"),
            max_image_pixels=k.integer("max_image_pixels"),
            counts=Counts(**Counts._fields(k)), rows_reused=k.integer("rows_reused"),
            tokens=Tokens(text=tokens.integer("text"), image=tokens.integer("image"), saved=tokens.integer("saved")),
            image_bytes=ImageBytes(source=images.integer("source"), stored=images.integer("stored"),
                                   codec=images.text("codec")),
            sources={name: SourceCounts._read(sources.obj(name), version) for name in sources.data},
            code_version=k.text("code_version"), seconds=k.number("seconds"),
            quarantine_gate=_gate(k) if version >= 2 else None,
            mixture_temperature=None if version < 3 or k.data.get("mixture_temperature", ...) is None
            else k.number("mixture_temperature"),
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "") -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UserError(f"the shard manifest{f' at {where}' if where else ''} is not valid JSON: {err}") from None
        return cls.from_dict(data, where=where)


def _gate(k: _Keys) -> Optional[QuarantineGate]:
    """Version 2's ``quarantine_gate``: an object, or null where no gate ran."""
    if k.data.get("quarantine_gate", ...) is None:
        return None
    g = k.obj("quarantine_gate")
    return QuarantineGate(max_quarantine_fraction=g.number("max_quarantine_fraction"), passed=g.flag("passed"))
