"""The continuous-batching decode loop without Serve: joining mid-batch, per-request limits,
batching off, cancellation, errors."""

from __future__ import annotations

import threading

import pytest
import torch

from actors.decode_loop import DecodeLoop, Request
from actors.model_loader import random_member
from actors.replica import TextStream


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["debug", "debug-moe"])
def member(request):
    model, tok = random_member(request.param)
    return model.eval(), tok


class _Collect:
    """deliver(): items per request, and an event per finished request."""

    def __init__(self):
        self.items: dict[int, list] = {}
        self.done: dict[int, threading.Event] = {}

    def __call__(self, pairs):
        for r, item in pairs:
            self.items.setdefault(id(r), []).append(item)
            if isinstance(item, BaseException) or "finish_reason" in item:
                self.done.setdefault(id(r), threading.Event()).set()

    def final(self, r: Request, timeout: float = 60) -> dict:
        self.done.setdefault(id(r), threading.Event()).wait(timeout)
        return self.items[id(r)][-1]


class _Hook(TextStream):
    """A TextStream that runs ``then()`` (on the decode thread) when its request has ``after`` tokens."""

    def __init__(self, tok, after: int, then, stops=()):
        super().__init__(tok, list(stops))
        self.after, self.then = after, then

    def push(self, token: int) -> str:
        out = super().push(token)
        if len(self.ids) == self.after:
            self.then()
        return out


def _prompt(tok, text: str) -> list[int]:
    return tok.encode(text)


def test_a_request_arriving_mid_batch_joins_it_and_decodes_as_if_alone(member):
    model, tok = member
    sink = _Collect()
    loop = DecodeLoop(model, max_batch_size=8, wait_s=0.0, deliver=sink)
    try:
        late = Request(_prompt(tok, "a later, longer question about shapes and colours"), 6, TextStream(tok, []))
        first = Request(_prompt(tok, "hello"), 12, _Hook(tok, 3, lambda: loop.submit(late)))
        loop.submit(first)
        a, b = sink.final(first), sink.final(late)
    finally:
        loop.close()
    assert a["finish_reason"] == b["finish_reason"] == "length"
    assert (a["completion_tokens"], b["completion_tokens"]) == (12, 6)
    assert a["batch_size"] == 2 and b["batch_size"] == 2  # decoded together
    alone = [model.generate([r.input_ids], max_new_tokens=r.max_new, temperature=0.0, eos_token_id=-1)[0]
             for r in (first, late)]
    assert first.text.ids == alone[0] and late.text.ids == alone[1]
    assert a["delta"] == tok.decode(alone[0], skip_special_tokens=True)
    assert loop.stats()["mean_rows_per_step"] > 1


def test_per_request_limits_stop_strings_and_eos_mid_batch(member):
    model, tok = member
    prompts = [_prompt(tok, t) for t in ("one", "two three", "four five six")]
    free = model.generate(prompts, max_new_tokens=8, temperature=0.0, eos_token_id=-1)
    stop_text = tok.decode(free[1][:4], skip_special_tokens=True)[-2:]  # a stop string seen by token 4
    sink = _Collect()
    loop = DecodeLoop(model, max_batch_size=8, wait_s=0.05, deliver=sink)
    try:
        eos_like = free[2][2]  # row 2 stops on its third token as if it were eos
        rows = [Request(prompts[0], 3, TextStream(tok, [])),
                Request(prompts[1], 8, TextStream(tok, [stop_text])),
                Request(prompts[2], 8, TextStream(tok, []), stop_token_ids=frozenset([eos_like]))]
        for r in rows:
            loop.submit(r)
        finals = [sink.final(r) for r in rows]
    finally:
        loop.close()
    assert finals[0] == {**finals[0], "finish_reason": "length", "completion_tokens": 3}
    assert finals[1]["finish_reason"] == "stop" and stop_text not in finals[1]["delta"]
    assert finals[1]["delta"] == tok.decode(free[1], skip_special_tokens=True).split(stop_text)[0]
    k = free[2].index(eos_like)
    assert finals[2]["finish_reason"] == "stop" and finals[2]["completion_tokens"] == k + 1
    assert rows[2].text.ids == free[2][:k]  # the stop token is counted, never shown


def test_streams_flush_text_before_the_end_and_seeds_make_sampling_repeatable(member):
    model, tok = member
    sink = _Collect()
    loop = DecodeLoop(model, max_batch_size=4, wait_s=0.02, deliver=sink)
    try:
        rs = [Request(_prompt(tok, "tell me"), 10, TextStream(tok, []), stream=True, temperature=1.0, top_p=0.9,
                      seed=7) for _ in range(2)]
        for r in rs:
            loop.submit(r)
        finals = [sink.final(r) for r in rs]
    finally:
        loop.close()
    texts = ["".join(i["delta"] for i in sink.items[id(r)]) for r in rs]
    assert texts[0] == texts[1] == tok.decode(rs[0].text.ids, skip_special_tokens=True)
    assert len(sink.items[id(rs[0])]) >= 2  # at least one flush before the final
    assert all(f["completion_tokens"] == 10 for f in finals)


def test_max_batch_size_1_decodes_every_request_alone(member):
    model, tok = member
    sink = _Collect()
    loop = DecodeLoop(model, max_batch_size=1, wait_s=0.0, deliver=sink)
    try:
        rs = [Request(_prompt(tok, f"question {i}"), 4, TextStream(tok, [])) for i in range(3)]
        for r in rs:
            loop.submit(r)
        assert all(sink.final(r)["batch_size"] == 1 for r in rs)
    finally:
        loop.close()
    assert loop.stats()["mean_rows_per_step"] == 1


def test_a_cancelled_request_leaves_the_batch_and_errors_reach_every_row(member):
    model, tok = member
    sink = _Collect()
    loop = DecodeLoop(model, max_batch_size=8, wait_s=0.0, deliver=sink)
    try:
        gone = Request(_prompt(tok, "bye"), 50, TextStream(tok, []))
        stay = Request(_prompt(tok, "stay"), 8, _Hook(tok, 2, lambda: setattr(gone, "cancelled", True)))
        loop.submit(gone)
        loop.submit(stay)
        assert sink.final(stay)["completion_tokens"] == 8
        assert id(gone) not in sink.items and gone.produced < 50
        bad = Request(_prompt(tok, "image?"), 4, TextStream(tok, []), views=None)
        bad.input_ids = bad.input_ids + [model.image_token_id]  # an image token without its image
        loop.submit(bad)
        assert isinstance(sink.final(bad), Exception)
        ok = Request(_prompt(tok, "still alive"), 2, TextStream(tok, []))
        loop.submit(ok)
        assert sink.final(ok)["completion_tokens"] == 2  # the loop survived the error
    finally:
        loop.close()
