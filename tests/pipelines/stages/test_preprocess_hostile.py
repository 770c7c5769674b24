"""preprocess on hostile data, end to end on the embedded S3 (docs/security.md): ONE run over
sources that hold every bad row at once. Each bad row is quarantined with its reason, every good
row is written (none lost), ``rows_in == rows_written + rows_quarantined``; the failed quarantine
gate leaves the stage incomplete, a rerun fails the same way and training refuses the shards,
until the limit changes."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

CAP = 20_000  # data.max_image_bytes for this test


def _png(seed: int, w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _rec(rid: str, image=None, q="What?") -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q},
                                        {"from": "gpt", "value": f"Answer {rid}."}]}
    return {**rec, "image": image} if image else rec


def _line(rid: str, image=None) -> bytes:
    return json.dumps(_rec(rid, image)).encode()


# source `hostile` (JSONL), line by line: (error id, reason); reason None = a good row to be written
HOSTILE = [
    ("good-img", None), ("good-text", None), ("good-shared", None), ("good-dotdot", None),
    ("dev-zero", "outside_root"), ("abs-path", "outside_root"), ("climb", "outside_root"),
    ("other-bucket", "outside_root"), ("too-large", "too_large"), ("http", "unsupported_image_uri"),
    ("hostile:10", "invalid_text"),    # a byte that is not UTF-8 (line 11)
    ("hostile:11", "invalid_json"),    # a truncated line (line 12)
    ("surrogate", "invalid_text"),     # a \ud800 escape
    ("hostile:13", "too_deep"),        # 10000-deep lists (line 14)
    ("hostile:14", "invalid_number"),  # a 5000-digit integer (line 15)
]


def _hostile_lines(bucket_root: str) -> bytes:
    lines = [
        _line("good-img", "a.png"), _line("good-text"), _line("good-shared", f"{bucket_root}/shared/s.png"),
        _line("good-dotdot", "sub/../a.png"),
        _line("dev-zero", "/dev/zero"), _line("abs-path", "/etc/passwd"), _line("climb", "../../secret.png"),
        _line("other-bucket", "s3://some-other-bucket/a.png"), _line("too-large", "big.png"),
        _line("http", "http://169.254.169.254/latest/meta-data/"),
        b'{"id": "bad-byte", "conversations": "\xff"}',
        b'{"id": "cut", "conversations": [{"from": "hu',
        b'{"id": "surrogate", "conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "a"}]}',
        b'{"id": "deep", "conversations": ' + b"[" * 10000 + b"]" * 10000 + b"}",
        b'{"id": ' + b"9" * 5000 + b', "conversations": []}',
    ]
    return b"\n".join(lines)


def _array_cut() -> bytes:
    whole = json.dumps([_rec(f"arr-{i}") for i in range(4)]).encode()
    return whole[:whole.index(b'"arr-3"') + 4]  # cut inside the 4th record: 3 kept, the rest lost once


def _parquet_wrong_type() -> bytes:
    rows = [{"id": f"pq-{i}", "conversations": json.dumps(_rec("x")["conversations"]),
             "image": None if i == 1 else f"img-{i}.png"} for i in range(3)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("conversations", pa.string()), ("image", pa.string())])), buf)
    return buf.getvalue()


EXPECTED_WRITTEN = {"good-img", "good-text", "good-shared", "good-dotdot", "arr-0", "arr-1", "arr-2", "pq-1"}


@pytest.fixture
def hostile_spec(make_spec):
    from cluster.storage import open_storage

    probe = make_spec()
    root = probe.storage.uri
    storage = open_storage(probe.storage)
    storage.write_bytes("data/images/a.png", _png(1))
    storage.write_bytes("data/images/big.png", _png(2, 300, 300))  # ~270 KB: over the cap
    storage.write_bytes("data/shared/s.png", _png(3))
    storage.write_bytes("secret.png", _png(4))  # what "../../secret.png" would reach
    storage.write_bytes("data/hostile.jsonl", _hostile_lines(f"{root}/data"))
    storage.write_bytes("data/arr.json", _array_cut())
    storage.write_bytes("data/pq/part-0.parquet", _parquet_wrong_type())

    def spec(limit: float):
        sources = [
            {"name": "hostile", "path": f"{root}/data/hostile.jsonl", "image_root": f"{root}/data/images",
             "allowed_image_prefixes": [f"{root}/data/images", f"{root}/data/shared"]},
            {"name": "arr", "path": f"{root}/data/arr.json"},
            {"name": "pq", "path": f"{root}/data/pq"},
        ]
        return make_spec(storage={"uri": root}, data={
            "sources": sources, "output": "shards", "max_seq_len": 256, "max_image_bytes": CAP,
            "max_quarantine_fraction": limit, "rows_per_shard": 64, "concurrency": 1})
    return spec, storage


def test_every_hostile_row_is_quarantined_alone_and_no_good_row_is_lost(ray_local, hostile_spec):
    from actors.data.manifest import Manifest
    from models.errors import UserError
    from models.flavours import from_name
    from pipelines.stages import preprocess
    from pipelines.stages.train import check_manifest

    spec, storage = hostile_spec
    strict = spec(0.05)
    with pytest.raises(preprocess.QuarantineError) as err:
        preprocess.run_stage(strict)
    m = json.loads(storage.read_bytes("shards/_manifest.json"))
    assert m["rows_in"] == m["rows_written"] + m["rows_quarantined"] == err.value.summary["rows_in"]
    assert m["quarantine_gate"] == {"max_quarantine_fraction": 0.05, "passed": False}

    errs = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(k))) for k in storage.list("shards/errors")
                             if k.endswith(".parquet")])
    by_id = {r["id"]: r for r in errs.to_pylist()}
    for rid, reason in HOSTILE:
        if reason:
            assert by_id[rid]["reason"] == reason and by_id[rid]["detail"], (rid, by_id.get(rid))
    for line_no in (11, 12, 14, 15):
        assert f"line {line_no}:" in by_id[f"hostile:{line_no - 1}"]["detail"]
    assert by_id["too-large"]["stage"] == "fetch" and by_id["dev-zero"]["stage"] == "parse"
    assert by_id["arr:file"]["reason"] == "invalid_json" and "to the end of the file" in by_id["arr:file"]["detail"]
    assert by_id["pq-0"]["reason"] == by_id["pq-2"]["reason"] == "bad_field" and "str" in by_id["pq-0"]["detail"]
    quarantined = sum(1 for _, r in HOSTILE if r) + 1 + 2  # + the array's rest + 2 wrong-type images
    assert m["rows_quarantined"] == errs.num_rows == quarantined
    assert Counter(m["quarantined_by_reason"]) == Counter(errs.column("reason").to_pylist())

    # every good row is written, and nothing else
    shards = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f"shards/{n}"))) for n in m["shards"]])
    assert set(shards.column("id").to_pylist()) == EXPECTED_WRITTEN and m["rows_written"] == len(EXPECTED_WRITTEN)
    assert m["rows_in"] == len(EXPECTED_WRITTEN) + quarantined

    # the failed gate: not complete, training refuses, a rerun fails the same way
    assert not preprocess.is_complete(strict)
    manifest = Manifest.from_json(storage.read_bytes("shards/_manifest.json"))
    with pytest.raises(UserError, match="failed the quarantine gate"):
        check_manifest(manifest, from_name("debug"), "shards", max_quarantine_fraction=0.05)
    with pytest.raises(preprocess.QuarantineError):
        preprocess.run_stage(strict)
    assert json.loads(storage.read_bytes("shards/_manifest.json"))["rows_quarantined"] == quarantined

    # the limit raised: the run passes, the stage is complete and a plain run skips
    loose = spec(0.9)
    summary = preprocess.run_stage(loose)
    assert summary["quarantine_gate"]["passed"] and preprocess.is_complete(loose)
    assert not preprocess.is_complete(strict)  # the shards are still over the stricter limit
    assert preprocess.run_stage(loose)["skipped"] is True
    check_manifest(Manifest.from_json(storage.read_bytes("shards/_manifest.json")), from_name("debug"), "shards",
                   max_quarantine_fraction=0.9)


def _manifest(gate, quarantined: int, rows_in: int = 10):
    from dataclasses import asdict

    from actors.data.manifest import Counts, ImageBytes, Manifest, SourceCounts, Tiling, TokenizerFacts, Tokens
    from models.flavours import from_name

    c = Counts(rows_read=rows_in, subsampled_out=0, duplicate_samples=0, duplicate_images=0, rows_in=rows_in,
               rows_written=rows_in - quarantined, rows_quarantined=quarantined, rows_truncated=0,
               quarantined_by_reason={"outside_root": quarantined} if quarantined else {})
    src = SourceCounts(**asdict(c), text_tokens=1, image_tokens=0, saved_tokens=0, source_bytes=0, stored_bytes=0,
                       ratio=1.0, dedup="samples")
    return Manifest(flavour="debug", shard_format=2, shards=("part-00000.parquet",), error_shards=(),
                    tiling=Tiling.from_flavour(from_name("debug")),
                    tokenizer=TokenizerFacts(path="tokenizer", vocab_size=300, image_token_id=4), max_seq_len=256,
                    overflow="truncate", max_image_pixels=1000, counts=c, rows_reused=0, tokens=Tokens(1, 0, 0),
                    image_bytes=ImageBytes(0, 0, "webp"), sources={"s": src}, code_version="x", seconds=0.0,
                    quarantine_gate=gate)


def test_training_refuses_a_manifest_that_failed_the_gate():
    """No Ray: check_manifest on manifests built in memory (a recorded failed gate; a version-1
    file without a gate, judged by its counts under the spec's limit)."""
    from actors.data.manifest import Manifest, QuarantineGate
    from models.errors import UserError
    from models.flavours import from_name
    from pipelines.stages.train import check_manifest

    debug = from_name("debug")
    with pytest.raises(UserError, match=r"failed the quarantine gate \(3 of 10 rows were quarantined, over "
                                        r"data.max_quarantine_fraction=0.05 when preprocessed\)"):
        check_manifest(_manifest(QuarantineGate(0.05, False), 3), debug, "s3://b/shards", max_quarantine_fraction=0.5)
    check_manifest(_manifest(QuarantineGate(0.5, True), 3), debug, "s3://b/shards", max_quarantine_fraction=0.5)
    old = _manifest(None, 3).to_dict()
    del old["version"], old["quarantine_gate"]  # a version-1 file, as preprocess wrote them before
    v1 = Manifest.from_dict(old)
    with pytest.raises(UserError, match="over data.max_quarantine_fraction=0.05"):
        check_manifest(v1, debug, "s3://b/shards", max_quarantine_fraction=0.05)
    check_manifest(v1, debug, "s3://b/shards", max_quarantine_fraction=0.5)
    check_manifest(_manifest(None, 0), debug, "s3://b/shards", max_quarantine_fraction=0.0)  # synthetic shards


def test_allowed_image_prefixes_resolve_by_the_path_rule_and_may_not_be_empty(tmp_path):
    """No Ray: resolve_source on local storage."""
    from cluster.layout import Layout
    from cluster.spec import parse_spec
    from cluster.storage import Storage
    from models.errors import UserError
    from pipelines.stages.preprocess_sources import resolve_source

    (tmp_path / "d.jsonl").write_bytes(_line("x"))

    def source(**kw):
        spec = parse_spec({"name": "t", "storage": {"uri": str(tmp_path)},
                           "data": {"sources": [{"name": "s", "path": "d.jsonl", **kw}]}}, "t")
        return resolve_source(Storage(str(tmp_path), endpoint_url=None, region="us-east-1"), Layout.from_spec(spec), 0,
                              spec.data.sources[0])

    assert source().image_prefixes == () and source().image_root == str(tmp_path)
    got = source(image_root="img", allowed_image_prefixes=["img", "s3://b/shared"])
    assert got.image_prefixes == (str(tmp_path / "img"), "s3://b/shared")
    with pytest.raises(UserError, match=r"data.sources\[0\] \(s\): allowed_image_prefixes is empty"):
        source(allowed_image_prefixes=[])
