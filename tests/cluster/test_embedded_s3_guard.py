"""The embedded S3 answers loopback origins only and serves no moto admin route: real HTTP
requests to 127.0.0.1 (docs/security.md, "Embedded S3")."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from cluster.embedded_s3 import EmbeddedS3, is_loopback_origin


@pytest.fixture(scope="module")
def server():
    with EmbeddedS3() as s:
        yield s


def _client(server):
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _keys(server, bucket: str) -> list[str]:
    return [o["Key"] for o in _client(server).list_objects_v2(Bucket=bucket).get("Contents", [])]


def _request(server, method: str, path: str, headers: dict | None = None, data: bytes | None = None):
    req = urllib.request.Request(server.endpoint_url + path, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_loopback_origin_rule():
    for good in ("http://127.0.0.1:8000", "http://localhost", "https://[::1]:9", "http://127.5.0.1"):
        assert is_loopback_origin(good), good
    for bad in ("https://evil.example", "null", "http://127.0.0.1.evil.example", "file://", "http://10.0.0.1",
                "http://localhost:notaport", ""):
        assert not is_loopback_origin(bad), bad


def test_moto_admin_routes_are_closed(server):
    _client(server).create_bucket(Bucket="guard-bucket")
    _client(server).put_object(Bucket="guard-bucket", Key="keep.txt", Body=b"kept")
    for method, path in [("POST", "/moto-api/reset"), ("GET", "/moto-api/data.json"), ("GET", "/moto-api/"),
                         ("POST", "/moto-api/reset-auth"), ("GET", "/latest/meta-data/iam/")]:
        status, _, body = _request(server, method, path, data=b"" if method == "POST" else None)
        assert status == 404, (method, path, status, body[:200])
    assert _keys(server, "guard-bucket") == ["keep.txt"]  # the reset did not happen


def test_foreign_origin_is_refused_and_never_gets_cors_star(server):
    _client(server).create_bucket(Bucket="guard-bucket2")
    evil = {"Origin": "https://evil.example"}
    # a cross-site form POST / fetch: refused before moto writes anything
    status, headers, _ = _request(server, "PUT", "/guard-bucket2/planted.txt", headers=evil, data=b"x")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert _keys(server, "guard-bucket2") == []
    status, headers, _ = _request(server, "OPTIONS", "/guard-bucket2/x", headers={
        **evil, "Access-Control-Request-Method": "DELETE"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = _request(server, "GET", "/guard-bucket2", headers={"Origin": "null"})
    assert status == 403


def test_loopback_origin_gets_its_own_origin_back_and_sdk_requests_get_no_cors(server):
    _client(server).create_bucket(Bucket="guard-bucket3")
    mine = "http://127.0.0.1:8000"
    status, headers, _ = _request(server, "OPTIONS", "/guard-bucket3/a.txt", headers={
        "Origin": mine, "Access-Control-Request-Method": "PUT"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == mine
    status, headers, _ = _request(server, "PUT", "/guard-bucket3/a.txt", headers={"Origin": mine}, data=b"a")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == mine
    assert _keys(server, "guard-bucket3") == ["a.txt"]
    status, headers, _ = _request(server, "GET", "/guard-bucket3?list-type=2")  # no Origin: no CORS headers
    assert not [k for k in headers if k.lower().startswith("access-control-")]
