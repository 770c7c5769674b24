"""actors.data.tiler: the decode + tile + tokenize UDF on a batch, called directly (no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.data import rows as raw
from actors.data.tiler import OUT_SCHEMA, SHARD_COLUMNS, Tiler, TilerConfig
from models.conversation import train_bpe_tokenizer
from models.flavours import from_name
from models.stored_image import row_views
from models.tiling import load_and_tile


def _turns(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["what is this picture a cat sitting on a mat hello there"] * 20, 300)


def _tiler(tokenizer, **kw):
    f = from_name("debug")
    cfg = TilerConfig.from_flavour(f, max_seq_len=kw.pop("max_seq_len", 400), **kw)
    return Tiler(cfg, tokenizer), cfg


def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    rng = np.random.default_rng(w * h)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def test_good_rows_match_models_tiling(tokenizer, tmp_path):
    (tmp_path / "wide.png").write_bytes(_png(100, 40))
    la = _png(30, 60, "LA")
    rows = [
        raw.raw_row("s", "file", 1.0, conversations=_turns("<image>\nWhat?", "A cat."),
                    image_paths=[str(tmp_path / "wide.png")]),
        raw.raw_row("s", "bytes", 3.0, conversations=_turns("What is this?", "A mat."), image_bytes=[la]),
        raw.raw_row("s", "text", 1.0, conversations=_turns("hello", "hello there")),
    ]
    tiler, cfg = _tiler(tokenizer)
    out = tiler(raw.to_table(rows))
    assert out.schema == OUT_SCHEMA and out.num_rows == 3
    got = {r["id"]: r for r in out.to_pylist()}
    spec = cfg.tile
    for rid, data in [("file", (tmp_path / "wide.png").read_bytes()), ("bytes", la)]:
        r, t = got[rid], load_and_tile(data, spec)
        assert r["reason"] is None
        views = np.frombuffer(row_views(r["images"], r["plans"], r["kept"], spec), np.uint8)
        np.testing.assert_array_equal(views.reshape(-1, spec.tile_size, spec.tile_size, 3), t.views)
        assert r["images"][0][:4] == b"RIFF" and r["plans"] == [*t.scaled_size, *t.offset]
        assert r["source_bytes"] == len(data) and r["stored_bytes"] == len(r["images"][0])
        assert r["kept"] == t.kept.tolist() and r["view_counts"] == [len(t.views)]
        n_skip = int((~t.kept).sum())
        assert r["image_tokens"] == (1 + t.n_kept) * (cfg.tokens_per_view + 2) + n_skip
        assert r["saved_tokens"] == n_skip * (cfg.tokens_per_view + 1)
        assert r["text_tokens"] + r["image_tokens"] == r["num_tokens"] == len(r["input_ids"]) == len(r["labels"])
    assert got["bytes"]["copies"] == 3
    assert got["text"]["images"] == [] and got["text"]["kept"] == [] and got["text"]["image_tokens"] == 0
    assert got["text"]["image_key"] is None and len({got[k]["sample_key"] for k in got}) == 3
    assert set(SHARD_COLUMNS) <= set(out.column_names)


def test_bad_rows_get_reason_and_stage(tokenizer, tmp_path):
    (tmp_path / "cut.png").write_bytes(_png(64, 64)[:200])
    big = io.BytesIO()
    Image.new("L", (2000, 2000)).save(big, "PNG")
    long_answer = "a cat sitting on a mat " * 200
    rows = [
        raw.raw_row("s", "missing", 1.0, conversations=_turns("<image>", "x"), image_paths=[str(tmp_path / "no.png")]),
        raw.raw_row("s", "cut", 1.0, conversations=_turns("<image>", "x"), image_paths=[str(tmp_path / "cut.png")]),
        raw.raw_row("s", "bomb", 1.0, conversations=_turns("<image>", "x"), image_bytes=[big.getvalue()]),
        raw.raw_row("s", "long", 1.0, conversations=_turns("hello", long_answer)),
        raw.raw_row("s", "order", 1.0, conversations=[{"from": "gpt", "value": "x"}]),
        raw.raw_row("s", "parsed-bad", 1.0, conversations="{", reason="invalid_json", detail="line 3"),
        raw.raw_row("s", "dropped", 0.01, conversations=_turns("<image>", "x"), image_paths=[str(tmp_path / "no.png")]),
    ]
    tiler, _ = _tiler(tokenizer, overflow="quarantine", max_pixels=1_000_000)
    got = {r["id"]: r for r in tiler(raw.to_table(rows)).to_pylist()}
    assert [(got[k]["stage"], got[k]["reason"]) for k in ["missing", "cut", "bomb", "long", "order", "parsed-bad"]] == [
        ("fetch", "missing_image"), ("decode", "corrupt_image"), ("decode", "too_many_pixels"),
        ("tokenize", "too_long"), ("tokenize", "bad_order"), ("parse", "invalid_json")]
    assert all(got[k]["detail"] and got[k]["input_ids"] is None for k in got if k != "dropped")
    # subsampled out (copies 0): passed through untouched, never fetched or quarantined
    assert got["dropped"]["copies"] == 0 and got["dropped"]["reason"] is None

    tiler, _ = _tiler(tokenizer, overflow="truncate")
    r = tiler(raw.to_table([rows[3]])).to_pylist()[0]
    assert r["reason"] is None and r["truncated"] and r["num_tokens"] == 400


def test_table_round_trips_through_json_parse(tokenizer, tmp_path):
    (tmp_path / "a.png").write_bytes(_png(20, 20))
    line = json.dumps({"id": 7, "image": "a.png", "conversations": _turns("<image>\nWhat?", "A cat.")})
    rows = raw.parse_json_file(line.encode(), "x.jsonl", source="s", ratio=1.0, image_root=str(tmp_path))
    out = _tiler(tokenizer)[0](pa.Table.from_pylist(rows, schema=raw.RAW_SCHEMA)).to_pylist()
    assert out[0]["id"] == "7" and out[0]["reason"] is None and out[0]["view_counts"] == [5]


def test_shard_mode_writes_good_rows_and_returns_bookkeeping(tokenizer, tmp_path):
    import pyarrow.parquet as pq

    from actors.data.tiler import BOOK_COLUMNS

    (tmp_path / "a.png").write_bytes(_png(50, 40))
    rows = [
        raw.raw_row("s", "one", 1.0, conversations=_turns("<image>\nWhat?", "A cat."), image_paths=[str(tmp_path / "a.png")]),
        raw.raw_row("s", "gone", 1.0, conversations=_turns("<image>\nWhat?", "A cat."),
                    image_paths=[str(tmp_path / "missing.png")]),
        raw.raw_row("s", "twice", 2.0, conversations=_turns("hello", "hello there")),
    ]
    f = from_name("debug")
    cfg = TilerConfig.from_flavour(f, max_seq_len=400)
    tiler = Tiler(cfg, tokenizer, shard_dir=str(tmp_path / "out"))
    book = tiler(raw.to_table(rows))
    assert book.column_names == BOOK_COLUMNS + ["shard", "reused"] and book.num_rows == 3
    assert book.column("reused").to_pylist() == [False] * 3
    assert book.column("reason").to_pylist() == [None, "missing_image", None]
    (path,) = set(book.column("shard").to_pylist())
    shard = pq.read_table(path)
    assert shard.column_names == SHARD_COLUMNS
    assert shard.column("id").to_pylist() == ["one", "twice", "twice"]  # copies repeated, bad row left out
    assert shard.to_pylist()[0] == Tiler(cfg, tokenizer)(raw.to_table(rows[:1])).select(SHARD_COLUMNS).to_pylist()[0]
    # a batch with no good row writes no file
    assert tiler(raw.to_table(rows[1:2])).column("shard").to_pylist() == [None]


def test_shard_mode_resumes_a_finished_block_without_redoing_it(tokenizer, tmp_path):
    """The same block (by content) gets the same files; once its book file is there, a later
    call returns it without fetching an image; a torn book file or a missing shard redoes it."""
    import pyarrow.parquet as pq

    img = tmp_path / "a.png"
    img.write_bytes(_png(50, 40))
    rows = raw.to_table([raw.raw_row("s", str(i), 1.0, conversations=_turns("<image>\nWhat?", f"A cat {i}."),
                                     image_paths=[str(img)]) for i in range(3)])
    cfg = TilerConfig.from_flavour(from_name("debug"), max_seq_len=400)
    first = Tiler(cfg, tokenizer, shard_dir=str(tmp_path / "out"))(rows)
    (path,) = set(first.column("shard").to_pylist())
    data = (tmp_path / "out" / path.rsplit("/", 1)[-1]).read_bytes()
    img.unlink()  # a redo would now quarantine every row as missing_image
    again = Tiler(cfg, tokenizer, shard_dir=str(tmp_path / "out"))(rows)
    assert again.column("reused").to_pylist() == [True] * 3
    assert again.drop_columns(["reused"]) == first.drop_columns(["reused"])
    assert pq.read_table(path).num_rows == 3 and open(path, "rb").read() == data
    # another block's content is another name
    other = Tiler(cfg, tokenizer, shard_dir=str(tmp_path / "out"))(rows.slice(0, 2))
    assert other.column("reason").to_pylist() == ["missing_image"] * 2 and other.column("reused")[0].as_py() is False
    # the shard gone (e.g. moved away by an interrupted finish): the block is redone
    import os
    os.remove(path)
    redo = Tiler(cfg, tokenizer, shard_dir=str(tmp_path / "out"))(rows)
    assert redo.column("reused").to_pylist() == [False] * 3 and redo.column("reason").to_pylist() == ["missing_image"] * 3


def test_layout_rows_system_turns_and_region_boxes(tokenizer, tmp_path):
    """A layout's leading system turn becomes the system prompt; a region row's <box:k> slots are
    filled in the canvas frame of the decoded image (debug: canvas 96, top_left), or the row is
    quarantined as bad_box when the box leaves the image."""
    from models.boxes import parse_boxes
    from models.conversation import SYSTEM_PROMPT

    (tmp_path / "wide.png").write_bytes(_png(100, 40))
    img = str(tmp_path / "wide.png")
    system = [{"from": "system", "value": "Be terse."}, *_turns("hello", "hello there")]
    rows = [
        raw.raw_row("s", "sys", 1.0, conversations=system),
        raw.raw_row("s", "plain", 1.0, conversations=system[1:]),
        raw.raw_row("s", "box", 1.0, conversations=_turns("<image>\nWhere is the cat?", "<box:0>"),
                    image_paths=[img], boxes=[[0, 10, 4, 60, 36]]),
        raw.raw_row("s", "bad", 1.0, conversations=_turns("<image>\nWhere?", "<box:0>"),
                    image_paths=[img], boxes=[[0, 10, 4, 160, 36]]),
    ]
    tiler, cfg = _tiler(tokenizer)
    got = {r["id"]: r for r in tiler(raw.to_table(rows)).to_pylist()}
    assert got["sys"]["reason"] is None and got["plain"]["reason"] is None
    assert got["sys"]["num_tokens"] != got["plain"]["num_tokens"]  # another system prompt
    assert tokenizer.decode(got["plain"]["input_ids"]).count(SYSTEM_PROMPT[:20]) == 1
    assert got["box"]["reason"] is None
    answer = tokenizer.decode([t for t, lab in zip(got["box"]["input_ids"], got["box"]["labels"]) if lab != -100])
    # 100x40 -> 96x38 at (0, 0): x 10 -> 0.10, y 4 -> 3.8/96 = 0.04, 60 -> 0.60, 36 -> 34.2/96 = 0.36
    assert parse_boxes(answer.replace(" ", ""))[0].boxes == [(0.10, 0.04, 0.60, 0.36)]
    assert (got["bad"]["reason"], got["bad"]["stage"]) == ("bad_box", "boxes")


def test_llava_records_with_boxes_are_written_in_the_canvas_frame(tokenizer, tmp_path):
    """A llava JSONL record's ``boxes`` (pixels) reach the shard as SPHINX's box text (debug: canvas
    96, top_left); a box that leaves its decoded image is quarantined bad_box at stage ``boxes``."""
    from models.boxes import parse_boxes

    (tmp_path / "wide.png").write_bytes(_png(100, 40))
    where = _turns("<image>\nWhere is the cat?", "<box:0>")
    lines = [json.dumps({"id": "box", "image": "wide.png", "conversations": where, "boxes": [[0, 10, 4, 60, 36]]}),
             json.dumps({"id": "out", "image": "wide.png", "conversations": where, "boxes": [[0, 10, 4, 60, 41.5]]})]
    rows = raw.parse_json_file("\n".join(lines).encode(), "g.jsonl", source="g", ratio=1.0, image_root=str(tmp_path))
    tiler, _ = _tiler(tokenizer)
    got = {r["id"]: r for r in tiler(raw.to_table(rows)).to_pylist()}
    answer = tokenizer.decode([t for t, lab in zip(got["box"]["input_ids"], got["box"]["labels"]) if lab != -100])
    # 100x40 -> 96x38 at (0, 0): x 10 -> 0.10, y 4 -> 3.8/96 = 0.04, 60 -> 0.60, 36 -> 34.2/96 = 0.36
    assert got["box"]["reason"] is None and parse_boxes(answer.replace(" ", ""))[0].boxes == [(0.10, 0.04, 0.60, 0.36)]
    assert (got["out"]["reason"], got["out"]["stage"]) == ("bad_box", "boxes") and "40" in got["out"]["detail"]
