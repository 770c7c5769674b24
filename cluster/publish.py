"""Publishing a directory atomically on storage (S3 or local): a reader sees the old or the new
directory, never half of one (docs/security.md, "Atomic exports and checkpoints").

S3 has no rename, so the switch is one object: the directory's ``_SUCCESS`` marker. It holds
``{"publish": ID, "sibling": NAME|null}``: ``null`` means the directory itself is complete;
``NAME`` means the complete copy is the sibling ``NAME`` beside it (used while the directory
itself is being replaced). An empty marker (older writers) means the directory itself.

    >>> publish_dir(storage, "/tmp/model", "s3://b/run/train/export")      # writer
    >>> marker = fetch(storage, "s3://b/run/train/export", "/tmp/local", require=True)  # reader

Replacing a published directory (``publish_dir`` when ``<dest>/_SUCCESS`` exists):

1. the new files go to ``<dest>.tmp-<id>/`` with its own marker last (the old one is untouched);
2. ``<dest>/_SUCCESS`` := ``{"publish": id, "sibling": "<dest name>.tmp-<id>"}`` — the switch;
3. ``<dest>/`` is emptied (the marker kept) and the new files are uploaded into it;
4. ``<dest>/_SUCCESS`` := ``{"publish": "<id>.in-place", "sibling": null}``;
5. ``<dest>.tmp-<id>/`` (and a sibling a crashed writer left named by the old marker) is deleted.

A first publish (no marker yet: nothing to keep readable) writes in place, the marker last.
A reader (:func:`fetch`) reads the marker, copies the directory it names, and reads
the marker again: a changed marker means the copy may mix versions, so it copies again.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cluster.location import Location
from models.errors import UserError

log = logging.getLogger(__name__)

MARKER = "_SUCCESS"
READ_ATTEMPTS = 5


@dataclass(frozen=True)
class Marker:
    """What a directory's ``_SUCCESS`` says: which publish, and where its complete copy is."""

    publish: str
    sibling: Optional[str] = None

    def to_bytes(self) -> bytes:
        return json.dumps({"publish": self.publish, "sibling": self.sibling}).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Marker":
        if not data.strip():
            return cls(publish="")  # an older writer's empty marker: the directory itself
        try:
            obj = json.loads(data)
            sibling = obj.get("sibling")
            if sibling is not None and (not isinstance(sibling, str) or "/" in sibling or sibling in ("", ".", "..")):
                raise ValueError(f"bad sibling {sibling!r}")
            return cls(publish=str(obj["publish"]), sibling=sibling)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{where}: not a publish marker ({err})") from None


def read_marker(storage, uri: "str | Location") -> Optional[Marker]:
    """The marker of the directory ``uri``, or None when it has none (not published, or not yet)."""
    loc = storage.locate(uri) / MARKER
    try:
        return Marker.from_bytes(storage.read_bytes(loc), loc.uri)
    except FileNotFoundError:
        return None


def published_dir(uri: "str | Location", marker: Marker) -> Location:
    """The directory holding the complete copy the marker names."""
    loc = Location.parse(uri)
    return loc.parent / marker.sibling if marker.sibling else loc


def publish_dir(storage, local_dir: "str | Path", dest: "str | Location") -> Marker:
    """Upload ``local_dir`` to ``dest`` so that readers see the old or the new copy, never a mix
    (the steps are in the module docstring). A ``_SUCCESS`` inside ``local_dir`` is not copied:
    the marker is written here. Returns the final marker."""
    src, dest = Path(local_dir), storage.locate(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"publish: no directory {src}")
    pid = uuid.uuid4().hex[:12]
    old = read_marker(storage, dest)
    if old is None:  # nothing published here yet: in place, the marker last
        storage.delete(dest)
        _upload_without_marker(storage, src, dest)
        final = Marker(publish=pid)
        storage.write_bytes(dest / MARKER, final.to_bytes())
        return final
    tmp = dest.parent / f"{dest.name}.tmp-{pid}"
    _upload_without_marker(storage, src, tmp)
    storage.write_bytes(tmp / MARKER, Marker(publish=pid).to_bytes())
    storage.write_bytes(dest / MARKER, Marker(publish=pid, sibling=tmp.name).to_bytes())  # the switch
    for key in storage.list(dest.uri):
        if Location.parse(key).name != MARKER or storage.locate(key).parent != dest:
            storage.delete(key)
    _upload_without_marker(storage, src, dest)
    final = Marker(publish=f"{pid}.in-place")
    storage.write_bytes(dest / MARKER, final.to_bytes())
    storage.delete(tmp)
    if old.sibling and old.sibling != tmp.name:  # a crashed writer's complete copy, no longer named
        storage.delete(dest.parent / old.sibling)
    return final


def _upload_without_marker(storage, src: Path, dest: Location) -> None:
    staged = src
    if (src / MARKER).exists():  # upload_dir copies a whole folder: leave the local marker out
        staged = Path(src.parent, f".{src.name}.publish")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(src, staged, ignore=lambda d, names: [MARKER] if Path(d) == src else [],
                        copy_function=_link_or_copy)
    try:
        storage.upload_dir(staged, dest.uri)
    finally:
        if staged != src:
            shutil.rmtree(staged, ignore_errors=True)


def _link_or_copy(a: str, b: str) -> None:
    import os

    try:
        os.link(a, b)  # the staged copy costs no space
    except OSError:
        shutil.copy2(a, b)


def fetch(storage, uri: str, local: "str | Path", *, require: bool = False, what: str = "") -> Optional[Marker]:
    """Copy one complete published version of ``uri`` into ``local`` (emptied first) and return
    its marker: the marker is read before and after the copy, and the copy is redone when it
    changed (up to :data:`READ_ATTEMPTS` times). Without a marker the plain directory is copied
    and None returned, unless ``require`` is set (UserError: not published, or still written)."""
    local = Path(local)
    for attempt in range(READ_ATTEMPTS):
        before = read_marker(storage, uri)
        if before is None and require:
            raise UserError(f"{what or uri}: not published (no {MARKER} marker): it is missing or still being written")
        source = published_dir(storage.locate(uri), before) if before else storage.locate(uri)
        shutil.rmtree(local, ignore_errors=True)
        try:
            storage.download_dir(source.uri, local)
        except FileNotFoundError:
            if before is None:
                raise
            continue  # the sibling went away under us: the marker has moved on
        if read_marker(storage, uri) == before:
            return before
        log.info("%s changed while it was copied; copying again (%d/%d)", uri, attempt + 1, READ_ATTEMPTS)
    raise UserError(f"{what or uri}: changed on every one of {READ_ATTEMPTS} copies (a writer keeps replacing it)")
