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


def test_llava_records_carry_their_boxes_or_are_quarantined_as_bad_box():
    """A llava record's optional ``boxes`` (pixels, named by <box:k> slots) travels in the raw
    column; what needs no image size is refused here with the region layouts' reason ``bad_box``."""
    where = _turns("<image>\nWhere is the red square?", "<box:0>")
    records = [
        {"id": "ok", "image": "a.png", "conversations": where, "boxes": [[0, 40.5, 12.25, 98.0, 69.75]]},
        {"id": "plain", "image": "a.png", "conversations": _turns()},
        {"id": "unused", "image": "a.png", "conversations": _turns(), "boxes": [[0, 1, 1, 5, 5]]},
        {"id": "two", "image": ["a.png", "b.png"], "boxes": [[0, 1, 1, 5, 5], [1, 2, 2, 9, 9]],
         "conversations": _turns("<image><image>\nBoth?", "<p>dots</p> <box:0;1>")},
        {"id": "no_box", "image": "a.png", "conversations": where},  # a slot without a box
        {"id": "short", "image": "a.png", "conversations": where, "boxes": [[0, 1, 1, 5]]},  # malformed
        {"id": "flat", "image": "a.png", "conversations": where, "boxes": [0, 1, 1, 5, 5]},
        {"id": "text", "image": "a.png", "conversations": where, "boxes": [[0, "1", 1, 5, 5]]},
        {"id": "bool", "image": "a.png", "conversations": where, "boxes": [[True, 1, 1, 5, 5]]},
        {"id": "dict", "image": "a.png", "conversations": where, "boxes": {"0": [1, 1, 5, 5]}},
        {"id": "image1", "image": "a.png", "conversations": where, "boxes": [[1, 1, 1, 5, 5]]},  # out of range
        {"id": "half", "image": "a.png", "conversations": where, "boxes": [[0.5, 1, 1, 5, 5]]},
        {"id": "noimg", "conversations": _turns("Where?", "<box:0>"), "boxes": [[0, 1, 1, 5, 5]]},  # no image
        {"id": "empty", "image": "a.png", "conversations": where, "boxes": [[0, 5, 1, 5, 5]]},
        {"id": "slot1", "image": "a.png", "conversations": _turns("<image>\nWhere?", "<box:0;1>"),
         "boxes": [[0, 1, 1, 5, 5]]},
        {"id": "inf", "image": "a.png", "conversations": where, "boxes": [[0, 1, 1, float("inf"), 5]]},
    ]
    data = "\n".join(json.dumps(r) for r in records).encode()
    rows = {r["id"]: r for r in raw.parse_json_file(data, "g.jsonl", source="g", ratio=1.0, image_root="s3://b/img")}
    assert json.loads(rows["ok"]["boxes"]) == [[0, 40.5, 12.25, 98.0, 69.75]] and rows["ok"]["reason"] is None
    assert json.loads(rows["ok"]["conversations"]) == where and rows["ok"]["image_paths"] == ["s3://b/img/a.png"]
    assert rows["plain"]["boxes"] is None and rows["plain"]["reason"] is None
    assert rows["unused"]["reason"] is None and json.loads(rows["two"]["boxes"])[1] == [1, 2, 2, 9, 9]
    bad = {"no_box", "short", "flat", "text", "bool", "dict", "image1", "half", "noimg", "empty", "slot1", "inf"}
    assert {k for k, r in rows.items() if r["reason"]} == bad
    assert {(rows[k]["reason"], rows[k]["stage"], rows[k]["boxes"]) for k in bad} == {("bad_box", "parse", None)}
    assert "slot <box:0> names a box the record does not have (0 box(es))" in rows["no_box"]["detail"]
    assert "box 0 is of image 1, but the record has 1 image(s)" in rows["image1"]["detail"]
    assert "the record has 0 image(s)" in rows["noimg"]["detail"] and "is empty" in rows["empty"]["detail"]
    assert "expected a list" in rows["dict"]["detail"] and "expected [image, x1, y1, x2, y2]" in rows["short"]["detail"]
    # the tokenizer's text pass (no image root) carries them too
    text_pass = raw.parse_json_file(data, "g.jsonl", source="g", ratio=1.0, image_root=None)
    assert text_pass[0]["boxes"] == rows["ok"]["boxes"]


def test_webdataset_and_parquet_llava_rows_carry_boxes():
    rec = {"conversations": _turns("<image>\nWhere?", "<box:0>"), "boxes": [[0, 1, 2, 3, 4]]}
    w = raw.wds_row({"__key__": "k", "png": b"PNG", "json": json.dumps(rec).encode()}, source="w", ratio=1.0)
    assert w["reason"] is None and json.loads(w["boxes"]) == [[0, 1, 2, 3, 4]]
    w2 = raw.wds_row({"__key__": "k", "json": json.dumps(rec).encode()}, source="w", ratio=1.0)
    assert w2["reason"] == "image_mismatch"  # the placeholder's image is missing: checked first
    for boxes in ([[0.0, 1.0, 2.0, 3.0, 4.0]], json.dumps([[0, 1, 2, 3, 4]])):
        p = raw.parquet_row({**rec, "boxes": boxes, "image": b"IMG"}, source="p", ratio=1.0)
        assert p["reason"] is None and json.loads(p["boxes"]) == [[0, 1, 2, 3, 4]]
    for boxes in ("[[0, 1", None, [[2, 1, 2, 3, 4]]):
        assert raw.parquet_row({**rec, "boxes": boxes, "image": b"IMG"}, source="p", ratio=1.0)["reason"] == "bad_box"


def test_the_demos_region_rows_are_read_with_their_boxes():
    """pipelines.demo.synthetic's ``regions=True`` train rows: every ``where`` answer keeps its box."""
    from pipelines.demo import synthetic

    ds = synthetic.generate(24, 2, seed=1, regions=True)  # 4 one-shape scenes
    records = ds.train_rows()
    data = "\n".join(json.dumps(r) for r in records).encode()
    rows = raw.parse_json_file(data, "train.jsonl", source="demo", ratio=1.0, image_root="/d")
    assert [r["reason"] for r in rows] == [None] * len(records)
    with_boxes = [(r, rec) for r, rec in zip(rows, records) if "boxes" in rec]
    assert with_boxes and all(json.loads(r["boxes"]) == rec["boxes"] for r, rec in with_boxes)
    assert all(r["boxes"] is None for r, rec in zip(rows, records) if "boxes" not in rec)
