"""Preprocess, driver side: ``data.sources[]`` entries resolved to a format and a file list.

The formats (``auto`` decides by extension) and the path rules are those of
``pipelines.stages.preprocess`` (module doc); a source that cannot be read, holds no data files
or mixes formats is a ``UserError`` naming ``data.sources[i]``. Image references must resolve
inside ``image_root`` or, when the spec lists them, ``allowed_image_prefixes`` (each by the same
path rule); others are quarantined as ``outside_root`` (``actors.data.rows.resolve_image``). The source's
``layout`` settings become its :class:`actors.data.layouts.Reading` here, checked against the layout
(its column names, its ``annotations`` file, the prompt kinds it can ask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pyarrow.fs as pafs

from actors.data.layouts import LAYOUTS, Reading
from cluster.layout import Layout
from cluster.location import Location
from cluster.spec import SourceSpec
from cluster.storage import Storage
from models.errors import UserError


@dataclass(frozen=True)
class Source:
    """One ``data.sources[]`` entry, resolved: its format decided and its files listed."""

    spec: SourceSpec
    format: str  # json | jsonl | webdataset | parquet
    filesystem: pafs.FileSystem
    files: tuple[str, ...]  # filesystem paths, sorted
    image_root: Optional[str]  # a URI: s3://bucket/key or an absolute local path
    image_prefixes: tuple[str, ...] = ()  # URIs images may be read from; () = image_root alone
    reading: Reading = Reading()  # the layout and how it reads (actors.data.layouts)
    side_filesystem: Optional[pafs.FileSystem] = None  # where reading.annotations is


def _locate(storage: Storage, lay: Layout, path: str) -> tuple[pafs.FileSystem, str, str]:
    """A spec path -> (filesystem, filesystem path, URI), by the layout's one rule."""
    uri = lay.path(path)
    fs, fs_path = storage.resolve(uri)
    return fs, fs_path, uri


_EXT_FORMAT = {".json": "json", ".jsonl": "jsonl", ".tar": "webdataset", ".parquet": "parquet"}


def resolve_source(storage: Storage, lay: Layout, i: int, src: SourceSpec, seed: int = 0) -> Source:
    """``data.sources[i]`` -> its format (``auto`` decided by extension) and files (sorted; under a
    directory or prefix every .json, .jsonl, .tar and .parquet file not under a ``_`` folder)."""
    fs, path, uri = _locate(storage, lay, src.path)
    where = f"data.sources[{i}] ({src.name}): path {uri}"
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise UserError(f"{where}: cannot be read: {err}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{where}: no such file or prefix")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(f.path for f in infos if f.type == pafs.FileType.File
                       and any(f.path.endswith(e) for e in _EXT_FORMAT) and "/_" not in f.path[len(path):])
    else:
        files = [path]
    if not files:
        raise UserError(f"{where}: holds no .json, .jsonl, .tar or .parquet files")
    fmt = src.format
    if fmt == "auto":
        kinds = {next((v for e, v in _EXT_FORMAT.items() if f.endswith(e)), "jsonl") for f in files}
        kinds = {"json" if k in ("json", "jsonl") else k for k in kinds}
        if len(kinds) > 1:
            raise UserError(f"{where}: mixes formats {sorted(kinds)}; split it or set format")
        fmt = kinds.pop()
        fmt = "auto" if fmt == "json" else fmt  # json vs jsonl decided per file
    image_root = lay.path(src.image_root) if src.image_root else None
    if image_root is None and (fmt in ("auto", "json", "jsonl") or src.layout != "llava"):
        image_root = Location.parse(uri).parent.uri if info.type != pafs.FileType.Directory else uri
    prefixes = tuple(lay.path(p) for p in src.allowed_image_prefixes or ())
    if src.allowed_image_prefixes is not None and not prefixes:
        raise UserError(f"data.sources[{i}] ({src.name}): allowed_image_prefixes is empty; leave it out to read "
                        "images under image_root only")
    return Source(spec=src, format=fmt, filesystem=fs, files=tuple(files), image_root=image_root,
                  image_prefixes=prefixes, reading=_reading(storage, lay, i, src, seed),
                  side_filesystem=_locate(storage, lay, src.annotations)[0] if src.annotations else None)


def _reading(storage: Storage, lay: Layout, i: int, src: SourceSpec, seed: int) -> Reading:
    """The source's layout settings, checked: ``columns`` names the layout's own names only, and
    ``annotations`` is given (and exists) where the layout reads one."""
    where = f"data.sources[{i}] ({src.name})"
    if src.layout == "llava":
        if src.columns or src.annotations or src.prompt:
            raise UserError(f"{where}: columns, annotations and prompt belong to the other layouts; layout llava "
                            "reads LLaVA records as they are")
        return Reading(seed=seed)
    layout = LAYOUTS[src.layout]
    unknown = sorted(set(src.columns) - set(layout.columns))
    if unknown:
        raise UserError(f"{where}: columns {unknown} are not names of layout {src.layout!r}; it has "
                        f"{sorted(layout.columns)}")
    if src.prompt is not None and src.prompt not in layout.prompt_kinds():
        raise UserError(f"{where}: prompt {src.prompt!r} does not fit layout {src.layout!r}; it asks "
                        + (f"one of {list(layout.prompt_kinds())}" if layout.prompt_kinds()
                           else "nothing (its records hold their questions)"))
    side = None
    if src.annotations:
        if layout.annotations == "none":
            raise UserError(f"{where}: layout {src.layout!r} reads no annotations file")
        fs, side, uri = _locate(storage, lay, src.annotations)
        if fs.get_file_info(side).type != pafs.FileType.File:
            raise UserError(f"{where}: annotations {uri}: no such file")
    elif layout.annotations == "required":
        raise UserError(f"{where}: layout {src.layout!r} needs annotations (its second file, see "
                        "docs/interfaces.md \"Source layouts\")")
    return Reading(layout=src.layout, columns=tuple(sorted(src.columns.items())), prompt=src.prompt, seed=seed,
                   annotations=side)
