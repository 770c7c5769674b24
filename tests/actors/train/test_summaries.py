"""The train stage's typed outputs: export.json and summary.json round-trip, and a file that is
not one says what is wrong with it."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError

import pytest

from actors.train.summaries import ExportSummary, TrainSummary
from models.errors import UserError

EXPORT = ExportSummary(export="s3://b/r/train/export", export_params=1234, export_bytes=4936,
                       export_max_abs_diff=0.0)
TRAIN = TrainSummary(step=50, total_steps=50, rows=120, global_batch=8, packed_rows=None, workers=2, zero_stage=2,
                     expert_parallel=1, flavour="debug", loss=1.25, aux_loss=0.0, resumed_from=None,
                     export="s3://b/r/train/export", export_max_abs_diff=0.0, export_check=None, export_bytes=4936,
                     checkpoint="b/r/train/checkpoints/sx/checkpoint_000000", metrics="s3://b/r/train/metrics.jsonl",
                     wall_s=61.5, ray="127.0.0.1:6379")


@pytest.mark.parametrize("summary", [EXPORT, TRAIN])
def test_round_trip_with_a_version(summary):
    text = summary.to_json()
    assert json.loads(text)["version"] == 1
    assert type(summary).from_json(text, where="x") == summary
    with pytest.raises(FrozenInstanceError):
        summary.export = "elsewhere"


def test_files_written_before_the_classes_read():
    """Today's key names, no version key; export.json carried only the check that ran."""
    old_export = {"export": "s3://b/r/train/export", "export_params": 1234, "export_bytes": 4936,
                  "export_check": "headers only: ..."}
    read = ExportSummary.from_dict(old_export, where="export.json")
    assert (read.export_check, read.export_max_abs_diff) == ("headers only: ...", None)
    old_train = {k: v for k, v in TRAIN.to_dict().items() if k != "version"}
    assert TrainSummary.from_json(json.dumps(old_train), where="summary.json") == TRAIN
    assert TrainSummary.from_dict({**old_train, "skipped": True}, where="run_stage") == TRAIN  # unknown keys: ignored


def test_an_int_where_a_float_is_due_reads_as_float():
    read = TrainSummary.from_dict({**TRAIN.to_dict(), "loss": 2, "wall_s": 61}, where="summary.json")
    assert (read.loss, read.wall_s) == (2.0, 61.0) and isinstance(read.loss, float)


@pytest.mark.parametrize("change, message", [
    ({"step": None}, "summary.json: TrainSummary key 'step' must be int, got None"),
    ({"step": "50"}, "key 'step' must be int, got '50'"),
    ({"step": True}, "key 'step' must be int, got True"),
    ({"loss": "low"}, "key 'loss' must be float or null, got 'low'"),
    ({"version": 2}, "summary.json is a TrainSummary of version 2, newer than this sphinx-x reads (1)"),
])
def test_an_ill_typed_key_or_a_newer_version_is_named(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainSummary.from_dict({**TRAIN.to_dict(), **change}, where="summary.json")


def test_a_missing_key_is_named():
    data = TRAIN.to_dict()
    del data["flavour"]
    with pytest.raises(UserError, match="summary.json: TrainSummary key 'flavour' is missing"):
        TrainSummary.from_dict(data, where="summary.json")
    with pytest.raises(UserError, match="export.json: ExportSummary key 'export_bytes' is missing"):
        ExportSummary.from_dict({"export": "e", "export_params": 1}, where="export.json")


def test_not_json_or_not_an_object():
    with pytest.raises(UserError, match="summary.json is not valid JSON"):
        TrainSummary.from_json(b"{", where="summary.json")
    with pytest.raises(UserError, match=r"summary.json is not a TrainSummary \(a JSON object\), got list"):
        TrainSummary.from_json(b"[]", where="summary.json")
