"""actors.data.tiler on hostile input, called directly (no Ray): reads are capped by
``max_image_bytes`` (checked by size first, never read whole), non-regular files are refused without
blocking, and any exception of one row (decoder or otherwise) quarantines that row with its type."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from actors.data import rows as raw
from actors.data import tiler as tiler_module
from actors.data.tiler import ImageFetcher, Tiler, TilerConfig
from models.conversation import train_bpe_tokenizer
from models.flavours import from_name


def _turns(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _png(w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["what is this picture a cat sitting on a mat hello there"] * 20, 300)


def _run(tokenizer, rows, **kw):
    cfg = TilerConfig.from_flavour(from_name("debug"), max_seq_len=400, **kw)
    return {r["id"]: r for r in Tiler(cfg, tokenizer)(raw.to_table(rows)).to_pylist()}


def _row(rid, **kw):
    return raw.raw_row("s", rid, 1.0, conversations=_turns("<image>\nWhat?", "A cat."), **kw)


def test_an_oversized_image_is_too_large_by_its_size_and_never_read_whole(tokenizer, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # a sparse 64 MiB file: reading it whole would be the bug
        f.truncate(64 * 2**20)
    small = tmp_path / "small.png"
    small.write_bytes(_png())
    got = _run(tokenizer, [_row("big", image_paths=[str(big)]), _row("small", image_paths=[str(small)]),
                           raw.raw_row("s", "inline", 1.0, conversations=_turns("<image>\nx", "y"),
                                       image_bytes=[b"\x89PNG" + b"0" * 5000])],
               max_image_bytes=4096)
    assert got["big"]["reason"] == "too_large" and got["big"]["stage"] == "fetch"
    assert f"{64 * 2**20} bytes, over data.max_image_bytes=4096" in got["big"]["detail"]
    assert got["inline"]["reason"] == "too_large"
    assert got["small"]["reason"] is None  # 4096 is enough for the small PNG

    # a file whose size the store does not tell (or that grows) is cut at cap + 1 bytes
    asked = []

    class Stream(io.BytesIO):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    fetcher = ImageFetcher(None, max_bytes=100)
    monkeypatch.setattr(tiler_module.pafs, "LocalFileSystem", lambda: _SizeUnknown(Stream(b"x" * 10_000)))
    with pytest.raises(tiler_module._Quarantine) as q:
        fetcher.read(str(small))
    assert q.value.reason == "too_large" and asked == [101]


class _SizeUnknown:
    """A filesystem that reports a regular file of unknown size and serves ``stream``."""

    def __init__(self, stream):
        self.stream = stream

    def get_file_info(self, path):
        import pyarrow.fs as pafs

        return pafs.FileInfo(path, type=pafs.FileType.File)

    def open_input_stream(self, path, compression=None):
        return self.stream


def test_dev_zero_and_a_fifo_are_refused_without_reading(tokenizer, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block forever
    got = _run(tokenizer, [_row("zero", image_paths=["/dev/zero"]), _row("fifo", image_paths=[str(fifo)]),
                           _row("dir", image_paths=[str(tmp_path)])])
    for rid in ("zero", "fifo", "dir"):
        assert got[rid]["reason"] == "fetch_error" and "not a regular file" in got[rid]["detail"]


def test_a_gzip_named_image_is_not_expanded(tokenizer, tmp_path):
    import gzip

    path = tmp_path / "bomb.png.gz"
    path.write_bytes(gzip.compress(b"\0" * 2_000_000))  # 2 MB expanded, ~2 KB stored
    got = _run(tokenizer, [_row("gz", image_paths=[str(path)])], max_image_bytes=100_000)
    assert got["gz"]["reason"] == "corrupt_image"  # read as the bytes it is, not decompressed


@pytest.mark.parametrize("exc", [RuntimeError("boom"), MemoryError(), AssertionError("x"), IndexError("y")])
def test_a_decoder_error_outside_the_caught_list_quarantines_the_row(tokenizer, tmp_path, monkeypatch, exc):
    def broken(*a, **kw):
        raise exc

    monkeypatch.setattr(tiler_module, "store", broken)
    got = _run(tokenizer, [raw.raw_row("s", "img", 1.0, conversations=_turns("<image>\nx", "y"), image_bytes=[_png()]),
                           raw.raw_row("s", "text", 1.0, conversations=_turns("hello", "there"))])
    assert got["img"]["reason"] == "corrupt_image" and got["img"]["stage"] == "decode"
    assert type(exc).__name__ in got["img"]["detail"]
    assert got["text"]["reason"] is None  # the next row goes on


def test_any_other_exception_of_one_row_is_unexpected_error_with_its_type(tokenizer, monkeypatch):
    calls = []

    def flaky(conversation, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("division by zero")
        return real(conversation, *a, **kw)

    real = tiler_module.tokenize_conversation
    monkeypatch.setattr(tiler_module, "tokenize_conversation", flaky)
    got = _run(tokenizer, [raw.raw_row("s", "a", 1.0, conversations=_turns("hello", "there")),
                           raw.raw_row("s", "b", 1.0, conversations=_turns("hello", "there again"))])
    assert got["a"]["reason"] == "unexpected_error" and got["a"]["stage"] == "tile"
    assert got["a"]["detail"].startswith("ZeroDivisionError")
    assert got["b"]["reason"] is None
