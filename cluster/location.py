"""A place in storage, parsed once: an S3 object / prefix or a local path (docs/architecture.md
"Run layout").

Every path a run reads or writes is a :class:`Location`: the layout resolves the spec's path
settings into them, storage resolves its keys into them, and code that needs the bucket, the
last name or a child asks the Location instead of slicing ``s3://`` strings.

    >>> root = Location.parse("s3://sphinx-x/runs/local")
    >>> (root / "shards" / "_manifest.json").uri
    's3://sphinx-x/runs/local/shards/_manifest.json'
    >>> (root / "shards").name, root.bucket, root.key
    ('shards', 'sphinx-x', 'runs/local')
    >>> (root / "shards/part-00001.parquet").relative_to(root)
    'shards/part-00001.parquet'
    >>> Location.parse("data/a.jsonl", base=root).uri      # relative: under the base
    's3://sphinx-x/runs/local/data/a.jsonl'
    >>> Location.parse("/abs/run").uri, Location.parse("/abs/run").is_s3
    ('/abs/run', False)
    >>> root / "../other"                                  # never leaves where it is joined
    Traceback (most recent call last):
    models.errors.UserError: storage: '../other' leaves s3://sphinx-x/runs/local
"""

from __future__ import annotations

import os
from typing import Optional

from models.errors import UserError


class Location(str):
    """``bucket`` is ``None`` for a local path; ``key`` is the S3 key (no leading or trailing
    ``/``) or an absolute, normalised local path. The value itself is the :attr:`uri` string, so
    a Location goes wherever a URI string went (f-strings, JSON, pyarrow, Ray); it is immutable."""

    bucket: Optional[str]
    key: str

    def __new__(cls, bucket: Optional[str], key: str) -> "Location":
        self = super().__new__(cls, f"s3://{bucket}/{key}".rstrip("/") if bucket is not None else key)
        object.__setattr__(self, "bucket", bucket)
        object.__setattr__(self, "key", key)
        return self

    def __getnewargs__(self) -> tuple:  # pickling (Ray): rebuilt from its parts
        return (self.bucket, self.key)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError("a Location is immutable")

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    @classmethod
    def parse(cls, text: "str | Location", base: Optional["Location"] = None) -> "Location":
        """``s3://bucket/key``, an absolute (or ``~``) local path, or a path relative to ``base``."""
        if isinstance(text, Location):
            return text
        if text.startswith("s3://"):
            bucket, _, key = text[len("s3://"):].partition("/")
            if not bucket:
                raise UserError(f"storage: no bucket in {text!r}")
            return cls(bucket, _clean(key, text))
        if "://" in text:
            raise UserError(f"only s3:// URIs or local paths are supported, got {text!r}")
        if os.path.isabs(text) or text.startswith("~"):
            return cls(None, os.path.abspath(os.path.expanduser(text)))
        if base is None:
            raise UserError(f"storage: {text!r} is a relative path and nothing to resolve it against")
        return base / text

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def uri(self) -> str:
        """``s3://bucket/key`` or the local path, as a plain string: the form users and logs see."""
        return str.__str__(self)

    @property
    def fs_path(self) -> str:
        """The path a pyarrow filesystem takes: ``bucket/key`` on S3, the local path otherwise."""
        return f"{self.bucket}/{self.key}".rstrip("/") if self.is_s3 else self.key

    @property
    def name(self) -> str:
        """The last component (``""`` for a bucket root)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1] if self.key.strip("/") else ""

    @property
    def parent(self) -> "Location":
        if self.is_s3:
            return Location(self.bucket, self.key.rpartition("/")[0])
        return Location(None, os.path.dirname(self.key))

    def __truediv__(self, rel: str) -> "Location":
        """A child: ``rel`` may hold several ``/``-separated parts, never ``..`` or an absolute path."""
        parts = [p for p in rel.split("/") if p and p != "."]
        if ".." in parts or rel.startswith("/") or "://" in rel:
            raise UserError(f"storage: {rel!r} leaves {self.uri}")
        if not parts:
            return self
        if self.is_s3:
            return Location(self.bucket, "/".join(([self.key] if self.key else []) + parts))
        return Location(None, os.path.join(self.key, *parts))

    def relative_to(self, other: "Location") -> str:
        """This location's path under ``other`` (``""`` when equal); a UserError when not under it."""
        if self.bucket != other.bucket:
            raise UserError(f"storage: {self.uri} is not under {other.uri}")
        if self.key == other.key:
            return ""
        prefix = other.key.rstrip("/") + "/" if other.key else ""
        if self.is_s3 and self.key.startswith(prefix):
            return self.key[len(prefix):]
        if not self.is_s3 and self.key.startswith(other.key.rstrip(os.sep) + os.sep):
            return os.path.relpath(self.key, other.key)
        raise UserError(f"storage: {self.uri} is not under {other.uri}")

    def is_under(self, other: "Location") -> bool:
        """True for ``other`` itself and anything inside it."""
        try:
            self.relative_to(other)
            return True
        except UserError:
            return False

    def __str__(self) -> str:
        return str.__str__(self)


def _clean(key: str, text: str) -> str:
    parts = [p for p in key.split("/") if p and p != "."]
    if ".." in parts:
        raise UserError(f"storage: {text!r} has a '..' component")
    return "/".join(parts)
