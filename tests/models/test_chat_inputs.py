"""models.chat_inputs: a chat request through the training code's tiling and template."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from actors.serve.model_loader import debug_tokenizer
from models.chat_inputs import prepare_chat
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
