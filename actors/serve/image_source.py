"""Where a request's images come from: ``data:`` URLs, allow-listed ``s3://`` prefixes, allowlisted http(s).

    >>> policy = ImagePolicy(bucket="sphinx-x", allowed_hosts=[], max_bytes=2**20, max_pixels=10**6)
    >>> fetch_image("http://169.254.169.254/latest/meta-data", policy)
    Traceback (most recent call last):
    ...
    actors.serve.openai_api.ApiError: image URL host '169.254.169.254' is not allowed (serve.allowed_image_hosts)

Rules (no SSRF):
- ``data:image/(png|jpeg|webp|gif);base64,...`` — decoded strictly; bad base64 is a 400.
- ``s3://BUCKET/KEY`` — only under a ``serve.allowed_image_s3_prefixes`` entry (none by default:
  every s3:// URL is a 400) inside the spec's storage bucket, read through cluster.storage.
  ``s3://bkt/uploads`` allows ``s3://bkt/uploads/a.png`` and ``s3://bkt/uploads/x/b.png``,
  not ``s3://bkt/uploads-private/c.png``.
- ``http(s)://HOST/...`` — only hosts in ``serve.allowed_image_hosts`` (none by default). An
  exact entry (``images.example.com``, ``127.0.0.1``) trusts that host wherever it resolves;
  a wildcard entry (``*.example.com``) only where every resolved address is public. The
  connection goes to the address that was checked (no DNS rebinding); redirects are refused.
- Every source is capped at ``max_bytes``; :func:`check_image_header` caps pixels from the
  header, BEFORE anything is decoded; :func:`check_pixel_budget` caps their sum per request.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlsplit

from actors.serve.openai_api import ApiError
from cluster.location import Location
from models.errors import UserError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)
FETCH_TIMEOUT_S = 10.0


@dataclass
class ImagePolicy:
    bucket: Optional[str]
    allowed_hosts: list[str] = field(default_factory=list)
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    s3_prefixes: list[str] = field(default_factory=list)  # serve.allowed_image_s3_prefixes
    max_request_pixels: int = 50_000_000  # serve.max_request_pixels: sum over a request's images


def _bad(message: str, code: str, param: str = "messages") -> ApiError:
    return ApiError(400, message, code=code, param=param)


# ---------------------------------------------------------------- data: URLs


def decode_data_url(url: str, max_bytes: int) -> bytes:
    m = _DATA_RE.match(url)
    if not m:
        raise _bad("image data URL must look like data:image/png;base64,<data>", "invalid_image_url")
    mime = (m.group("mime") or "").lower()
    if mime and mime not in {f"image/{f.lower()}" for f in ALLOWED_FORMATS} | {"image/jpg"}:
        raise _bad(f"unsupported image type {mime!r}; use PNG, JPEG, WebP or GIF", "unsupported_image_format")
    payload = re.sub(r"\s+", "", m.group("data"))
    if len(payload) * 3 // 4 > max_bytes:
        raise _bad(f"image is larger than {max_bytes} bytes", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(f"image data URL has invalid base64: {err}", "invalid_base64") from None


# ---------------------------------------------------------------- http(s)


def _host_rule(host: str, allowed: list[str]) -> Optional[str]:
    """'exact' if the host is listed, 'wildcard' if a ``*.domain`` entry covers it, else None."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry == host:
            return "exact"
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]:
            return "wildcard"
    return None


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise _bad(f"image URL host {host!r} does not resolve: {err}", "image_fetch_failed") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def pick_address(host: str, port: int, allowed: list[str],
                 resolve: Callable[[str, int], list[str]] = _resolve) -> str:
    """The checked address to connect to for ``host``, or a 400 naming why not."""
    rule = _host_rule(host, allowed)
    if rule is None:
        raise _bad(f"image URL host {host!r} is not allowed (serve.allowed_image_hosts)", "image_host_not_allowed")
    addresses = resolve(host, port)
    if not addresses:
        raise _bad(f"image URL host {host!r} does not resolve", "image_fetch_failed")
    if rule == "wildcard":
        private = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_global]
        if private:
            raise _bad(f"image URL host {host!r} resolves to a non-public address {private[0]}; "
                       "list the host exactly in serve.allowed_image_hosts to allow it", "image_host_not_allowed")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address, with ``Host:`` the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_http(url: str, policy: ImagePolicy, resolve: Callable[[str, int], list[str]] = _resolve) -> bytes:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _bad(f"image URL has an invalid port: {url[:200]!r}", "invalid_image_url") from None
    host = parts.hostname
    if not host:
        raise _bad(f"image URL has no host: {url[:200]!r}", "invalid_image_url")
    address = pick_address(host, port, policy.allowed_hosts, resolve)
    conn_cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = conn_cls(host, port, address, FETCH_TIMEOUT_S)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "sphinx-x-serve", "Accept": "image/*"})
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            raise _bad(f"image URL redirects (HTTP {resp.status}); redirects are not followed", "image_fetch_failed")
        if resp.status != 200:
            raise _bad(f"image URL returned HTTP {resp.status}", "image_fetch_failed")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise _bad(f"image is larger than {policy.max_bytes} bytes", "image_too_large")
        data = resp.read(policy.max_bytes + 1)
    except (OSError, http.client.HTTPException) as err:
        raise _bad(f"image URL could not be fetched: {type(err).__name__}: {err}", "image_fetch_failed") from None
    finally:
        conn.close()
    if len(data) > policy.max_bytes:
        raise _bad(f"image is larger than {policy.max_bytes} bytes", "image_too_large")
    return data


# ---------------------------------------------------------------- s3://


def s3_allowed(bucket: str, key: str, prefixes: list[str]) -> bool:
    """True iff ``s3://bucket/key`` lies under one of ``prefixes`` (folder boundaries: a prefix
    ``s3://b/up`` covers ``up/x.png``, not ``upx.png``; ``s3://b`` or ``s3://b/`` covers the bucket)."""
    for p in prefixes:
        pb, _, pk = p[len("s3://"):].partition("/")
        pk = pk.strip("/")
        if pb == bucket and (not pk or key == pk or key.startswith(pk + "/")):
            return True
    return False


def fetch_s3(url: str, policy: ImagePolicy, open_filesystem: Callable[[], object]) -> bytes:
    if not policy.s3_prefixes:
        raise _bad("s3:// image URLs are not allowed on this endpoint (serve.allowed_image_s3_prefixes is empty)",
                   "image_host_not_allowed")
    try:
        loc = Location.parse(url)
    except UserError as err:  # no bucket, a '..' component
        raise _bad(f"invalid s3:// image URL: {err}", "invalid_image_url") from None
    bucket, key = loc.bucket, loc.key
    if policy.bucket is None:
        raise _bad("s3:// image URLs need the spec's storage to be on S3", "image_host_not_allowed")
    if bucket != policy.bucket or not key:
        raise _bad(f"s3:// image URLs must be inside the spec's bucket {policy.bucket!r}", "image_host_not_allowed")
    if not s3_allowed(bucket, key, policy.s3_prefixes):
        raise _bad("s3:// image URL is not under an allowed prefix (serve.allowed_image_s3_prefixes)",
                   "image_host_not_allowed")
    fs = open_filesystem()
    path = f"{bucket}/{key}"
    try:
        import pyarrow.fs as pafs

        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise _bad(f"image {url!r} does not exist", "image_fetch_failed")
        if info.size is not None and info.size > policy.max_bytes:
            raise _bad(f"image is larger than {policy.max_bytes} bytes", "image_too_large")
        with fs.open_input_stream(path) as f:
            return f.read(policy.max_bytes + 1)
    except OSError as err:
        raise _bad(f"image {url!r} could not be read: {err}", "image_fetch_failed") from None


# ---------------------------------------------------------------- entry points


def check_image_url(url: str, policy: ImagePolicy) -> None:
    """The checks on a URL that need no I/O (scheme, s3:// prefix, http(s) host allow-list): the
    ingress runs them on every image of a request before it fetches any."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "s3":
        if not policy.s3_prefixes:
            raise _bad("s3:// image URLs are not allowed on this endpoint (serve.allowed_image_s3_prefixes is empty)",
                       "image_host_not_allowed")
        try:
            loc = Location.parse(url)
        except UserError as err:
            raise _bad(f"invalid s3:// image URL: {err}", "invalid_image_url") from None
        if not s3_allowed(loc.bucket, loc.key or "", policy.s3_prefixes):
            raise _bad("s3:// image URL is not under an allowed prefix (serve.allowed_image_s3_prefixes)",
                       "image_host_not_allowed")
    elif scheme in ("http", "https"):
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        if not host:
            raise _bad(f"image URL has no host: {url[:200]!r}", "invalid_image_url")
        if _host_rule(host, policy.allowed_hosts) is None:
            raise _bad(f"image URL host {host!r} is not allowed (serve.allowed_image_hosts)",
                       "image_host_not_allowed")
    elif scheme != "data":
        raise _bad(f"unsupported image URL scheme {scheme[:20]!r}; use data:, s3:// or an allowlisted http(s) URL",
                   "invalid_image_url")


def fetch_image(url: str, policy: ImagePolicy, open_filesystem: Optional[Callable[[], object]] = None,
                resolve: Callable[[str, int], list[str]] = _resolve) -> bytes:
    """The raw bytes an ``image_url`` names (blocking; call it from a thread)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy.max_bytes)
    if scheme == "s3":
        if open_filesystem is None:
            raise _bad("s3:// image URLs are not enabled on this endpoint", "image_host_not_allowed")
        return fetch_s3(url, policy, open_filesystem)
    if scheme in ("http", "https"):
        return fetch_http(url, policy, resolve)
    raise _bad(f"unsupported image URL scheme {scheme!r}; use data:, s3:// or an allowlisted http(s) URL",
               "invalid_image_url")


def check_image_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) read from the header only; 400 if unknown, unsupported or too big."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as err:
        raise _bad(f"image is too large: {err}", "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise _bad(f"image could not be decoded ({type(err).__name__}): not a readable PNG, JPEG, WebP or GIF",
                   "invalid_image") from None
    if fmt not in ALLOWED_FORMATS:
        raise _bad(f"unsupported image format {fmt}; use PNG, JPEG, WebP or GIF", "unsupported_image_format")
    if w * h > max_pixels:
        raise _bad(f"image has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", "image_too_large")
    if w < 1 or h < 1:
        raise _bad(f"image has an empty size {w}x{h}", "invalid_image")
    return fmt, w, h


def check_pixel_budget(sizes: list[tuple[int, int]], max_request_pixels: int) -> int:
    """The total W*H of a request's images (from their headers); 400 past ``max_request_pixels``.

    >>> check_pixel_budget([(100, 100), (20, 5)], 10_100)
    10100
    """
    total = sum(w * h for w, h in sizes)
    if total > max_request_pixels:
        raise _bad(f"the request's images have {total} pixels in all, over the limit of {max_request_pixels} "
                   "(serve.max_request_pixels)", "image_too_large")
    return total
