"""Replica internals that need no Serve or engine: the vLLM
prompt and its length, sampling parameters, error and logprob mapping."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from actors.serve.model_loader import debug_tokenizer
from actors.serve.replica import engine_error, image_size, openai_logprobs, prompt_ids
from models.conversation import SEP, build_prompt
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
        r._warming = False
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


# (flavour, image size, the source row's pixel box, the box text the shard holds, worked out by hand)
# debug: C 96, pad top_left; debug-sphinx-tiny-1k: C 128, pad centre (the release's frame)
SOURCE_BOXES = [
    ("debug", (100, 50), (25, 25, 75, 50), "[0.25,0.25,0.75,0.50]"),      # 96x48 at (0, 0): ·0.96
    ("debug", (50, 100), (10, 25, 40, 75), "[0.10,0.25,0.40,0.75]"),      # 48x96 at (0, 0)
    ("debug", (80, 80), (20, 40, 60, 80), "[0.25,0.50,0.75,1.00]"),       # the canvas is the image
    ("debug", (200, 50), (50, 10, 150, 40), "[0.25,0.05,0.75,0.20]"),     # 96x24 at (0, 0): ·0.48
    ("debug-sphinx-tiny-1k", (100, 50), (25, 25, 75, 50), "[0.25,0.50,0.75,0.75]"),  # 128x64 at (0, 32)
    ("debug-sphinx-tiny-1k", (50, 100), (10, 25, 40, 75), "[0.35,0.25,0.65,0.75]"),  # 64x128 at (32, 0)
    ("debug-sphinx-tiny-1k", (80, 80), (20, 40, 60, 80), "[0.25,0.50,0.75,1.00]"),
    ("debug-sphinx-tiny-1k", (200, 50), (50, 5, 150, 45), "[0.25,0.40,0.75,0.60]"),  # 128x32 at (0, 48)
]


def _shard_answers(tmp_path, flavour, tok, records, images):
    """Records (llava JSONL with pixel ``boxes``) -> the preprocess reader and tiler -> each row's
    answer as the shard holds it (the supervised tokens, decoded) and the row's quarantine reason."""
    import json

    from actors.data import rows as raw
    from actors.data.tiler import Tiler, TilerConfig

    for name, (w, h) in images.items():
        (tmp_path / name).write_bytes(_png(w, h))
    data = "\n".join(json.dumps(r) for r in records).encode()
    rows = raw.parse_json_file(data, "g.jsonl", source="g", ratio=1.0, image_root=str(tmp_path))
    out = Tiler(TilerConfig.from_flavour(from_name(flavour), max_seq_len=1024), tok)(raw.to_table(rows)).to_pylist()
    def answer(r: dict) -> str:  # the supervised tokens: " {answer}\\n###" (models.conversation)
        text = tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100], skip_special_tokens=True)
        return text.strip().removesuffix(SEP).strip().replace(" ", "")  # the debug BPE's own spacing

    return {r["id"]: (answer(r) if r["reason"] is None else None, r["reason"]) for r in out}


@pytest.mark.parametrize("flavour, size, box, canvas_text", SOURCE_BOXES)
def test_a_source_rows_pixel_box_comes_back_exactly_from_the_shard_through_serving(tmp_path, tok, flavour, size,
                                                                                    box, canvas_text):
    """A llava source row's pixel box -> preprocess (actors.data.rows, the tiler) -> the text the
    shard trains on -> that text as the model's answer -> the endpoint's pixel box: the same
    coordinates, in both pads, on wide, tall, square and 4:1 images."""
    from actors.serve.replica import answer_boxes

    record = {"id": "r", "image": "a.png", "boxes": [[0, *box]], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the cat?"}, {"from": "gpt", "value": "<p>the cat</p> <box:0>"}]}
    ((text, reason),) = _shard_answers(tmp_path, flavour, tok, [record], {"a.png": size}).values()
    assert reason is None and text == f"<p>thecat</p>{canvas_text}"
    assert answer_boxes(text, [_png(*size)], from_name(flavour)) == [
        {"phrase": "thecat", "boxes": [[float(v) for v in box]]}]


@pytest.mark.parametrize("flavour", ["debug", "debug-sphinx-tiny-1k"])
def test_any_source_box_comes_back_within_the_text_forms_quantisation(tmp_path, tok, flavour):
    """A box off the text form's grid comes back within half a hundredth of the canvas, in image
    pixels: 0.005 · C · W / w' across (w' the image's width on the canvas), likewise down (the
    release's frame: 0.005 · max(W, H)), plus the endpoint's 0.01 px rounding."""
    from actors.serve.replica import answer_boxes
    from models.tiling import plan

    spec = TileSpec.from_flavour(from_name(flavour))
    sizes = {"wide.png": (301, 97), "tall.png": (53, 170), "odd.png": (77, 75)}
    boxes = {"wide.png": (12.3, 7.7, 251.9, 80.2), "tall.png": (3.3, 41.1, 50.05, 160.7), "odd.png": (0, 0, 77, 75)}
    records = [{"id": name, "image": name, "boxes": [[0, *boxes[name]]], "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "<box:0>"}]} for name in sizes]
    answers = _shard_answers(tmp_path, flavour, tok, records, sizes)
    for name, (w, h) in sizes.items():
        text, reason = answers[name]
        assert reason is None
        ((got,),) = [g["boxes"] for g in answer_boxes(text, [_png(w, h)], from_name(flavour))]
        sw, sh = plan(w, h, spec).scaled_size
        tol_x, tol_y = (0.005 * max(w, h),) * 2 if spec.resample == "release" else (
            0.005 * spec.canvas * w / sw, 0.005 * spec.canvas * h / sh)
        for v, want, tol in zip(got, boxes[name], (tol_x, tol_y, tol_x, tol_y)):
            assert abs(v - want) <= tol + 0.005, (name, text, got)


def test_a_replica_warms_up_on_a_text_and_a_whole_canvas_image_question_before_it_serves(tok):
    """``warm_up`` (run at the end of the constructor, before Serve routes here) asks the engine one
    text question and one image question of the flavour's whole canvas, then four together with
    log-probs (two of each, as the eval harness asks); none counts as traffic. A failing warm-up
    fails the replica (Serve then retries it)."""
    import asyncio
    import io as _io
    from types import SimpleNamespace

    import actors.serve.replica as rep

    asked = []

    class FakeEngine:
        fail = False

        async def generate(self, prompt, params, request_id):
            if self.fail:
                raise RuntimeError("engine broke")
            asked.append((prompt, params.max_tokens, params.logprobs))
            await asyncio.sleep(0.01)  # the four of the last round overlap, as a batch
            yield SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[SimpleNamespace(
                index=0, text="x", token_ids=[7], logprobs=None, finish_reason="length")])

        async def abort(self, request_id):
            pass

    r = object.__new__(rep.ModelReplica.func_or_class)
    r.name, r.tokenizer, r.flavour, r.context, r.engine = "m", tok, from_name("debug"), 8192, FakeEngine()
    r._active, r._peaks, r.aborted, r.batch_sizes = 0, {}, 0, __import__("collections").Counter()
    r._batch_metric = SimpleNamespace(observe=lambda v: (_ for _ in ()).throw(AssertionError("counted")))
    r._warming = True
    assert asyncio.run(r.warm_up()) >= 0
    (text, _, none1), (image, _, none2), *together = asked
    assert "multi_modal_data" not in text and [n for _, n, _ in asked] == [2] * 6 and none1 is none2 is None
    assert len(together) == 4 and all(lp is not None for _, _, lp in together)
    assert sorted("multi_modal_data" in p for p, _, _ in together) == [False, False, True, True]
    (png,) = image["multi_modal_data"]["image"]
    side = r.flavour.grid * r.flavour.tile_size
    assert Image.open(_io.BytesIO(png)).size == (side, side)
    assert not r._warming and not r.batch_sizes
    r.engine.fail, r._warming = True, True
    with pytest.raises(RuntimeError, match="engine broke"):
        asyncio.run(r.warm_up())
