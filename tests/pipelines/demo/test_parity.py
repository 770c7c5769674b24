"""pipelines.demo.parity's own rules: vLLM's stopping (stop string, EOS), the comparison, and the
batched PyTorch greedy decoding it runs (equal to one request at a time).

The parity figure itself, served endpoint vs PyTorch on the demo's trained model, is asserted
in tests/pipelines/demo/test_demo.py::test_short_demo_end_to_end.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from actors.serve.model_loader import debug_tokenizer
from actors.serve.vllm.engine import TURN_SEPARATOR
from pipelines.demo import parity


@pytest.fixture(scope="module")
def tokenizer():
    return debug_tokenizer(1024)


def test_served_view_stops_at_the_token_that_completes_the_turn_separator(tokenizer):
    ids = tokenizer.encode(" red\n### Human: blue", add_special_tokens=False)
    kept, text = parity.served_view(ids, tokenizer)
    assert text == " red\n"  # the stop string and everything after it is cut from the text
    decoded = tokenizer.decode(kept)
    assert decoded.endswith(tokenizer.decode(kept[-1:])) and TURN_SEPARATOR in decoded
    assert TURN_SEPARATOR not in tokenizer.decode(kept[:-1])  # the token completing "###" is the last
    assert len(kept) < len(ids)


def test_served_view_keeps_eos_in_the_tokens_but_not_in_the_text(tokenizer):
    ids = tokenizer.encode(" red", add_special_tokens=False) + [tokenizer.eos_token_id]
    kept, text = parity.served_view(ids, tokenizer)
    assert kept == ids and text == " red"
    # no stop: everything, as decoded
    ids = tokenizer.encode(" two words", add_special_tokens=False)
    assert parity.served_view(ids, tokenizer) == (ids, " two words")


def test_first_difference_and_compare_one():
    assert parity.first_difference(["a", "b"], ["a", "b"]) is None
    assert parity.first_difference(["a", "b"], ["a", "c"]) == 1
    assert parity.first_difference(["a"], ["a", "b"]) == 1
    assert parity.first_difference([], ["a"]) == 0
    served = {"text": " red\n", "tokens": [" red", "\n", "###"], "prompt_tokens": 100}
    assert parity.compare_one("q", served, [" red", "\n", "###"], " red\n", 100) is None
    diff = parity.compare_one("q", served, [" red", "\n", "##"], " red\n", 100)
    assert diff["at"] == 2 and diff["served"] == served["tokens"] and "prompt_tokens" not in diff
    diff = parity.compare_one("q", served, served["tokens"], " red\n", 101)  # same tokens, other prompt
    assert diff["at"] is None and diff["prompt_tokens"] == {"served": 100, "torch": 101}
    assert parity.compare_one("q", served, served["tokens"], " red", 100)["torch_text"] == " red"


def test_batched_greedy_equals_one_request_at_a_time(monkeypatch):
    from actors.serve.model_loader import random_member
    from models.chat_inputs import prepare_chat

    model, tok = random_member("debug")
    model.eval()
    rng = np.random.default_rng(0)
    prepared = []
    for i, size in enumerate([(96, 96), (200, 60), (60, 200), None, (300, 100), None]):  # None: text only
        if size is None:
            prepared.append(prepare_chat([{"role": "user", "content": f"Say the word {i}."}], [], tok,
                                         model.flavour, max_pixels=10**8))
            continue
        buf = io.BytesIO()
        w, h = size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
        prepared.append(prepare_chat(msgs, [buf.getvalue()], tok, model.flavour, max_pixels=10**8))
    batched = parity._generate(model, prepared, 6)
    monkeypatch.setattr(parity, "BATCH", 1)
    assert batched == parity._generate(model, prepared, 6)
    assert all(len(new) == 6 or new[-1] == model.eos_token_id for new in batched)
