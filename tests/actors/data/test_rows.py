"""actors.data.rows: every source format -> raw rows; validation reasons; deterministic ratio."""

from __future__ import annotations

import json

import pytest

from actors.data import rows as raw


def _turns(q="<image>\nWhat?", a="A cat."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_jsonl_lines_become_rows_with_reasons():
    lines = [
        json.dumps({"id": "a", "image": "x/a.jpg", "conversations": _turns()}),
        json.dumps({"conversations": _turns("hi", "hello")}),
        "{oops",
        "",
        json.dumps([1, 2]),
        json.dumps({"conversations": "not a list"}),
        json.dumps({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"conversations": [{"from": "system", "value": "x"}]}),
        json.dumps({"conversations": _turns()}),
        json.dumps({"image": ["a.jpg"], "conversations": _turns("<image><image>", "x")}),
        json.dumps({"image": 5, "conversations": _turns()}),
    ]
    rows = raw.parse_json_file("\n".join(lines).encode(), "d/s.jsonl", source="s", ratio=1.0, image_root="s3://b/img")
    assert [r["reason"] for r in rows] == [None, None, "invalid_json", "bad_field", "bad_field", "bad_field",
                                           "unknown_role", "image_mismatch", "image_mismatch", "bad_field"]
    assert rows[0]["id"] == "a" and rows[0]["image_paths"] == ["s3://b/img/x/a.jpg"]
    assert rows[1]["id"] == "s:1" and rows[1]["image_paths"] == []
    assert rows[2]["id"] == "s:2" and "line 3" in rows[2]["detail"] and rows[2]["stage"] == "parse"
    assert json.loads(rows[0]["conversations"]) == _turns()
    assert {r["id"] for r in rows[3:]} == {f"s:{i}" for i in range(4, 11)}  # the blank line is not a row


def test_json_array_and_broken_file():
    data = json.dumps([{"conversations": _turns("a", "b")}, {"id": "x", "conversations": _turns("c", "d")}])
    rows = raw.parse_json_file(data.encode(), "s.json", source="s", ratio=1.0, image_root=None, file_no=3)
    assert [r["id"] for r in rows] == ["s:3:0", "x"]
    broken = raw.parse_json_file(b"[{", "s.json", source="s", ratio=1.0, image_root=None)
    assert len(broken) == 1 and broken[0]["reason"] == "invalid_json" and broken[0]["id"] == "s:file"


def test_ratio_is_deterministic_and_proportional():
    keys = [f"k{i}" for i in range(4000)]
    half = [raw.copies_for(0.5, k) for k in keys]
    assert half == [raw.copies_for(0.5, k) for k in keys]
    assert set(half) == {0, 1} and 0.45 < sum(half) / len(keys) < 0.55
    assert {raw.copies_for(2.0, k) for k in keys} == {2}
    assert 2.45 < sum(raw.copies_for(2.5, k) for k in keys) / len(keys) < 2.55


def test_webdataset_and_parquet_rows():
    w = raw.wds_row({"__key__": "k1", "jpg": b"JPEG", "json": json.dumps({"conversations": _turns()}).encode(),
                     "txt": float("nan")}, source="w", ratio=1.0)
    assert w["reason"] is None and w["image_bytes"] == [b"JPEG"] and w["id"] == "w:k1"
    cap = raw.wds_row({"__key__": "k2", "png": b"PNG", "txt": b"a dog"}, source="w", ratio=1.0)
    assert json.loads(cap["conversations"])[1]["value"] == "a dog" and cap["image_bytes"] == [b"PNG"]
    assert raw.wds_row({"__key__": "k3", "json": b"{"}, source="w", ratio=1.0)["reason"] == "invalid_json"
    assert raw.wds_row({"__key__": "k4", "jpg": b"J"}, source="w", ratio=1.0)["reason"] == "bad_field"
    assert raw.wds_row({"__key__": "k5", "json": json.dumps({"conversations": _turns()}).encode()},
                       source="w", ratio=1.0)["reason"] == "image_mismatch"

    p = raw.parquet_row({"id": "p1", "conversations": json.dumps(_turns()), "image": {"bytes": b"IMG"}},
                        source="p", ratio=1.0)
    assert p["reason"] is None and p["image_bytes"] == [b"IMG"] and p["id"] == "p1"
    q = raw.parquet_row({"conversations": _turns("hi", "yo"), "image": None}, source="p", ratio=1.0)
    assert q["reason"] is None and q["id"].startswith("p:") and q["image_bytes"] == []
    assert raw.parquet_row({"conversations": "[", "image": None}, source="p", ratio=1.0)["reason"] == "invalid_json"


@pytest.mark.parametrize("root,rel,expected", [
    ("s3://b/img", "a.jpg", "s3://b/img/a.jpg"), ("/data/", "./x/a.jpg", "/data/x/a.jpg"),
    ("s3://b/img", "x/../a.jpg", "s3://b/img/a.jpg"), ("s3://b", "a/b.jpg", "s3://b/a/b.jpg"),
])
def test_image_references_resolve_under_the_root(root, rel, expected):
    assert raw.resolve_image(rel, root) == (expected, None, "")
