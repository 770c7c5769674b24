"""Image sources: data: URLs, s3:// under allowed prefixes only, http(s) allowlist without SSRF."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from actors.serve.image_source import (ImagePolicy, check_image_header, check_image_url, check_pixel_budget,
                                       fetch_image, pick_address, s3_allowed)
from actors.serve.openai_api import ApiError


def _png(w=8, h=4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


POLICY = ImagePolicy(bucket="bkt", allowed_hosts=[], max_bytes=4096, max_pixels=1000)


def _code(fn, *a, **kw) -> str:
    with pytest.raises(ApiError) as info:
        fn(*a, **kw)
    assert info.value.status == 400
    return info.value.code


def test_data_url_round_trip_and_errors():
    data = _png()
    assert fetch_image("data:image/png;base64," + base64.b64encode(data).decode(), POLICY) == data
    assert _code(fetch_image, "data:image/png;base64,@@@notbase64", POLICY) == "invalid_base64"
    assert _code(fetch_image, "data:text/html;base64,AAAA", POLICY) == "unsupported_image_format"
    assert _code(fetch_image, "data:image/png,rawbytes", POLICY) == "invalid_image_url"
    big = base64.b64encode(b"x" * 10_000).decode()
    assert _code(fetch_image, "data:image/png;base64," + big, POLICY) == "image_too_large"
    assert _code(fetch_image, "file:///etc/passwd", POLICY) == "invalid_image_url"


def test_header_check_caps_pixels_before_decoding():
    assert check_image_header(_png(8, 4), 1000) == ("PNG", 8, 4)
    assert _code(check_image_header, _png(100, 100), 1000) == "image_too_large"
    assert _code(check_image_header, b"not an image at all", 1000) == "invalid_image"
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    assert _code(check_image_header, buf.getvalue(), 1000) == "unsupported_image_format"


def test_s3_only_under_an_allowed_prefix_of_the_spec_bucket():
    def no_fs():
        raise AssertionError("must not open storage for a refused URL")

    # default: no prefixes, every s3:// URL refused before storage is opened
    for url in ("s3://bkt/x.png", "s3://bkt/run/train/export/llm/model.safetensors", "s3://other-bucket/x.png"):
        assert _code(fetch_image, url, POLICY, no_fs) == "image_host_not_allowed"
        assert _code(check_image_url, url, POLICY) == "image_host_not_allowed"
    up = ImagePolicy(bucket="bkt", max_bytes=4096, max_pixels=1000, s3_prefixes=["s3://bkt/uploads"])
    assert _code(fetch_image, "s3://other-bucket/uploads/x.png", up, no_fs) == "image_host_not_allowed"
    assert _code(fetch_image, "s3://bkt/../x.png", up, no_fs) == "invalid_image_url"
    assert _code(fetch_image, "s3://bkt/uploads/../secrets/k.png", up, no_fs) == "invalid_image_url"
    assert _code(fetch_image, "s3://bkt/uploads-private/x.png", up, no_fs) == "image_host_not_allowed"
    assert _code(fetch_image, "s3://bkt/train/x.png", up, no_fs) == "image_host_not_allowed"
    check_image_url("s3://bkt/uploads/a/b.png", up)  # allowed: no error, no I/O
    assert s3_allowed("bkt", "uploads/a.png", ["s3://bkt/uploads/"])
    assert s3_allowed("bkt", "any/key.png", ["s3://bkt"]) and not s3_allowed("bkt2", "k", ["s3://bkt"])
    local = ImagePolicy(bucket=None, max_bytes=4096, max_pixels=1000, s3_prefixes=["s3://bkt/"])
    assert _code(fetch_image, "s3://bkt/x.png", local, no_fs) == "image_host_not_allowed"


def test_s3_prefixes_in_the_spec_are_checked():
    from cluster.spec import SpecError, parse_spec

    spec = parse_spec({"serve": {"allowed_image_s3_prefixes": ["s3://bkt/uploads/"]}})
    assert spec.serve.allowed_image_s3_prefixes == ["s3://bkt/uploads/"]
    assert parse_spec({}).serve.allowed_image_s3_prefixes == []
    for bad in ("bkt/uploads", "s3://", "s3://bkt/../x", "/local/dir"):
        with pytest.raises(SpecError, match="allowed_image_s3_prefixes"):
            parse_spec({"serve": {"allowed_image_s3_prefixes": [bad]}})


def test_cheap_url_checks_need_no_io():
    assert _code(check_image_url, "file:///etc/passwd", POLICY) == "invalid_image_url"
    assert _code(check_image_url, "http://169.254.169.254/x", POLICY) == "image_host_not_allowed"
    check_image_url("data:image/png;base64,AAAA", POLICY)


def test_pixel_budget_sums_over_the_request():
    assert check_pixel_budget([(100, 100), (50, 20)], 11_000) == 11_000
    assert _code(check_pixel_budget, [(100, 100)] * 4, 39_999) == "image_too_large"


def test_undecodable_image_message_has_no_heap_address():
    with pytest.raises(ApiError) as info:
        check_image_header(b"not an image at all", 1000)
    assert "0x" not in info.value.message and "BytesIO" not in info.value.message


def test_ssrf_rules():
    to_local = lambda host, port: ["127.0.0.1"]  # noqa: E731
    to_public = lambda host, port: ["93.184.216.34"]  # noqa: E731
    # not allowlisted: refused before any resolution
    assert _code(pick_address, "example.com", 80, [], to_public) == "image_host_not_allowed"
    assert _code(fetch_image, "http://169.254.169.254/latest/meta-data", POLICY) == "image_host_not_allowed"
    # wildcard entries never reach private / loopback / link-local addresses (DNS rebinding)
    assert _code(pick_address, "img.example.com", 80, ["*.example.com"], to_local) == "image_host_not_allowed"
    assert _code(pick_address, "img.example.com", 80, ["*.example.com"],
                 lambda h, p: ["169.254.169.254"]) == "image_host_not_allowed"
    assert pick_address("img.example.com", 80, ["*.example.com"], to_public) == "93.184.216.34"
    assert _code(pick_address, "example.com", 80, ["*.example.com"], to_public) == "image_host_not_allowed"
    # an exact entry is trusted wherever it resolves
    assert pick_address("intranet.local", 80, ["intranet.local"], to_local) == "127.0.0.1"


def test_http_fetch_from_an_allowlisted_host():
    data = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        allowed = ImagePolicy(bucket=None, allowed_hosts=["127.0.0.1"], max_bytes=4096, max_pixels=1000)
        assert fetch_image(f"{base}/img.png", allowed) == data
        assert _code(fetch_image, f"{base}/redirect", allowed) == "image_fetch_failed"
        assert _code(fetch_image, f"{base}/missing.png", allowed) == "image_fetch_failed"
        assert _code(fetch_image, f"{base}/img.png", POLICY) == "image_host_not_allowed"
        small = ImagePolicy(bucket=None, allowed_hosts=["127.0.0.1"], max_bytes=16, max_pixels=1000)
        assert _code(fetch_image, f"{base}/img.png", small) == "image_too_large"
    finally:
        server.shutdown()
        server.server_close()
