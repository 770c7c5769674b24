"""Storage: one object for "where everything lives" — S3 (AWS, any S3-compatible server, or the
embedded moto server on 127.0.0.1) or a local directory.

    >>> storage = open_storage(spec.storage)          # s3://sphinx-x/runs/local, endpoint: embedded
    >>> storage.write_bytes("shards/_manifest.json", b"{}")
    >>> storage.list("shards")                        # keys relative to the storage root
    ['shards/_manifest.json']
    >>> storage.uri_for("shards")                     # 's3://sphinx-x/runs/local/shards'
    >>> storage.path("shards")                        # 'sphinx-x/runs/local/shards' (for .filesystem)
    >>> fs, path = storage.resolve("s3://other-bucket/images")   # any user path, same settings

Keys given to ``read_bytes / write_bytes / exists / list / delete / download_dir / upload_dir``
are either relative to the storage root (``"shards/part-00000.parquet"``), a full
``s3://bucket/key`` URI, an absolute local path, or a path from ``storage.path(...)``
(``"bucket/prefix/..."``). ``list`` answers in the form it was asked in.

Every remote call is retried with exponential backoff on transient errors (timeouts, connection
resets, 5xx, SlowDown); never on 4xx. Problems a user can fix (unreachable endpoint, missing
bucket, access denied) raise :class:`~models.errors.UserError` with one clear line.

The embedded server keeps objects in memory: they live as long as the server process does
(this process, or the one ``sphinx-x up`` started). Run it alone with
``python -m cluster.storage serve --port 9000``. Its endpoint comes from ``$SPHINX_X_S3_ENDPOINT``:
``cluster.connect`` finds or starts the server and sets it (this module discovers nothing).

Secrets: the spec names the environment variables that hold credentials; their values are
never logged and never put into ``cluster.connect.worker_env`` (Ray shows runtime_env in its
dashboard). Workers on a real cluster get credentials from their own environment / instance role.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

# re-exported: the Storage API of docs/interfaces.md includes the embedded server
from cluster.embedded_s3 import (  # noqa: F401
    CHECKSUM_ENV,
    DUMMY_CREDENTIALS,
    ENDPOINT_ENV,
    EmbeddedS3,
    EmbeddedS3Process,
    embedded_worker_env,
    serve_main,
)
from cluster.location import Location
from cluster.s3_errors import DEFAULT_RETRY, USER_CODES, RetryPolicy, error_code, is_transient
from cluster.spec import StorageSection
from models.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _embedded_endpoint() -> str:
    """``$SPHINX_X_S3_ENDPOINT``: set by cluster.connect on the driver, by the worker env in workers."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise UserError(f"storage: the embedded S3 endpoint is unknown here (${ENDPOINT_ENV} is not set); "
                        "drivers open storage through cluster.connect, workers get it from connect.worker_env")
    return endpoint.rstrip("/")


# ---------------------------------------------------------------- locations


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b"`` -> ``("bucket", "a/b")``."""
    if not uri.startswith("s3://"):
        raise UserError(f"storage: not an s3:// URI: {uri!r}")
    loc = Location.parse(uri)
    return loc.bucket, loc.key


def confined_path(local_dir: str | Path, rel: str, what: str = "") -> Path:
    """``local_dir / rel`` for an object key's remainder ``rel``, never outside ``local_dir``.

    Leading ``/`` are dropped (``"//a"`` -> ``a``); a ``..`` part, a scheme or a remainder that
    names nothing raises UserError naming the key, so a download refuses before writing.

        >>> confined_path("/tmp/d", "/llm/config.json")
        PosixPath('/tmp/d/llm/config.json')
        >>> confined_path("/tmp/d", "../../etc/passwd", "s3://b/m/../../etc/passwd")
        Traceback (most recent call last):
        models.errors.UserError: storage: refusing to download s3://b/m/../../etc/passwd: its key leaves /tmp/d
    """
    base = Location(None, os.path.abspath(str(local_dir)))
    rel = rel.lstrip("/")
    try:
        target = base / rel
    except UserError:
        target = None
    if target is None or target == base:
        raise UserError(f"storage: refusing to download {what or rel}: its key leaves {base.key}")
    return Path(target.key)


# ---------------------------------------------------------------- Storage


class Storage:
    """The storage root of a spec plus the S3 settings to reach it (and any other s3:// path).

    Picklable (caches are dropped), so it can be shipped to Ray workers.
    """

    def __init__(self, uri: str, *, endpoint_url: Optional[str], region: str,
                 credentials: Optional[dict[str, str]] = None, embedded: bool = False,
                 retry: RetryPolicy = DEFAULT_RETRY):
        self.uri = uri.rstrip("/") if uri.startswith("s3://") else str(Path(uri).expanduser().resolve())
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region
        self.embedded = embedded
        self.retry = retry
        # {"access_key", "secret_key", "session_token"}; values are never logged or exported
        self._credentials = dict(credentials or {})
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:  # no credentials in reprs (they end up in logs)
        return f"Storage({self.uri!r}, endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    # -- where things are

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> Optional[str]:
        return split_s3_uri(self.uri)[0] if self.is_s3 else None

    def path(self, *parts: str) -> str:
        """A path for :attr:`filesystem`: ``"bucket/prefix/a/b"`` or an absolute local path."""
        loc = self._root(*parts)
        return f"{loc.bucket}/{loc.key}".rstrip("/") if loc.is_s3 else loc.key

    def uri_for(self, *parts: str) -> str:
        """``"s3://bucket/prefix/a/b"`` or an absolute local path."""
        return self._root(*parts).uri

    @property
    def root(self) -> Location:
        return Location.parse(self.uri)

    def _root(self, *parts: str) -> Location:
        return self.root / _join(*parts)

    def locate(self, key: "str | Location") -> Location:
        """A :class:`~cluster.location.Location`, or a string: a relative key (under the root), an
        ``s3://`` URI, an absolute local path, or a filesystem path from :meth:`path`
        (``"bucket/prefix/..."``, under the root). A relative key never leaves the root."""
        if isinstance(key, Location):
            return key
        if os.path.isabs(key) or key.startswith("~"):
            return Location(None, str(Path(key).expanduser().resolve()))
        if "://" in key:
            return Location.parse(key)
        if self._is_fs_path(key):
            bucket, _, rest = key.partition("/")
            return Location(bucket, rest.strip("/"))
        return self.root / key

    def _is_fs_path(self, key: str) -> bool:
        root = self.path() if self.is_s3 else None
        return root is not None and (key.rstrip("/") == root or key.startswith(root + "/"))

    # -- clients

    @property
    def filesystem(self):
        """pyarrow filesystem of the root: S3FileSystem (endpoint, region, scheme) or local."""
        import pyarrow.fs as pafs

        return self.s3_filesystem if self.is_s3 else pafs.LocalFileSystem()

    @property
    def s3_filesystem(self):
        if "s3fs" not in self._cache:
            import pyarrow.fs as pafs

            kw: dict[str, Any] = dict(
                region=self.region, connect_timeout=5, request_timeout=60,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.retry.attempts),
            )
            if self.endpoint_url:
                scheme, _, host = self.endpoint_url.partition("://")
                kw.update(scheme=scheme, endpoint_override=host)
            creds = self._credentials
            if creds.get("access_key"):
                kw.update(access_key=creds["access_key"], secret_key=creds.get("secret_key"),
                          session_token=creds.get("session_token"))
            self._cache["s3fs"] = pafs.S3FileSystem(**kw)
        return self._cache["s3fs"]

    def resolve(self, uri_or_path: str):
        """Any user path -> ``(pyarrow filesystem, path)`` with this storage's S3 settings."""
        import pyarrow.fs as pafs

        loc = self.locate(uri_or_path)
        if loc.is_s3:
            return self.s3_filesystem, f"{loc.bucket}/{loc.key}".rstrip("/")
        return pafs.LocalFileSystem(), loc.key

    def client(self):
        """A boto3 S3 client (endpoint, region, checksum settings, path-style for non-AWS)."""
        if "client" not in self._cache:
            import boto3
            from botocore.config import Config

            config = Config(
                region_name=self.region,
                connect_timeout=5, read_timeout=60,
                retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"} if self.endpoint_url else None,
                max_pool_connections=16,
            )
            creds = self._credentials
            self._cache["client"] = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, config=config,
                aws_access_key_id=creds.get("access_key"), aws_secret_access_key=creds.get("secret_key"),
                aws_session_token=creds.get("session_token"),
            )
        return self._cache["client"]

    # -- retries

    def _call(self, what: str, fn: Callable[[], T], bucket: Optional[str] = None) -> T:
        """Run ``fn`` with retries on transient errors; turn user-fixable errors into UserError."""
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified below
                if is_transient(err) and attempt + 1 < self.retry.attempts:
                    delay = self.retry.delay(attempt)
                    log.warning("storage: %s failed (%s: %s); retry %d/%d in %.2fs", what,
                                type(err).__name__, err, attempt + 1, self.retry.attempts - 1, delay)
                    time.sleep(delay)
                    continue
                raise self._user_error(what, err, bucket) from None
        raise AssertionError("unreachable")

    def _user_error(self, what: str, err: Exception, bucket: Optional[str]) -> Exception:
        from botocore.exceptions import ConnectionError, NoCredentialsError, PartialCredentialsError

        where = self.endpoint_url or f"AWS S3 ({self.region})"
        code = error_code(err)
        if isinstance(err, ConnectionError):
            reason = "connection refused" if "refused" in str(err).lower() or "could not connect" in str(
                err).lower() else str(err)
            return UserError(f"storage: cannot reach S3 endpoint {where}: {reason}")
        if code == "NoSuchBucket":
            return UserError(f"storage: bucket {bucket!r} does not exist at {where}")
        if code in USER_CODES or code == "403":
            return UserError(f"storage: access denied ({code}) for {what} at {where}; check the credentials "
                             "named by storage.access_key_id_env / secret_access_key_env")
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return UserError(f"storage: no S3 credentials for {where}: {err}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"storage: {what}: not found")
        if is_transient(err):
            return UserError(f"storage: {what} failed after {self.retry.attempts} attempts at {where}: {err}")
        return err

    # -- object operations

    def read_bytes(self, key: str) -> bytes:
        loc = self.locate(key)
        if not loc.is_s3:
            return Path(loc.key).read_bytes()
        return self._call(f"read {loc.uri}", lambda: self.client().get_object(
            Bucket=loc.bucket, Key=loc.key)["Body"].read(), loc.bucket)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write one object (atomic: local writes go through a temp file). Returns its URI."""
        loc = self.locate(key)
        if not loc.is_s3:
            path = Path(loc.key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)
            return loc.uri
        self._call(f"write {loc.uri}", lambda: self.client().put_object(
            Bucket=loc.bucket, Key=loc.key, Body=data), loc.bucket)
        return loc.uri

    def exists(self, key: str) -> bool:
        """True for an object, or for a "directory" with at least one object under it."""
        loc = self.locate(key)
        if not loc.is_s3:
            return Path(loc.key).exists()

        def under() -> bool:
            prefix = f"{loc.key}/" if loc.key else ""
            return self.client().list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0

        return self._is_object(loc) or self._call(f"list {loc.uri}", under, loc.bucket)

    def _is_object(self, loc: Location) -> bool:
        if not loc.key:
            return False

        def head() -> bool:
            try:
                self.client().head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except Exception as err:  # noqa: BLE001
                if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call(f"stat {loc.uri}", head, loc.bucket)

    def list(self, prefix: str = "") -> list[str]:
        """All objects under the "directory" ``prefix``, recursively, sorted.

        Relative prefix -> keys relative to the storage root (``"shards/part-00000.parquet"``);
        an ``s3://`` or absolute prefix -> full URIs / paths. Each can go back to ``read_bytes``.
        """
        loc = self.locate(prefix) if prefix else self._root()
        full = prefix.startswith("s3://") or os.path.isabs(prefix) or prefix.startswith("~")
        if self._is_fs_path(prefix):
            return [f"{loc.bucket}/{split_s3_uri(u)[1]}" for u in self.list(loc.uri)]
        if not loc.is_s3:
            base = Path(loc.key)
            paths = sorted(str(p) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
            return paths if full else [os.path.relpath(p, self._root().key) for p in paths]

        def keys() -> list[str]:
            pages = self.client().get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=f"{loc.key}/" if loc.key else "")
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        found = sorted(self._call(f"list {loc.uri}", keys, loc.bucket))
        if full:
            return [f"s3://{loc.bucket}/{k}" for k in found]
        root = self._root().key
        return [k[len(root) + 1:] if root else k for k in found]

    def delete(self, prefix: str) -> int:
        """Delete the object ``prefix`` and everything under ``prefix/``. Returns the count."""
        loc = self.locate(prefix)
        if not loc.is_s3:
            path = Path(loc.key)
            if path.is_dir():
                count = sum(1 for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
                return count
            if path.exists():
                path.unlink()
                return 1
            return 0
        keys = [split_s3_uri(u)[1] for u in self.list(loc.uri)]
        if self._is_object(loc):
            keys.append(loc.key)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self._call(f"delete {loc.uri}", lambda b=batch: self.client().delete_objects(
                Bucket=loc.bucket, Delete={"Objects": b, "Quiet": True}), loc.bucket)
        return len(keys)

    def download_dir(self, uri_or_path: str, local_dir: str | Path) -> Path:
        """Copy every object under ``uri_or_path`` into ``local_dir`` (layout kept).

        A key that would land outside ``local_dir`` (a ``..`` part) raises UserError before any
        file is written (:func:`confined_path`)."""
        src, dest = self.locate(uri_or_path), Path(local_dir)
        if not src.is_s3:
            if not Path(src.key).is_dir():
                raise FileNotFoundError(f"storage: no directory {src.key}")
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src.key, dest, dirs_exist_ok=True)
            return dest
        uris = [u for u in self.list(src.uri) if not u.endswith("/")]  # S3 directory markers: no files
        if not uris:
            raise FileNotFoundError(f"storage: nothing under {src.uri}")
        # every target is checked before anything is written: a key with `..` refuses the whole copy
        keys = [u[len(f"s3://{src.bucket}/"):] for u in uris]
        targets = [(k, confined_path(dest, k[len(src.key):], u)) for k, u in zip(keys, uris)]
        dest.mkdir(parents=True, exist_ok=True)
        for (key, target), uri in zip(targets, uris):
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(f"download {uri}", lambda k=key, t=target: self.client().download_file(
                src.bucket, k, str(t)), src.bucket)
        return dest

    def upload_dir(self, local_dir: str | Path, uri_or_path: str) -> str:
        """Copy every file under ``local_dir`` to ``uri_or_path`` (multipart for large files)."""
        src, dest = Path(local_dir), self.locate(uri_or_path)
        if not src.is_dir():
            raise FileNotFoundError(f"storage: no directory {src}")
        if not dest.is_s3:
            shutil.copytree(src, dest.key, dirs_exist_ok=True)
            return dest.uri
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            key = _join(dest.key, path.relative_to(src).as_posix())
            self._call(f"upload s3://{dest.bucket}/{key}", lambda p=path, k=key: self.client().upload_file(
                str(p), dest.bucket, k), dest.bucket)
        return dest.uri


# ---------------------------------------------------------------- open_storage


def _credentials(section: StorageSection) -> dict[str, str]:
    names = {"access_key": section.access_key_id_env, "secret_key": section.secret_access_key_env,
             "session_token": section.session_token_env}
    creds = {k: os.environ[n] for k, n in names.items() if n and os.environ.get(n)}
    if bool(creds.get("access_key")) != bool(creds.get("secret_key")):
        have, missing = ("access_key_id_env", "secret_access_key_env")[:: 1 if creds.get("access_key") else -1]
        raise UserError(f"storage: ${getattr(section, have)} is set but ${getattr(section, missing)} is not")
    return creds


_checked: set[tuple[str, str]] = set()


def open_storage(section: StorageSection, *, retry: RetryPolicy = DEFAULT_RETRY) -> Storage:
    """The spec's storage, checked: embedded server found or started, bucket present.

    Raises UserError (one line) for an unreachable endpoint or a missing bucket.
    """
    if not section.is_s3:
        storage = Storage(section.uri, endpoint_url=None, region=section.region, retry=retry)
        Path(storage.uri).mkdir(parents=True, exist_ok=True)
        return storage
    if section.endpoint_url == "embedded":
        for key, value in DUMMY_CREDENTIALS.items():
            os.environ.setdefault(key, value)
        storage = Storage(section.uri, endpoint_url=_embedded_endpoint(), region=section.region,
                          credentials={"access_key": "testing", "secret_key": "testing"},
                          embedded=True, retry=retry)
    else:
        storage = Storage(section.uri, endpoint_url=section.endpoint_url, region=section.region,
                          credentials=_credentials(section), retry=retry)
    check = (storage.endpoint_url or section.region, storage.bucket)
    if check not in _checked:
        _check_bucket(storage)
        _checked.add(check)
    return storage


def _check_bucket(storage: Storage) -> None:
    bucket = storage.bucket
    where = storage.endpoint_url or f"AWS S3 ({storage.region})"

    def head() -> bool:
        try:
            storage.client().head_bucket(Bucket=bucket)
            return True
        except Exception as err:  # noqa: BLE001
            if error_code(err) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    if storage._call(f"check bucket {bucket!r}", head, bucket):
        return
    if not storage.embedded:
        raise UserError(f"storage: bucket {bucket!r} does not exist at {where}")
    kw: dict[str, Any] = {"Bucket": bucket}
    if storage.region != "us-east-1":
        kw["CreateBucketConfiguration"] = {"LocationConstraint": storage.region}

    def create() -> None:
        try:
            storage.client().create_bucket(**kw)
        except Exception as err:  # noqa: BLE001 - a concurrent creator won the race
            if error_code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    storage._call(f"create bucket {bucket!r}", create, bucket)


if __name__ == "__main__":  # `python -m cluster.storage serve --port P`
    sys.exit(serve_main(sys.argv[1:]))
