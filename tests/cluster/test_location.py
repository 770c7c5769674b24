"""cluster.location: one parse of every storage path; children never leave their parent."""

from __future__ import annotations

import pytest

from cluster.location import Location
from models.errors import UserError


def test_s3_and_local_parse_once_and_join():
    root = Location.parse("s3://bkt/runs/x/")
    assert (root.bucket, root.key, root.uri, root.fs_path) == ("bkt", "runs/x", "s3://bkt/runs/x", "bkt/runs/x")
    child = root / "shards/part-00001.parquet"
    assert child.uri == "s3://bkt/runs/x/shards/part-00001.parquet" and child.name == "part-00001.parquet"
    assert child.parent.uri == "s3://bkt/runs/x/shards" and child.relative_to(root) == "shards/part-00001.parquet"
    assert Location.parse("s3://bkt").name == "" and (Location.parse("s3://bkt") / "a").uri == "s3://bkt/a"
    local = Location.parse("/data/run/")
    assert (local.is_s3, local.uri, (local / "a/b").uri, (local / "a").relative_to(local)) == (
        False, "/data/run", "/data/run/a/b", "a")
    assert Location.parse("sub/dir", base=root).uri == "s3://bkt/runs/x/sub/dir"
    assert Location.parse("s3://other/k", base=root).bucket == "other"  # absolute settings as given


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/etc/passwd", "s3://b/k"])
def test_a_child_never_leaves_its_parent(bad):
    with pytest.raises(UserError, match="leaves"):
        Location.parse("s3://bkt/runs") / bad


def test_bad_uris_name_the_problem():
    with pytest.raises(UserError, match="no bucket"):
        Location.parse("s3:///k")
    with pytest.raises(UserError, match="only s3://"):
        Location.parse("gs://b/k")
    with pytest.raises(UserError, match="'..'"):
        Location.parse("s3://b/a/../k")
    with pytest.raises(UserError, match="relative path"):
        Location.parse("a/b")
    with pytest.raises(UserError, match="not under"):
        Location.parse("s3://b/x").relative_to(Location.parse("s3://b/y"))
    assert not Location.parse("/data/runs2").is_under(Location.parse("/data/run"))
    assert Location.parse("/data/run/a").is_under(Location.parse("/data/run"))


def test_a_location_is_its_uri_string_and_crosses_process_boundaries():
    import json
    import pickle

    loc = Location.parse("s3://bkt/runs/x") / "shards"
    assert loc == "s3://bkt/runs/x/shards" and f"{loc}/a" == "s3://bkt/runs/x/shards/a"
    assert json.dumps({"p": loc}) == '{"p": "s3://bkt/runs/x/shards"}'
    back = pickle.loads(pickle.dumps(loc))
    assert type(back) is Location and (back.bucket, back.key) == ("bkt", "runs/x/shards")
    with pytest.raises(AttributeError):
        loc.key = "elsewhere"


def test_the_layout_hands_out_locations():
    from cluster.layout import Layout
    from cluster.spec import parse_spec

    lay = Layout.from_spec(parse_spec({"data": {"output": "shards"}}), storage_uri="s3://bkt/run")
    assert isinstance(lay.manifest, Location) and lay.manifest.parent == lay.shards
    assert lay.shard(3).name == "part-00003.parquet" and lay.export_success.relative_to(lay.root) == "train/export/_SUCCESS"
