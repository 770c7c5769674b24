"""--force never deletes a root, a home folder or the run's inputs (cluster.output_guard;
docs/security.md, "--force")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.location import Location
from cluster.output_guard import check_force_output
from cluster.spec import load_spec, parse_spec
from models.errors import UserError

ROOT = "s3://sphinx-x/runs/local"
SOURCES = [{"name": "a", "path": "data/a.jsonl", "image_root": "s3://images/coco"},
           {"name": "b", "path": "/srv/data/b.jsonl"}]


def _spec(data_output="shards", train_output="train", **model):
    return parse_spec({"data": {"sources": SOURCES, "output": data_output},
                       "train": {"output": train_output}, "model": model})


@pytest.mark.parametrize("setting", ["data.output", "train.output"])
@pytest.mark.parametrize("value, why", [
    ("", "the setting is empty"),
    (".", "the setting is empty"),
    ("./", "the setting is empty"),
    (ROOT, "it is the storage root"),
    ("s3://sphinx-x/runs", "it holds the storage root"),
    ("s3://sphinx-x", "it is a bucket root"),
    ("s3://images/", "it is a bucket root"),
    ("/", "it is the filesystem root"),
    ("~", "it is a home folder"),
    ("/root", "it is a home folder"),
    ("/home/alice", "it is a home folder"),
    ("/home", "it holds the home"),
    ("/Users/bob", "it is a home folder"),
    ("data", r"it holds data.sources\[0\].path"),
    ("data/a.jsonl", r"it is data.sources\[0\].path"),
    ("/srv", r"it holds data.sources\[1\].path"),
    ("s3://images/coco", r"it is data.sources\[0\].image_root"),
])
def test_force_refuses_dangerous_outputs_naming_them(setting, value, why):
    spec = _spec(**{setting.split(".")[0] + "_output": value})
    with pytest.raises(UserError, match=rf"--force refuses to delete {setting} .*: {why}"):
        check_force_output(spec, setting, ROOT)


def test_train_output_above_the_shards_or_the_weights_is_refused():
    with pytest.raises(UserError, match=r"it holds data.output"):
        check_force_output(_spec(data_output="run/shards", train_output="run"), "train.output", ROOT)
    with pytest.raises(UserError, match=r"it holds model.weights"):
        check_force_output(_spec(train_output="models", weights="models/tiny"), "train.output", ROOT)
    with pytest.raises(UserError, match=r"it holds train.output"):
        check_force_output(_spec(data_output="out", train_output="out/train"), "data.output", ROOT)


def test_ordinary_outputs_pass():
    assert check_force_output(_spec(), "data.output", ROOT) == Location.parse(f"{ROOT}/shards")
    assert check_force_output(_spec(), "train.output", ROOT) == Location.parse(f"{ROOT}/train")
    assert check_force_output(_spec(train_output="s3://other/runs/x"), "train.output", ROOT).uri == "s3://other/runs/x"
    home = os.path.expanduser("~")
    assert check_force_output(_spec(train_output="~/runs/t"), "train.output", ROOT).uri == f"{home}/runs/t"
    # a hub-style tokenizer name is not a storage path: nothing to protect
    assert check_force_output(_spec(tokenizer="hf-internal/llama"), "train.output", ROOT)


def test_every_example_spec_passes_its_own_force_guard():
    examples = sorted(Path(__file__).resolve().parents[2].glob("cluster/examples/*.yaml"))
    assert examples
    for path in examples:
        spec = load_spec(path)
        root = Location.parse(spec.storage.uri).uri
        for setting in ("data.output", "train.output"):
            check_force_output(spec, setting, root)
