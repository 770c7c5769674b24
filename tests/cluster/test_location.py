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
