"""Atomic publishing (cluster.publish): a reader sees the old or the new directory, never half,
with writers interrupted at each step (docs/security.md, "Atomic exports and checkpoints")."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cluster.publish import MARKER, Marker, fetch, publish_dir, read_marker
from cluster.spec import StorageSection
from cluster.storage import RetryPolicy, open_storage
from models.errors import UserError


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(StorageSection(uri=str(tmp_path / "store")))
    request.getfixturevalue("s3")
    return open_storage(StorageSection(uri=f"s3://sphinx-x-test/{uuid.uuid4().hex[:10]}"),
                        retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))


def _model(tmp_path, version: str, files: int = 3) -> Path:
    d = tmp_path / f"model-{version}-{uuid.uuid4().hex[:4]}"
    (d / "llm").mkdir(parents=True)
    for i in range(files):
        (d / "llm" / f"part-{i}.bin").write_text(f"{version}-{i}")
    (d / "config.json").write_text(version)
    (d / MARKER).write_text("")  # write_model_dir's own marker: never uploaded as is
    return d


def _read(local: Path) -> set[str]:
    return {p.read_text() for p in local.rglob("*") if p.is_file() and p.name != MARKER}


def _version(local: Path) -> str:
    versions = {t.split("-")[0] for t in _read(local)}
    assert len(versions) == 1, f"a mixed copy: {sorted(_read(local))}"
    return versions.pop()


class Boom(RuntimeError):
    pass


def _fail_on(storage, monkeypatch, method: str, nth: int):
    """The ``nth`` call (1-based) of ``storage.<method>`` raises: a writer killed there."""
    real, calls = getattr(storage, method), []

    def wrapped(*a, **kw):
        calls.append(a)
        if len(calls) == nth:
            raise Boom(f"killed at {method} #{nth}")
        return real(*a, **kw)

    monkeypatch.setattr(storage, method, wrapped)


def test_first_publish_then_replace(storage, tmp_path):
    dest = storage.uri_for("train/export")
    first = publish_dir(storage, _model(tmp_path, "v1"), dest)
    assert read_marker(storage, dest) == first and first.sibling is None
    assert _version_of(storage, dest, tmp_path) == "v1"
    publish_dir(storage, _model(tmp_path, "v2"), dest)
    assert _version_of(storage, dest, tmp_path) == "v2"
    # nothing left beside the export but the export itself
    assert {k.split("/")[1] for k in storage.list("train")} == {"export"}


def _version_of(storage, dest, tmp_path) -> str:
    local = tmp_path / f"read-{uuid.uuid4().hex[:6]}"
    fetch(storage, dest, local, require=True)
    return _version(local)


def test_half_written_first_export_is_not_read(storage, tmp_path, monkeypatch):
    dest = storage.uri_for("train/export")
    _fail_on(storage, monkeypatch, "write_bytes", 1)  # killed before its marker
    with pytest.raises(Boom):
        publish_dir(storage, _model(tmp_path, "v1"), dest)
    assert storage.exists(storage.uri_for("train/export/config.json"))  # files are there ...
    with pytest.raises(UserError, match="no _SUCCESS marker"):  # ... but no reader takes them
        fetch(storage, dest, tmp_path / "r", require=True)


@pytest.mark.parametrize("method, nth", [
    ("upload_dir", 1),   # killed while uploading the new copy beside the old one
    ("write_bytes", 1),  # killed before the new copy's own marker
    ("write_bytes", 2),  # killed before the switch
    ("delete", 1),       # killed after the switch, while emptying the old directory
    ("upload_dir", 2),   # killed while uploading the new files in place
    ("write_bytes", 3),  # killed before the final marker
])
def test_a_writer_killed_at_any_step_leaves_old_or_new(storage, tmp_path, monkeypatch, method, nth):
    dest = storage.uri_for("train/export")
    publish_dir(storage, _model(tmp_path, "v1"), dest)
    _fail_on(storage, monkeypatch, method, nth)
    with pytest.raises(Boom):
        publish_dir(storage, _model(tmp_path, "v2", files=5), dest)
    monkeypatch.undo()
    assert _version_of(storage, dest, tmp_path) in ("v1", "v2")
    publish_dir(storage, _model(tmp_path, "v3"), dest)  # the next export recovers and cleans up
    assert _version_of(storage, dest, tmp_path) == "v3"


def test_a_reader_copying_while_a_writer_replaces_copies_again(storage, tmp_path, monkeypatch):
    dest = storage.uri_for("train/export")
    publish_dir(storage, _model(tmp_path, "v1"), dest)
    real, seen = storage.download_dir, []

    def racing(src, local):
        out = real(src, local)
        if not seen:  # the first copy straddles a whole new export
            seen.append(src)
            publish_dir(storage, _model(tmp_path, "v2"), dest)
        return out

    monkeypatch.setattr(storage, "download_dir", racing)
    local = tmp_path / "read"
    marker = fetch(storage, dest, local, require=True)
    assert _version(local) == "v2" and marker == read_marker(storage, dest)


def test_markers_older_writers_and_bad_ones(storage, tmp_path):
    assert Marker.from_bytes(b"", "x") == Marker(publish="")
    for bad in (b"{", b'{"publish": 1, "sibling": "../x"}', b'{"sibling": null}', b"[]"):
        with pytest.raises(UserError, match="not a publish marker"):
            Marker.from_bytes(bad, "x")
    dest = storage.uri_for("plain")
    storage.write_bytes("plain/config.json", b"plain")
    assert fetch(storage, dest, tmp_path / "p") is None and (tmp_path / "p" / "config.json").read_text() == "plain"
