"""The train stage's two outputs for readers: ``<train.output>/export.json`` and ``summary.json``.

    >>> ExportSummary(export="s3://b/run/train/export", export_params=1_234, export_bytes=4_936,
    ...               export_max_abs_diff=0.0).to_json()
    '{"version": 1, "export": "s3://b/run/train/export", "export_params": 1234, ...}'
    >>> TrainSummary.from_json(storage.read_bytes(lay.train_summary), where=lay.train_summary).step
    100

Rank 0 writes ``ExportSummary`` after the export (``actors.train.export``); the driver
(``pipelines.stages.train``) writes ``TrainSummary`` last, when the stage is complete. Both are
frozen and versioned: ``from_json`` / ``from_dict`` raise ``UserError`` naming the file and the
key that is missing or of the wrong type, or a version newer than this code reads. Files written
before the classes carry no ``version`` key: they are version 1. Keys a reader does not know are
ignored (a newer writer of the same version only adds keys); a field that may be absent from
files of its version is named in ``MAY_BE_ABSENT`` and reads as None.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Optional, Union

from models.errors import UserError


class _Summary:
    """to_json / from_json for a frozen dataclass of JSON scalars (int, float, str, bool, None)."""

    VERSION: ClassVar[int]
    MAY_BE_ABSENT: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **asdict(self)}  # type: ignore[call-overload]

    def to_json(self, *, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: Union[str, bytes], *, where: str):
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UserError(f"{where} is not valid JSON: {err}") from None
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: Any, *, where: str):
        name = cls.__name__
        if not isinstance(data, dict):
            raise UserError(f"{where} is not a {name} (a JSON object), got {type(data).__name__}")
        version = data["version"] if "version" in data else 1  # written before the classes: version 1
        if not _is(version, int):
            raise UserError(f"{where}: {name} key 'version' must be an int, got {version!r}")
        if version > cls.VERSION:
            raise UserError(f"{where} is a {name} of version {version}, newer than this sphinx-x reads "
                            f"({cls.VERSION}); upgrade sphinx-x")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.name in cls.MAY_BE_ABSENT:
                    values[f.name] = None
                    continue
                raise UserError(f"{where}: {name} key {f.name!r} is missing")
            value = data[f.name]
            if not _is(value, hints[f.name]):
                raise UserError(f"{where}: {name} key {f.name!r} must be {_describe(hints[f.name])}, "
                                f"got {value!r}")
            values[f.name] = float(value) if _base(hints[f.name]) is float and value is not None else value
        return cls(**values)


def _base(hint) -> type:
    """int for ``Optional[int]``, int for ``int``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _is(value, hint) -> bool:
    if value is None:
        return type(None) in typing.get_args(hint)
    base = _base(hint)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _describe(hint) -> str:
    base = _base(hint).__name__
    return f"{base} or null" if type(None) in typing.get_args(hint) else base


@dataclass(frozen=True)
class ExportSummary(_Summary):
    """``<train.output>/export.json``: what rank 0 wrote and how it was checked.

    Exactly one of the two checks is set when the export had a check batch (a trained run): the
    logits of the reloaded directory against the engine's (``export_max_abs_diff``), or why
    only the headers were checked (``export_check``); neither for an export of a checkpoint
    (``sphinx-x train --export-from``)."""

    VERSION: ClassVar[int] = 1
    # files of version 1 written before this class carry only the check that ran
    MAY_BE_ABSENT: ClassVar[frozenset[str]] = frozenset({"export_max_abs_diff", "export_check"})

    export: str  # the model directory's URI (models.weights.model_dir format, _SUCCESS last)
    export_params: int  # parameters in it
    export_bytes: int  # bytes of its safetensors files
    export_max_abs_diff: Optional[float] = None  # max |logits(reloaded) - logits(engine)|
    export_check: Optional[str] = None  # why only the safetensors headers were checked


@dataclass(frozen=True)
class TrainSummary(_Summary):
    """``<train.output>/summary.json``, written last: the stage is complete. ``run_stage``
    returns it as a dict (``to_dict``)."""

    VERSION: ClassVar[int] = 1

    step: int  # the last step trained
    total_steps: int
    rows: int  # training samples in the shards
    global_batch: int
    packed_rows: Optional[int]  # rows after train.packing; None when not packing
    workers: int
    zero_stage: int
    expert_parallel: int
    flavour: str
    loss: Optional[float]  # the last step's (None when no step ran in this call)
    aux_loss: Optional[float]
    resumed_from: Optional[int]  # the step this call restarted at; None from scratch
    export: Optional[str]  # ExportSummary's keys; None when the stage ran without the export
    export_max_abs_diff: Optional[float]
    export_check: Optional[str]
    export_bytes: Optional[int]
    checkpoint: Optional[str]  # the last Ray Train checkpoint's path
    metrics: str  # metrics.jsonl's URI
    wall_s: float  # the trainer's wall time
    ray: str  # the Ray address the stage ran on
