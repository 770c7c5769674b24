"""Replica internals that need no Serve: request preparation (training code) and text streaming."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from actors.model_loader import debug_tokenizer
from actors.replica import TextStream, prepare_chat
from models.conversation import build_prompt
from models.flavours import from_name
from models.tiling import TileSpec, image_token_count, load_and_tile


@pytest.fixture(scope="module")
def tok():
    return debug_tokenizer(1024)


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 240)).save(buf, "PNG")
    return buf.getvalue()


def test_prepare_uses_the_training_tiling_and_template(tok):
    flavour = from_name("debug")
    spec = TileSpec.from_flavour(flavour)
    img = _png(90, 45)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image", "index": 0}]}]
    p = prepare_chat(msgs, [img], tok, flavour, max_pixels=10**6)
    tiled = load_and_tile(img, spec, max_pixels=10**6)
    n = image_token_count(90, 45, spec, flavour.tokens_per_view)
    assert p.image_tokens == [n]
    assert p.input_ids == build_prompt(msgs, tok, [n])
    assert np.array_equal(p.views, tiled.views) and np.array_equal(p.kept[0], tiled.kept)
    text_only = prepare_chat([{"role": "user", "content": "hi"}], [], tok, flavour, max_pixels=10**6)
    assert text_only.views is None and text_only.kept is None


def test_text_stream_cuts_at_stop_strings_and_never_leaks_them(tok):
    ids = tok.encode("the quick brown fox jumps", add_special_tokens=False)
    ts = TextStream(tok, ["fox"])
    text = "".join(ts.push(i) for i in ids if not ts.stopped) + ts.flush()
    assert text == "the quick brown " and ts.stopped
    ts = TextStream(tok, [])
    assert "".join(ts.push(i) for i in ids) + ts.flush() == "the quick brown fox jumps"


def test_member_weights_come_from_the_run_layout():
    from cluster.spec import parse_spec
    from pipelines.serve import member_weights

    spec = parse_spec({"storage": {"uri": "s3://bkt/run"}, "serve": {"models": [
        {"name": "a", "checkpoint": "@train"}, {"name": "b", "checkpoint": "models/x"},
        {"name": "c", "checkpoint": "/abs/dir"}, {"name": "d", "flavour": "debug"}]}})
    got = [member_weights(spec, m) for m in spec.serve.models]
    assert [(w.checkpoint_uri, w.require_success) for w in got] == [
        ("s3://bkt/run/train/export", True), ("s3://bkt/run/models/x", False), ("/abs/dir", False), (None, False)]
    assert got[3].flavour == "debug"
