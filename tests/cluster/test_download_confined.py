"""Downloads never write outside their folder: an object key with ``..`` is refused before any
file is written (cluster.storage.download_dir, the tokenizer download; docs/security.md)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cluster.spec import StorageSection
from cluster.storage import RetryPolicy, confined_path, open_storage
from models.errors import UserError

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)


@pytest.fixture
def storage(s3):
    return open_storage(StorageSection(uri=f"s3://sphinx-x-test/{uuid.uuid4().hex[:10]}"), retry=FAST_RETRY)


def _put_raw(storage, key: str, data: bytes) -> None:
    """An object whose key is exactly ``key`` under the root (no Location checks: what an attacker writes)."""
    storage.client().put_object(Bucket=storage.bucket, Key=f"{storage.root.key}/{key}", Body=data)


def test_confined_path_keeps_keys_inside(tmp_path):
    assert confined_path(tmp_path, "/llm/config.json") == tmp_path / "llm" / "config.json"
    assert confined_path(tmp_path, "a//b/./c") == tmp_path / "a" / "b" / "c"
    for bad in ("../x", "a/../../x", "..", "", "/", "s3://b/x"):
        with pytest.raises(UserError, match="leaves"):
            confined_path(tmp_path, bad, f"key {bad!r}")


def test_download_dir_refuses_dotdot_key_before_writing(storage, tmp_path):
    _put_raw(storage, "model/a.txt", b"good")
    _put_raw(storage, "model/../../escaped.txt", b"evil")
    keys = storage.client().list_objects_v2(Bucket=storage.bucket, Prefix=storage.root.key + "/")["Contents"]
    assert any(".." in k["Key"] for k in keys), "the server kept the '..' key as written"
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UserError, match=r"refusing to download .*escaped\.txt: its key leaves"):
        storage.download_dir(storage.uri_for("model"), dest)
    assert not dest.exists()  # nothing written, not even the good file
    assert not list(tmp_path.rglob("escaped.txt"))


def test_download_dir_good_keys_still_copy(storage, tmp_path):
    _put_raw(storage, "model/llm/config.json", b"{}")
    _put_raw(storage, "model/x.bin", b"1")
    out = storage.download_dir(storage.uri_for("model"), tmp_path / "d")
    assert sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()) == [
        "llm/config.json", "x.bin"]


def test_tokenizer_download_refuses_dotdot_key(storage, tmp_path):
    from pipelines.stages.preprocess_tokenizer import _tokenizer_files

    _put_raw(storage, "tok/tokenizer.json", b"{}")
    _put_raw(storage, "tok/../../../pwned.json", b"evil")
    dest = tmp_path / "tok"
    dest.mkdir()
    with pytest.raises(UserError, match=r"refusing to download .*pwned\.json"):
        _tokenizer_files(storage, storage.uri_for("tok"), str(dest))
    assert not list(tmp_path.rglob("*.json"))


def test_directory_marker_objects_are_skipped(storage, tmp_path):
    _put_raw(storage, "model/", b"")  # what some S3 tools (and Ray's uploads) leave for a folder
    _put_raw(storage, "model/sub/", b"")
    _put_raw(storage, "model/sub/a.txt", b"a")
    out = storage.download_dir(storage.uri_for("model"), tmp_path / "d")
    assert [p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()] == ["sub/a.txt"]
