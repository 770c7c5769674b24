"""cluster.storage against the embedded S3 server (the session's `s3` fixture)."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cluster.spec import StorageSection
from cluster.storage import ENDPOINT_ENV, RetryPolicy, Storage, is_transient, open_storage
from models.errors import UserError

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)


@pytest.fixture
def storage(s3):
    return open_storage(StorageSection(uri=f"s3://sphinx-x-test/{uuid.uuid4().hex[:10]}"), retry=FAST_RETRY)


def test_embedded_uses_fixture_server_and_creates_bucket(s3):
    bucket = f"fresh-{uuid.uuid4().hex[:8]}"
    st = open_storage(StorageSection(uri=f"s3://{bucket}/p"))
    assert st.endpoint_url == s3.endpoint_url == os.environ[ENDPOINT_ENV]
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    assert bucket in [b["Name"] for b in st.client().list_buckets()["Buckets"]]


def test_paths_and_uris(storage):
    bucket, prefix = storage.uri[5:].split("/", 1)
    assert storage.is_s3 and storage.bucket == bucket
    assert storage.path("a", "b.txt") == f"{bucket}/{prefix}/a/b.txt"
    assert storage.uri_for("a/", "/b") == f"s3://{bucket}/{prefix}/a/b"
    assert storage.uri_for() == storage.uri
    fs, path = storage.resolve("s3://other-bucket/x/y")
    assert isinstance(fs, pafs.S3FileSystem) and path == "other-bucket/x/y"
    fs, path = storage.resolve("/tmp/some/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/some/dir"
    with pytest.raises(UserError, match="only s3://"):
        storage.locate("gs://bucket/x")


def test_storage_never_shows_real_secrets(monkeypatch):
    monkeypatch.setenv("MY_KEY", "AKIAREALKEY")
    monkeypatch.setenv("MY_SECRET", "real-secret-value")
    section = StorageSection(uri="s3://bucket/p", endpoint_url=None, region="eu-west-1",
                             access_key_id_env="MY_KEY", secret_access_key_env="MY_SECRET")
    from cluster.storage import _credentials

    st = Storage(section.uri, endpoint_url=None, region=section.region, credentials=_credentials(section))
    assert "real-secret-value" not in repr(st) and "AKIAREALKEY" not in repr(st)


def test_embedded_without_a_known_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    with pytest.raises(UserError, match="embedded S3 endpoint is unknown"):
        open_storage(StorageSection(uri="s3://sphinx-x-test/p"))


def test_half_set_credentials_is_a_user_error(monkeypatch):
    monkeypatch.setenv("ONLY_KEY", "x")
    monkeypatch.delenv("NO_SECRET", raising=False)
    section = StorageSection(uri="s3://bucket/p", endpoint_url="http://127.0.0.1:1",
                             access_key_id_env="ONLY_KEY", secret_access_key_env="NO_SECRET")
    with pytest.raises(UserError, match=r"\$ONLY_KEY is set but \$NO_SECRET is not"):
        open_storage(section)


def test_bytes_list_exists_delete(storage):
    storage.write_bytes("a/one.txt", b"1")
    storage.write_bytes("a/sub/two.txt", b"22")
    storage.write_bytes("ab/three.txt", b"333")
    assert storage.read_bytes("a/sub/two.txt") == b"22"
    assert storage.list("a") == ["a/one.txt", "a/sub/two.txt"]  # a directory, not "ab"
    assert storage.list() == ["a/one.txt", "a/sub/two.txt", "ab/three.txt"]
    assert storage.list(storage.uri_for("a/sub")) == [storage.uri_for("a/sub/two.txt")]
    assert storage.exists("a") and storage.exists("a/one.txt") and not storage.exists("a/nope")
    assert storage.read_bytes(storage.uri_for("ab/three.txt")) == b"333"
    assert storage.read_bytes(storage.path("ab/three.txt")) == b"333"  # a filesystem path works too
    assert storage.list(storage.path("a/sub")) == [storage.path("a/sub/two.txt")]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/nope")
    assert storage.delete("a") == 2
    assert storage.list() == ["ab/three.txt"]
    assert storage.delete("ab/three.txt") == 1 and storage.list() == []


def test_multipart_roundtrip_boto3_and_pyarrow(storage, tmp_path):
    big = os.urandom(17 * 2**20)  # > 16 MiB: multipart in both clients
    src = tmp_path / "up"
    (src / "nested").mkdir(parents=True)
    (src / "nested" / "big.bin").write_bytes(big)
    (src / "small.txt").write_text("hello")
    storage.upload_dir(src, "model")
    head = storage.client().head_object(Bucket=storage.bucket, Key=storage.path("model/nested/big.bin")
                                        .split("/", 1)[1])
    assert head["ContentLength"] == len(big) and "-" in head["ETag"]  # a multipart ETag
    out = storage.download_dir("model", tmp_path / "down")
    assert (out / "nested" / "big.bin").read_bytes() == big and (out / "small.txt").read_text() == "hello"

    fs = storage.filesystem
    with fs.open_output_stream(storage.path("pa/big.bin")) as f:
        f.write(big)
    with fs.open_input_file(storage.path("pa/big.bin")) as f:
        assert f.size() == len(big)
        f.seek(len(big) - 10)
        assert f.read(10) == big[-10:]  # a ranged read
    assert storage.read_bytes("pa/big.bin") == big


def test_listing_more_than_1000_keys(storage):
    client = storage.client()
    bucket, prefix = storage.bucket, storage.path("many").split("/", 1)[1]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}/k{i:05d}", Body=b""), range(1005)))
    keys = storage.list("many")
    assert len(keys) == 1005 and keys[0] == "many/k00000" and keys[-1] == "many/k01004"
    infos = storage.filesystem.get_file_info(pafs.FileSelector(storage.path("many")))
    assert len(infos) == 1005
    assert storage.delete("many") == 1005 and not storage.exists("many")


def test_parquet_written_by_pyarrow_reads_back(storage):
    table = pa.table({"id": [f"s:{i}" for i in range(100)], "input_ids": [[i, i + 1] for i in range(100)]})
    pq.write_table(table, storage.path("shards/part-00000.parquet"), filesystem=storage.filesystem)
    assert storage.list("shards") == ["shards/part-00000.parquet"]
    back = pq.read_table(storage.path("shards"), filesystem=storage.filesystem)
    assert back.equals(table)


def test_retries_a_transient_error(storage, caplog):
    from botocore.exceptions import ConnectionClosedError

    storage.write_bytes("r/x", b"payload")
    failures = []

    def fail_once(request, **_):
        if not failures:
            failures.append(request.url)
            raise ConnectionClosedError(endpoint_url=request.url)

    client = storage.client()
    client.meta.events.register("before-send.s3.GetObject", fail_once)
    try:
        assert storage.read_bytes("r/x") == b"payload"
    finally:
        client.meta.events.unregister("before-send.s3.GetObject", fail_once)
    assert len(failures) == 1
    assert "retry 1/2" in caplog.text


def test_no_retry_on_4xx(storage):
    calls = []
    client = storage.client()
    client.meta.events.register("before-send.s3.GetObject", lambda request, **_: calls.append(1))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("r/absent")
    assert len(calls) == 1


def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))


def test_wrong_endpoint_is_one_clear_user_error():
    section = StorageSection(uri="s3://bucket/p", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(UserError) as err:
        open_storage(section, retry=FAST_RETRY)
    assert str(err.value) == "storage: cannot reach S3 endpoint http://127.0.0.1:9: connection refused"


def test_missing_bucket_is_a_clear_user_error(s3):
    section = StorageSection(uri="s3://no-such-bucket-here/p", endpoint_url=s3.endpoint_url)
    with pytest.raises(UserError) as err:
        open_storage(section, retry=FAST_RETRY)
    assert str(err.value) == f"storage: bucket 'no-such-bucket-here' does not exist at {s3.endpoint_url}"


def test_local_storage(tmp_path):
    st = open_storage(StorageSection(uri=str(tmp_path / "root")))
    assert not st.is_s3 and st.uri == str(tmp_path / "root")
    assert isinstance(st.filesystem, pafs.LocalFileSystem)
    assert st.path("a", "b") == str(tmp_path / "root" / "a" / "b") == st.uri_for("a/b")
    st.write_bytes("d/x.bin", b"x")
    st.write_bytes("d/e/y.bin", b"y")
    assert st.list("d") == ["d/e/y.bin", "d/x.bin"] and st.exists("d/x.bin")
    out = st.download_dir("d", tmp_path / "copy")
    assert (out / "e" / "y.bin").read_bytes() == b"y"
    st.upload_dir(out, "d2")
    assert st.list("d2") == ["d2/e/y.bin", "d2/x.bin"]
    assert st.delete("d") == 2 and not st.exists("d")


def test_storage_pickles_without_clients(storage):
    import pickle

    storage.client()
    clone = pickle.loads(pickle.dumps(storage))
    storage.write_bytes("p/x", b"1")
    assert clone.read_bytes("p/x") == b"1"


def test_upload_to_a_missing_bucket_is_a_clear_user_error(storage, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.upload_dir(tmp_path, "s3://no-such-bucket-x/p")


def test_a_ray_worker_without_the_endpoint_fails_instead_of_starting_its_own(ray_local, monkeypatch, tmp_path):
    monkeypatch.setenv("SPHINX_X_HOME", str(tmp_path))  # no `sphinx-x up` state either

    @ray_local.remote
    def open_in_worker():
        os.environ.pop(ENDPOINT_ENV, None)
        try:
            open_storage(StorageSection(uri="s3://sphinx-x-test/w"))
        except UserError as err:
            return str(err)
        return "opened"

    env = {"env_vars": {"SPHINX_X_HOME": str(tmp_path)}}
    assert "embedded S3 endpoint is unknown here" in ray_local.get(open_in_worker.options(runtime_env=env).remote())


def test_embedded_server_as_a_child_process_serves_and_stops():
    import boto3

    from cluster.storage import EmbeddedS3Process

    server = EmbeddedS3Process().start()
    proc = server._proc
    try:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="child")
        client.put_object(Bucket="child", Key="a", Body=b"hello")
        assert client.get_object(Bucket="child", Key="a")["Body"].read() == b"hello"
    finally:
        server.stop()
    assert proc.poll() is not None  # the child is gone
    with pytest.raises(RuntimeError):
        server.endpoint_url
