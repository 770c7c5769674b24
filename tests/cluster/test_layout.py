"""cluster.layout: one rule for every path setting, every run path named once."""

from __future__ import annotations

import pytest

from cluster.layout import Layout, resolve
from cluster.spec import parse_spec
from models.errors import UserError


def test_relative_under_the_root_absolute_and_s3_as_given():
    assert resolve("s3://bkt/run", "shards") == "s3://bkt/run/shards"
    assert resolve("s3://bkt/run", "/data/shards/") == "/data/shards"
    assert resolve("s3://bkt/run", "s3://other/x/") == "s3://other/x"
    assert resolve("/srv/run", "a/b") == "/srv/run/a/b"
    with pytest.raises(UserError, match="only s3://"):
        resolve("s3://bkt/run", "gs://x/y")


def test_every_run_path_derives_from_the_spec():
    spec = parse_spec({"storage": {"uri": "s3://bkt/run"}, "data": {"output": "/abs/shards"},
                       "train": {"output": "t"}})
    lay = Layout.from_spec(spec)
    assert (lay.shards, lay.manifest, lay.tokenizer, lay.errors) == (
        "/abs/shards", "/abs/shards/_manifest.json", "/abs/shards/tokenizer", "/abs/shards/errors")
    assert lay.shard(3) == "/abs/shards/part-00003.parquet"
    assert (lay.checkpoints, lay.export, lay.export_success, lay.train_summary) == (
        "s3://bkt/run/t/checkpoints", "s3://bkt/run/t/export", "s3://bkt/run/t/export/_SUCCESS", "s3://bkt/run/t/summary.json")
    assert lay.checkpoint("@train") == lay.export and lay.checkpoint("models/x") == "s3://bkt/run/models/x"




def test_curated_sets_by_the_one_rule():
    spec = parse_spec({"storage": {"uri": "s3://bkt/run"},
                       "curate": {"ocr": {"input": "docs", "output": "/data/ocr"}}})
    lay = Layout.from_spec(spec)
    assert lay.curated_records("som") == "s3://bkt/run/curated/som/data.jsonl"  # the default, section or not
    assert lay.curated_manifest("ocr") == "/data/ocr/_manifest.json"
    assert lay.curated_images("ocr") == "/data/ocr/images" and lay.curated_blocks("som") == "s3://bkt/run/curated/som/_blocks"
