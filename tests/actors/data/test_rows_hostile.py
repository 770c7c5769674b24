"""actors.data.rows on hostile input: every bad record is quarantined alone with its reason (and
line number), good records next to it are kept, and the rows always fit RAW_SCHEMA
(docs/security.md lists each input and its outcome)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from actors.data import rows as raw
from actors.data.json_records import array_items


def _rec(i, **kw):
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}],
            **kw}


def _line(i, **kw) -> bytes:
    return json.dumps(_rec(i, **kw)).encode()


DEEP = b'{"conversations": ' + b"[" * 10000 + b"]" * 10000 + b"}"
BIG_INT = b'{"id": ' + b"7" * 5000 + b', "conversations": []}'
SURROGATE = b'{"id": "s", "conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "a"}]}'
SURROGATE_ID = b'{"id": "\\udfff", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "a"}]}'


@pytest.mark.parametrize("ref, reason", [
    ("/dev/zero", "outside_root"), ("/etc/passwd", "outside_root"), ("~/.aws/credentials", "outside_root"),
    ("../secret.jpg", "outside_root"), ("a/../../x.jpg", "outside_root"),
    ("../../../../../etc/passwd", "outside_root"),
    ("s3://other-bucket/a.jpg", "outside_root"), ("s3://b/imgs-not/a.jpg", "outside_root"),
    ("s3://b/img/../keys/a.jpg", "outside_root"), ("s3:///a.jpg", "outside_root"),
    ("http://169.254.169.254/latest/meta-data", "unsupported_image_uri"),
    ("file:///etc/passwd", "unsupported_image_uri"),
])
def test_references_outside_the_image_root_are_refused(ref, reason):
    uri, got, detail = raw.resolve_image(ref, "s3://b/img")
    assert uri is None and got == reason and detail
    rows = raw.parse_json_file(_line(0, image=ref), "d/s.jsonl", source="s", ratio=1.0, image_root="s3://b/img")
    assert rows[0]["reason"] == reason and rows[0]["stage"] == "parse" and rows[0]["image_paths"] == []


def test_a_local_root_confines_too_and_the_allow_list_widens_it(tmp_path):
    root = str(tmp_path / "img")
    assert raw.resolve_image("a/b.png", root) == (f"{root}/a/b.png", None, "")
    assert raw.resolve_image("../x.png", root)[1] == "outside_root"
    assert raw.resolve_image(str(tmp_path / "img2" / "x.png"), root)[1] == "outside_root"  # a sibling, not under
    allowed = ["s3://b/img", "s3://b/shared"]
    assert raw.resolve_image("../shared/x.jpg", "s3://b/img", allowed) == ("s3://b/shared/x.jpg", None, "")
    assert raw.resolve_image("s3://b/shared/y.jpg", "s3://b/img", allowed)[0] == "s3://b/shared/y.jpg"
    assert raw.resolve_image("../other/x.jpg", "s3://b/img", allowed)[1] == "outside_root"
    # the allow-list replaces the default: image_root itself must be listed to stay readable
    assert raw.resolve_image("a.jpg", "s3://b/img", ["s3://b/shared"])[1] == "outside_root"


def test_a_jsonl_file_loses_only_its_bad_lines_each_with_its_line_number():
    lines = [_line(0), b'{"id": "bad-byte", "conversations": "\xff"}', _line(2), b'{"id": "cut", "conversa',
             DEEP, BIG_INT, SURROGATE, SURROGATE_ID, b"", _line(9), b"\xc3\x28 not UTF-8"]
    rows = raw.parse_json_file(b"\n".join(lines), "d/s.jsonl", source="s", ratio=1.0, image_root="s3://b/img")
    assert len(rows) == 10  # one row per non-blank line: lost records are counted as they are
    reasons = [r["reason"] for r in rows]
    assert reasons == [None, "invalid_text", None, "invalid_json", "too_deep", "invalid_number", "invalid_text",
                       "invalid_text", None, "invalid_text"]
    assert [r["id"] for r in rows if r["reason"] is None] == ["r0", "r2", "r9"]
    for r, line_no in zip([rows[1], rows[3], rows[4], rows[5]], [2, 4, 5, 6]):
        assert f"line {line_no}:" in r["detail"] and r["stage"] == "parse"
    assert "UnicodeDecodeError" in rows[1]["detail"] and "4300" in rows[5]["detail"]
    raw.to_table(rows)  # every row fits the schema (surrogates escaped in the quarantined ones)


def test_a_json_array_loses_only_its_bad_records():
    good = [json.dumps(_rec(i)) for i in range(4)]
    bad_byte = b'{"id": "bb", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "a"}]}'
    data = b"[" + b",\n".join([good[0].encode(), bad_byte, good[1].encode(), b'{"id": "syn", "x": [1, 2,, 3]}',
                               DEEP, BIG_INT, good[2].encode(), SURROGATE, good[3].encode()]) + b"]"
    rows = raw.parse_json_file(data, "d/s.json", source="s", ratio=1.0, image_root="s3://b/img")
    assert [r["reason"] for r in rows] == [None, "invalid_text", None, "invalid_json", "too_deep", "invalid_number",
                                           None, "invalid_text", None]
    assert [r["id"] for r in rows if r["reason"] is None] == ["r0", "r1", "r2", "r3"]
    assert "line 4" in rows[3]["detail"] and rows[3]["id"] == "s:3"
    raw.to_table(rows)


def test_a_truncated_json_array_keeps_every_whole_record_and_quarantines_the_rest_once():
    whole = json.dumps([_rec(i) for i in range(5)]).encode()
    cut = whole[:whole.index(b'"r3"') + 2]  # cut inside the 4th record
    rows = raw.parse_json_file(cut, "d/s.json", source="s", ratio=1.0, image_root="s3://b/img")
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "s:file"]
    assert rows[3]["reason"] == "invalid_json" and "to the end of the file" in rows[3]["detail"]
    assert "d/s.json" in rows[3]["detail"] and "byte" in rows[3]["detail"]
    # a file cut between records, and one that is not an array at all
    assert [r["reason"] for r in raw.parse_json_file(whole[:whole.index(b', {"id": "r2"') + 1], "s.json", source="s",
                                                       ratio=1.0, image_root=None)] == [None, None]
    assert [r["reason"] for r in raw.parse_json_file(b"[{", "s.json", source="s", ratio=1.0, image_root=None)] == [
        "invalid_json"]


def test_array_items_finds_the_end_of_a_bad_record_by_brackets_and_strings():
    items = list(array_items(b'[{"a": "]}"}, {"b": [1e]}, "x", {"c": "\\"}{"}, {"d": '))
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["dict", "Broken", "str", "dict", "Broken"] and items[-1].rest and not items[1].rest


def test_webdataset_and_parquet_rows_never_raise():
    deep = b"[" * 10000 + b"]" * 10000
    for blob, reason in [(BIG_INT, "invalid_number"), (b'{"conversations": ' + deep + b"}", "too_deep"),
                         (b"\xff\xfe", "invalid_text"), (SURROGATE, "invalid_text")]:
        assert raw.wds_row({"__key__": "k", "json": blob}, source="w", ratio=1.0)["reason"] == reason
    conv = json.dumps([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}])
    for image, what in [("a string", "str"), (10**12, "int"), ([1, 2, 3], "list"), (1.5, "float"),
                        ({"path": "/etc/passwd", "bytes": None}, "struct without bytes")]:
        row = raw.parquet_row({"conversations": conv, "image": image}, source="p", ratio=1.0)
        assert row["reason"] == "bad_field" and what in row["detail"] and row["image_bytes"] == []
    assert raw.parquet_row({"conversations": BIG_INT.decode(), "image": None}, source="p",
                           ratio=1.0)["reason"] == "invalid_number"
    escaped = '[{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "a"}]'
    assert raw.parquet_row({"conversations": escaped, "image": None}, source="p", ratio=1.0)["reason"] == "invalid_text"
    assert raw.parquet_row({"conversations": [{"from": "human", "value": "\ud800"}, {"from": "gpt", "value": "a"}],
                            "image": None}, source="p", ratio=1.0)["reason"] == "invalid_text"


def test_a_good_record_too_deep_to_serialise_again_is_quarantined():
    import sys

    nested: list = []
    for _ in range(400):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)  # json.dumps of the record now runs out of depth
    try:
        row = raw.raw_row("s", "deep", 1.0, conversations=[{"from": "human", "value": "x", "extra": nested}])
    finally:
        sys.setrecursionlimit(limit)
    assert row["reason"] == "too_deep" and row["conversations"].startswith("<not serialisable")
    raw.to_table([row])


def test_to_table_turns_a_row_arrow_refuses_into_a_quarantined_row():
    good = raw.raw_row("s", "ok", 1.0, conversations=[{"from": "human", "value": "x"}])
    broken = {**good, "id": "bad", "image_bytes": [5], "copies": 2}
    table = raw.to_table([good, broken])
    assert table.schema == raw.RAW_SCHEMA
    assert table.column("reason").to_pylist() == [None, "unexpected_error"]
    assert table.column("copies").to_pylist()[1] == 2 and "raw row" in table.column("detail")[1].as_py()
    assert isinstance(table, pa.Table)
