"""Replica internals that need no Serve or engine: the vLLM
prompt and its length, sampling parameters, error and logprob mapping."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from actors.serve.model_loader import debug_tokenizer
from actors.serve.replica import engine_error, image_size, openai_logprobs, prompt_ids
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


def test_vllm_prompt_has_one_placeholder_per_image_and_the_expanded_length(tok):
    from models.conversation import IMAGE

    flavour = from_name("debug")
    spec = TileSpec.from_flavour(flavour)
    msgs = [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "and"},
                                         {"type": "image", "index": 1}]}]
    images = [_png(90, 45), _png(30, 60)]
    ids, length = prompt_ids(msgs, images, tok, flavour)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    assert ids.count(image_id) == 2
    counts = [image_token_count(90, 45, spec, flavour.tokens_per_view), image_token_count(30, 60, spec, flavour.tokens_per_view)]
    assert length == len(build_prompt(msgs, tok, counts))
    assert image_size(b"not an image") is None


def test_image_size_follows_exif_orientation():
    im = Image.new("RGB", (80, 20))
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90°: shown 20 wide, 80 high
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert image_size(buf.getvalue()) == (20, 80)
    assert load_and_tile(buf.getvalue(), TileSpec.from_flavour(from_name("debug"))).original_size == (20, 80)


def test_sampling_params_add_the_turn_separator_and_the_openai_options():
    from vllm.sampling_params import RequestOutputKind

    from actors.serve.vllm.engine import TURN_SEPARATOR, sampling_params

    p = sampling_params({"stop": ["Q:"], "n": 3, "seed": 4, "temperature": 0.5, "top_p": 0.9, "logprobs": True,
                         "top_logprobs": 2}, max_tokens=9, stream=True)
    assert TURN_SEPARATOR == "###" and p.stop == ["Q:", "###"]
    assert (p.n, p.seed, p.temperature, p.top_p, p.logprobs, p.max_tokens) == (3, 4, 0.5, 0.9, 2, 9)
    assert p.output_kind == RequestOutputKind.DELTA
    plain = sampling_params({"temperature": 0}, max_tokens=4, stream=False)
    assert plain.stop == ["###"] and plain.logprobs is None and plain.output_kind == RequestOutputKind.FINAL_ONLY


def test_engine_errors_become_400s_with_the_image_reason():
    from models.tiling import ImageError

    try:
        try:
            raise ImageError("corrupt_image", "cannot read image header")
        except ImageError as err:
            raise ValueError(str(err)) from err
    except ValueError as err:
        wrapped = RuntimeError("engine generate error")
        wrapped.__cause__ = err
    item = engine_error(wrapped)["error"]
    assert (item["status"], item["code"]) == (400, "corrupt_image")
    long = engine_error(ValueError("The decoder prompt (length 2000) is longer than the maximum model length of 1024"))
    assert long["error"]["code"] == "context_length_exceeded"
    assert engine_error(RuntimeError("engine died")) is None


def test_logprobs_follow_openai_shape(tok):
    from types import SimpleNamespace

    from vllm.logprobs import Logprob

    ids = tok.encode("red blue", add_special_tokens=False)[:2]
    other = next(i for i in range(10, 100) if i not in ids)
    out = SimpleNamespace(token_ids=ids, logprobs=[
        {ids[0]: Logprob(-0.1, 1, "red"), other: Logprob(-2.5, 2, "x")},
        {ids[1]: Logprob(-3.0, 2, None), other: Logprob(-0.2, 1, "y")}])
    got = openai_logprobs(out, tok, top=2)
    assert [g["logprob"] for g in got] == [-0.1, -3.0]
    assert [t["token"] for t in got[1]["top_logprobs"]] == ["y", tok.decode([ids[1]])]
    assert got[0]["bytes"] == list("red".encode())
    assert openai_logprobs(SimpleNamespace(token_ids=ids, logprobs=None), tok, 2) is None


def test_member_weights_come_from_the_run_layout():
    from cluster.spec import parse_spec
    from pipelines.stages.serve import member_weights

    spec = parse_spec({"storage": {"uri": "s3://bkt/run"}, "serve": {"models": [
        {"name": "a", "checkpoint": "@train"}, {"name": "b", "checkpoint": "models/x"},
        {"name": "c", "checkpoint": "/abs/dir"}, {"name": "d", "flavour": "debug"}]}})
    got = [member_weights(spec, m) for m in spec.serve.models]
    assert [(w.checkpoint_uri, w.require_success) for w in got] == [
        ("s3://bkt/run/train/export", True), ("s3://bkt/run/models/x", False), ("/abs/dir", False), (None, False)]
    assert got[3].flavour == "debug"


def test_sampling_errors_are_400_and_tokenisation_runs_off_the_event_loop(tok, monkeypatch):
    """vLLM's SamplingParams refusal (n > 1 with greedy decoding) is a 400 item, not a crash;
    the prompt is tokenised in a worker thread, never on the replica's event loop."""
    import asyncio
    import threading

    import actors.serve.replica as rep

    cls = rep.ModelReplica.func_or_class
    replica = object.__new__(cls)
    replica.tokenizer, replica.flavour, replica.context = tok, from_name("debug"), 512
    threads = []
    real = rep.prompt_ids

    def spy(*args):
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setitem(cls.chat.__globals__, "prompt_ids", spy)
    payload = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "images": [],
               "max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "n": 2, "stop": [], "seed": None}

    async def collect():
        return [item async for item in replica.chat(payload)]

    items = asyncio.run(collect())
    assert items[0]["error"]["status"] == 400 and "greedy" in items[0]["error"]["message"]
    assert threads and threads[0] is not threading.main_thread()


def test_answers_carry_their_boxes_in_pixels_of_the_first_image(tok):
    """A fake engine streams "<p>the cat</p> [0.10,0.30,0.60,0.45]" in two deltas; the finish item
    (and ``complete``'s choice) has the box on the 100×50 image, through each flavour's canvas:
    debug (C 96, top_left: 100×50 -> 96×48 at (0, 0)) and debug-sphinx-tiny-1k (C 128, centre:
    128×64 at (0, 32), so y = (0.3·128 - 32)·50/64 = 5 and (0.45·128 - 32)·50/64 = 20)."""
    import asyncio
    from types import SimpleNamespace

    import actors.serve.replica as rep

    class FakeEngine:
        async def generate(self, prompt, params, request_id):
            pieces = [("<p>the cat</p> [0.10,", None), ("0.30,0.60,0.45]", "stop")]
            for text, finish in pieces:
                yield SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(
                    index=0, text=text, token_ids=[7], logprobs=None, finish_reason=finish)])

    def replica(flavour: str):
        r = object.__new__(rep.ModelReplica.func_or_class)
        r.tokenizer, r.flavour, r.context, r.engine = tok, from_name(flavour), 8192, FakeEngine()
        r._active, r._peaks, r.aborted, r.batch_sizes = 0, {}, 0, __import__("collections").Counter()
        r._batch_metric = SimpleNamespace(observe=lambda v: None)
        return r

    def payload(images):
        content = [{"type": "image", "index": 0}] if images else []
        return {"messages": [{"role": "user", "content": content + [{"type": "text", "text": "where?"}]}],
                "images": images, "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": [],
                "seed": None}

    async def run(r, p):
        return [item async for item in r.chat(p)], await r.complete(p)

    for flavour, expected in [("debug", [10.0, 30.0, 60.0, 45.0]), ("debug-sphinx-tiny-1k", [10.0, 5.0, 60.0, 20.0])]:
        items, whole = asyncio.run(run(replica(flavour), payload([_png(100, 50)])))
        boxes = [{"phrase": "the cat", "boxes": [expected]}]
        (finish,) = [i for i in items if "finish_reason" in i]
        assert finish["boxes"] == boxes and "boxes" not in items[1]
        assert whole["choices"][0]["text"] == "<p>the cat</p> [0.10,0.30,0.60,0.45]"
        assert whole["choices"][0]["boxes"] == boxes
    items, whole = asyncio.run(run(replica("debug"), payload([])))
    assert all("boxes" not in i for i in items) and "boxes" not in whole["choices"][0]
    assert rep.answer_boxes("no box", [_png(100, 50)], from_name("debug")) == []


@pytest.mark.parametrize("flavour, canvas_text", [
    ("debug", "[0.25,0.25,0.75,0.50]"),                  # C 96, top_left: 100×50 -> 96×48 at (0, 0)
    ("debug-sphinx-tiny-1k", "[0.25,0.50,0.75,0.75]"),   # C 128, centre: 100×50 -> 128×64 at (0, 32)
])
def test_a_region_box_survives_preprocess_text_and_serving_in_both_pads(flavour, canvas_text):
    """A region row's pixel box -> the text preprocess trains on (actors.data.regions.fill) -> the
    same text as an answer -> the pixel box the endpoint returns, exactly."""
    from actors.data.regions import fill
    from actors.serve.replica import answer_boxes

    spec = TileSpec.from_flavour(from_name(flavour))
    conv = [{"from": "human", "value": "<image>\nWhere is the cat?"}, {"from": "gpt", "value": "<p>the cat</p> <box:0>"}]
    trained = fill(conv, [[0, 25, 25, 75, 50]], [(100, 50)], spec)[1]["value"]
    assert trained == f"<p>the cat</p> {canvas_text}"
    assert answer_boxes(trained, [_png(100, 50)], from_name(flavour)) == [
        {"phrase": "the cat", "boxes": [[25.0, 25.0, 75.0, 50.0]]}]
