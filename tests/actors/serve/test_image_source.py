"""Image sources: data: URLs, s3:// in the spec's bucket only, http(s) allowlist without SSRF."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from actors.serve.image_source import ImagePolicy, check_image_header, fetch_image, pick_address
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


def test_s3_only_inside_the_spec_bucket():
    def no_fs():
        raise AssertionError("must not open storage for a refused URL")

    assert _code(fetch_image, "s3://other-bucket/x.png", POLICY, no_fs) == "image_host_not_allowed"
    assert _code(fetch_image, "s3://bkt/../x.png", POLICY, no_fs) == "invalid_image_url"
    local = ImagePolicy(bucket=None, max_bytes=4096, max_pixels=1000)
    assert _code(fetch_image, "s3://bkt/x.png", local, no_fs) == "image_host_not_allowed"


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
