"""What ``--force`` may delete: never a root, a home folder, or anything holding the run's inputs
(docs/security.md, "--force").

``--force`` removes a stage's output before redoing it (``data.output``, ``train.output``). A
mistyped setting must not wipe the storage root, a bucket or a home folder, nor the sources the
run reads. :func:`check_force_output` is the one guard both stages call, on resolved Locations:

    >>> check_force_output(spec, "train.output", storage_root="s3://b/runs")   # train.output: "~"
    Traceback (most recent call last):
    models.errors.UserError: --force refuses to delete train.output '~' = /root: it is a home folder; ...

Refused (each named in the error): an empty setting or ``.``; the storage root or any folder
above it; a bucket root; ``/``; a home folder (``~``, ``/root``, ``/home/<user>``, ``/Users/<user>``)
or a folder above one; and any folder equal to or above a path the run reads or another stage
writes — ``data.sources[].path`` / ``image_root``, ``model.weights`` / ``tokenizer``, and the
other stage's output (``data.output`` for ``train.output`` and the reverse).
"""

from __future__ import annotations

import os
from typing import Optional

from cluster.location import Location
from cluster.spec import ClusterSpec
from models.errors import UserError

OUTPUT_SETTINGS = ("data.output", "train.output")
_HOME_PARENTS = ("/home", "/Users")


def _setting(spec: ClusterSpec, name: str) -> Optional[str]:
    section, _, field = name.partition(".")
    return getattr(getattr(spec, section), field)


def protected_paths(spec: ClusterSpec, root: Location, output_setting: str) -> list[tuple[str, Location]]:
    """(setting name, Location) of every path ``output_setting``'s --force must leave alone."""
    found: list[tuple[str, Location]] = []
    for i, src in enumerate(spec.data.sources):
        found.append((f"data.sources[{i}].path", src.path))
        if src.image_root:
            found.append((f"data.sources[{i}].image_root", src.image_root))
    found += [("model.weights", spec.model.weights), ("model.tokenizer", spec.model.tokenizer)]
    found += [(name, _setting(spec, name)) for name in OUTPUT_SETTINGS if name != output_setting]
    out = []
    for name, text in found:
        if text is None:
            continue
        try:
            out.append((name, Location.parse(text, base=root)))
        except UserError:  # a hub name (model.tokenizer) or a malformed path: not a storage path
            continue
    return out


def _homes() -> list[Location]:
    homes = {os.path.abspath(os.path.expanduser("~")), "/root"}
    return [Location(None, h) for h in sorted(homes)]


def refusal(output: Location, root: Location, protected: list[tuple[str, Location]]) -> Optional[str]:
    """Why deleting ``output`` recursively is refused, or None when it is allowed (pure logic)."""
    if output.is_s3 and not output.key:
        return "it is a bucket root"
    if not output.is_s3 and output.key in ("/", ""):
        return "it is the filesystem root"
    if output == root:
        return "it is the storage root"
    if root.is_under(output):
        return f"it holds the storage root {root.uri}"
    if not output.is_s3:
        for home in _homes():
            if output == home:
                return "it is a home folder"
            if home.is_under(output):
                return f"it holds the home folder {home.uri}"
        if os.path.dirname(output.key) in _HOME_PARENTS:
            return "it is a home folder"
        if output.key in _HOME_PARENTS:
            return "it holds the home folders"
    for name, loc in protected:
        if loc == output:
            return f"it is {name} ({loc.uri})"
        if loc.is_under(output):
            return f"it holds {name} ({loc.uri})"
    return None


def check_force_output(spec: ClusterSpec, output_setting: str, storage_root: "str | Location") -> Location:
    """The resolved ``output_setting`` (``data.output`` or ``train.output``), or UserError naming it
    and why --force must not delete it."""
    if output_setting not in OUTPUT_SETTINGS:
        raise ValueError(f"not an output setting: {output_setting!r}")
    root = Location.parse(storage_root)
    text = _setting(spec, output_setting)
    output = Location.parse(text, base=root)
    why = "the setting is empty" if text.strip() in ("", ".", "./") else None
    why = why or refusal(output, root, protected_paths(spec, root, output_setting))
    if why:
        raise UserError(f"--force refuses to delete {output_setting} {text!r} = {output.uri}: {why}; "
                        f"set {output_setting} to a folder of its own (the default is "
                        f"{'shards' if output_setting == 'data.output' else 'train'} under storage.uri)")
    return output
