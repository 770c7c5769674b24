"""The live endpoint, driven by the official `openai` client (and httpx for malformed input).

One app for the module on the session's local Ray, every member a vLLM engine (fp32, eager, a
small CPU KV cache): ``debug`` (autoscaling 1..2, short delays), ``debug-moe``, and ``pre`` (a model dir whose tokenizer is the one the preprocess stage wrote,
with tight queue limits for the 429 check). Deleted at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from cluster.ports import free_port

TEST_BUCKET = "sphinx-x-test"  # tests/conftest.py

KEY_ENV = "SPHINX_X_TEST_SERVE_KEYS"
KEY = "test-key-1"


def _png(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _status(app_name: str, member: str):
    from ray import serve

    return serve.status().applications[app_name].deployments[member]


def _running_replicas(app_name: str, member: str) -> int:
    return int(_status(app_name, member).replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def live(s3, tmp_path_factory):
    """Preprocess one sample, save a model dir with its tokenizer, deploy the app, yield, delete."""
    import ray
    from ray import serve

    from cluster.spec import parse_spec
    from cluster.storage import embedded_worker_env, open_storage
    from models.weights.model_dir import save_model_dir
    from models.conversation import load_tokenizer
    from models.flavours import from_name
    from models.sphinx import SphinxX
    from pipelines.stages import preprocess, serve as serve_stage

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": embedded_worker_env(s3.endpoint_url)})
    prefix = f"s3://{TEST_BUCKET}/serve-{uuid.uuid4().hex[:8]}"
    auto = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
            "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    small = {"num_cpus": 0.5}
    engine = {"cpu_kv_cache_gb": 0.25}
    data = {
        "name": "serve-test",
        "storage": {"uri": prefix, "endpoint_url": "embedded"},
        "data": {"sources": [{"name": "one", "path": "src/one.json", "image_root": "src/images"}],
                 "output": "shards"},
        "serve": {
            "http": {"host": "127.0.0.1", "port": free_port()},
            "api_keys_env": KEY_ENV,
            "max_request_bytes": 1 << 20,
            "allowed_image_s3_prefixes": [f"{prefix}/uploads"],
            "max_image_pixels": 1_000_000,
            "max_images_per_request": 2,
            "models": [
                {"name": "debug", "flavour": "debug", "autoscaling_config": auto, "ray_actor_options": small,
                 "max_num_seqs": 16, **engine},
                {"name": "debug-moe", "flavour": "debug-moe", "ray_actor_options": small, **engine},
            ],
        },
    }
    spec = parse_spec(data)
    storage = open_storage(spec.storage)
    image = _png(60, 30)
    question = "<image>\nWhat colour is the shape?"
    storage.write_bytes("src/images/red.png", image)
    storage.write_bytes("src/one.json", json.dumps([{"id": "s0", "image": "red.png", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "It is red."}]}]).encode())
    preprocess.run_stage(spec)
    tok_dir = tmp_path_factory.mktemp("tok")
    storage.download_dir(storage.uri_for("shards", "tokenizer"), tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    model_dir = tmp_path_factory.mktemp("pre-model")
    save_model_dir(SphinxX.from_flavour(from_name("debug"), tokenizer), tokenizer, model_dir)
    data["serve"]["models"].append({"name": "pre", "checkpoint": str(model_dir), "ray_actor_options": small,
                                    "max_ongoing_requests": 1, "max_queued_requests": 1, **engine})
    spec = parse_spec(data)

    os.environ[KEY_ENV] = f"{KEY},another-key"
    try:
        summary = serve_stage.run_stage(spec)
    finally:
        os.environ.pop(KEY_ENV, None)
    # the sample as training reads it: the shard's stored image cut into views by the training reader
    from actors.train.data import ReadPlannedRows
    from models.tiling import TileSpec

    manifest = json.loads(storage.read_bytes("shards/_manifest.json"))
    reader = ReadPlannedRows(spec.storage, [storage.uri_for("shards", manifest["shards"][0])],
                             tile=TileSpec.from_dict(manifest["tiling"]))
    rows = reader({"file": np.array([0]), "row": np.array([0]), "_pos": np.array([0])}).to_pylist()
    client = openai.OpenAI(base_url=summary["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    try:
        yield {"spec": spec, "url": summary["url"], "client": client, "image": image, "question": question,
               "row": rows[0], "tokenizer": tokenizer}
    finally:
        serve_stage.shutdown(spec)


def _ask(client, model="debug", content="Hello there", **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_text_request_and_models(live):
    client = live["client"]
    assert {m.id for m in client.models.list()} == {"debug", "debug-moe", "pre"}
    out = _ask(client)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= out.usage.completion_tokens <= 6 and out.usage.prompt_tokens > 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    moe = _ask(client, model="debug-moe", seed=3, temperature=0.8, top_p=0.9)
    assert moe.model == "debug-moe" and moe.usage.completion_tokens >= 1
    assert httpx.get(live["url"] + "/healthz").json()["status"] == "ok"


def test_image_request_counts_image_tokens(live):
    from actors.serve.model_loader import debug_tokenizer
    from models.conversation import build_prompt
    from models.flavours import from_name
    from models.tiling import TileSpec, image_token_count

    flavour = from_name("debug")
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": _data_url(live["image"])}}]
    out = _ask(live["client"], content=parts)
    n_image = image_token_count(60, 30, TileSpec.from_flavour(flavour), flavour.tokens_per_view)
    expected = len(build_prompt([{"role": "user", "content": parts}], debug_tokenizer(1024), [n_image]))
    assert out.usage.prompt_tokens == expected
    from actors.serve.openai_api import answer_boxes  # docs/interfaces.md "Boxes in answers"
    assert out.choices[0].message.model_extra["boxes"] == answer_boxes(out.choices[0].message.content, (60, 30),
                                                                       TileSpec.from_flavour(flavour))
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 0, 255)).save(jpeg, "JPEG")
    out = _ask(live["client"], model="debug-moe", content=[
        {"type": "image_url", "image_url": {"url": _data_url(jpeg.getvalue(), "image/jpeg")}},
        {"type": "text", "text": "And this?"}])
    assert out.usage.prompt_tokens > image_token_count(40, 40, TileSpec.from_flavour(flavour), 17)


def test_s3_image_inside_the_bucket(live):
    from cluster.storage import open_storage

    storage = open_storage(live["spec"].storage)
    storage.write_bytes("uploads/blue.png", _png(32, 32, (0, 0, 200)))
    url = storage.uri_for("uploads/blue.png")
    assert url.startswith(f"s3://{TEST_BUCKET}/")
    out = _ask(live["client"], content=[{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}])
    assert out.usage.prompt_tokens > 100
    with pytest.raises(openai.BadRequestError) as info:
        _ask(live["client"], content=[{"type": "image_url", "image_url": {"url": "s3://some-other-bucket/x.png"}}])
    assert info.value.body["code"] == "image_host_not_allowed"


def test_streaming(live):
    stream = _ask(live["client"], content="Tell me a story", max_tokens=8, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 8
    assert len(chunks) >= 3 and isinstance(text, str)
    raw = httpx.post(live["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": "debug", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                           "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_a_client_that_leaves_mid_stream_aborts_its_request(live):
    from ray import serve

    handle = serve.get_deployment_handle("debug-moe", app_name=live["spec"].name)
    before = handle.stats.remote().result()["aborted"]
    body = {"model": "debug-moe", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live["url"] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: the request is in the engine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result()
        if stats["running"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["aborted"] == before + 1, stats


def test_server_inputs_equal_preprocess_output(live):
    """For one sample, the token ids and tiles the server builds equal what training reads from the
    shards preprocess wrote (the stored image cut by actors.train.data): the same bytes give the
    same pixels on both sides."""
    from ray import serve

    row = live["row"]
    handle = serve.get_deployment_handle("pre", app_name=live["spec"].name)
    # the same human turn as OpenAI content parts: the image, then the text after <image>
    parts = [{"type": "image", "index": 0}, {"type": "text", "text": live["question"].removeprefix("<image>")}]
    payload = {"messages": [{"role": "user", "content": parts}],
               "images": [live["image"]], "max_tokens": 4, "temperature": 0, "top_p": 1, "stop": [], "seed": 0}
    built = handle.prepare.remote(payload).result()
    prompt = row["input_ids"][:len(built["input_ids"])]
    assert built["input_ids"] == prompt
    # the rest of the training row is exactly the answer span (the only labelled tokens)
    labels = np.asarray(row["labels"])
    assert (labels[:len(prompt)] == -100).all() and (labels[len(prompt):] != -100).any()
    views = np.frombuffer(row["views"], np.uint8).reshape(built["views"].shape)
    assert np.array_equal(views, built["views"])
    assert list(row["kept"]) == built["kept"].reshape(-1).tolist()
    assert row["image_tokens"] == sum(built["image_tokens"])


def test_n_logprobs_and_seed(live):
    """n choices, per-token logprobs with the top alternatives, and a seed that repeats a sample."""
    client = live["client"]
    out = _ask(client, content="Name a colour", n=3, temperature=1.0, seed=7, max_tokens=5, logprobs=True,
               top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)
    for c in out.choices:
        for t in c.logprobs.content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2
            assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    again = _ask(client, content="Name a colour", n=3, temperature=1.0, seed=7, max_tokens=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    stream = _ask(client, content="Name a colour", n=2, temperature=1.0, seed=7, max_tokens=5, stream=True,
                  stream_options={"include_usage": True})
    texts, finished = {0: "", 1: ""}, set()
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    greedy = [_ask(client, content="Name a colour", max_tokens=5).choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_answers_stop_at_the_turn_separator(live):
    """The template's ``###`` ends the answer: it never appears in (or ends) the text."""
    outs = [_ask(live["client"], content=f"Say something {i}", temperature=1.0, seed=i, max_tokens=48)
            for i in range(6)]
    for o in outs:
        assert "###" not in o.choices[0].message.content


def _post(live, body, key=KEY, raw: bytes | None = None, **headers):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(live["url"] + "/v1/chat/completions", content=content, headers=headers, timeout=60)


def _err(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_errors_have_the_right_status_and_openai_shape(live):
    ok = {"model": "debug", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    img = lambda url: {"model": "debug", "max_tokens": 2, "messages": [  # noqa: E731
        {"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    assert _err(_post(live, None, raw=b'{"model": "debug", "messages": ['), 400)["code"] == "invalid_json"
    assert _err(_post(live, img("data:image/png;base64,%%%%")), 400)["code"] == "invalid_base64"
    assert _err(_post(live, img(_data_url(b"definitely not an image"))), 400)["code"] == "invalid_image"
    truncated = _png(64, 64)[:60]  # a valid header, then nothing to decode
    assert _err(_post(live, img(_data_url(truncated))), 400)["code"] == "corrupt_image"
    assert _err(_post(live, img(_data_url(_png(2000, 1000)))), 400)["code"] == "image_too_large"
    three = {"model": "debug", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(_png(8, 8))}}] * 3}]}
    assert _err(_post(live, three), 400)["code"] == "too_many_images"
    long_prompt = dict(ok, messages=[{"role": "user", "content": "word " * 1500}])
    assert _err(_post(live, long_prompt), 400)["code"] == "context_length_exceeded"
    assert _err(_post(live, dict(ok, max_tokens=1000)), 400)["code"] == "context_length_exceeded"
    assert _err(_post(live, ok, key="wrong"), 401)["type"] == "authentication_error"
    assert _err(httpx.get(live["url"] + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert _err(_post(live, dict(ok, model="gpt-4")), 404)["code"] == "model_not_found"
    assert _err(_post(live, None, raw=b"x" * (2 << 20)), 413)["code"] == "request_too_large"
    assert _err(_post(live, img("http://169.254.169.254/latest/meta-data")), 400)["code"] == "image_host_not_allowed"
    with pytest.raises(openai.NotFoundError):
        _ask(live["client"], model="nope")


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b"42", b'"text"', b"\xff\xfe\x00", b'{"model": null}', b'{"model": "debug"}',
    b'{"model": "debug", "messages": "hi"}', b'{"model": "debug", "messages": [{}]}',
    b'{"model": "debug", "messages": [{"role": "robot", "content": "x"}]}',
    b'{"model": "debug", "messages": [{"role": "assistant", "content": "x"}]}',
    b'{"model": "debug", "messages": [{"role": "system", "content": "x"}]}',
    b'{"model": "debug", "messages": [{"role": "user", "content": [{"type": "video"}]}]}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "<image> no image"}]}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "x"}], "n": 0}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
    b'{"model": "debug", "messages": [{"role": "user", "content": "x"}], "bogus_field": 1}',
    b'{"model": "debug", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}',
])
def test_never_a_500_for_user_input(live, body):
    resp = _post(live, None, raw=body)
    assert resp.status_code == 400, resp.text
    assert "error" in resp.json()


def test_queue_full_is_429(live):
    """``pre`` takes 1 request at a time and queues 1: a burst gets 429s, never a crash."""
    body = {"model": "pre", "messages": [{"role": "user", "content": "count"}], "max_tokens": 60}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _post(live, body).status_code, range(8)))
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes and 429 in codes, codes
    busy = [c for c in codes if c == 429]
    assert len(busy) >= 1
    assert _post(live, body).status_code == 200  # and it recovers


def test_16_concurrent_requests_are_batched(live):
    before = httpx.get(live["url"] + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: _ask(live["client"], content=f"question {i}", max_tokens=8, seed=i,
                                            temperature=0.7), range(16)))
    assert all(o.choices[0].finish_reason in ("stop", "length") for o in outs)
    stats = httpx.get(live["url"] + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    member = stats["models"]["debug"]
    assert member["requests"] - before["models"]["debug"]["requests"] == 16
    assert member["max_batch_size"] > 1, member  # requests were decoded together


def _load(live, model: str, stop: threading.Event, results: list):
    while not stop.is_set():
        try:
            _ask(live["client"], model=model, content="keep busy", max_tokens=24)
            results.append("ok")
        except openai.APIStatusError as err:
            results.append(err.status_code)
        except openai.APIConnectionError:
            results.append("conn")


def test_autoscaling_up_under_load_and_back(live):
    name = live["spec"].name
    assert _running_replicas(name, "debug") == 1
    stop, results = threading.Event(), []
    # 2 clients with a request each at all times: 2 ongoing against a target of 1 (more clients
    # only make the one replica decode bigger batches while the second one starts)
    threads = [threading.Thread(target=_load, args=(live, "debug", stop, results)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        # the second replica starts a vLLM engine: ~60 s on 2 idle cores, longer on a loaded CI box
        deadline = time.monotonic() + 300
        while _running_replicas(name, "debug") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running_replicas(name, "debug") == 2, _status(name, "debug").replica_states
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and all(r == "ok" for r in results), set(map(str, results))
    deadline = time.monotonic() + 90
    while _running_replicas(name, "debug") > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running_replicas(name, "debug") == 1


def test_killed_replica_is_replaced(live):
    import ray
    from ray._private.state import actors

    name = live["spec"].name
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(live, "debug-moe", stop, results)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        victims = [a for a in actors().values() if a.get("State") == "ALIVE"
                   and str(a.get("ActorClassName", "")).endswith(f"{name}:debug-moe")]
        assert len(victims) == 1, [a.get("ActorClassName") for a in actors().values()]
        ray.kill(ray.get_actor(victims[0]["Name"], namespace="serve"), no_restart=True)
        time.sleep(2)
        deadline = time.monotonic() + 90
        while _running_replicas(name, "debug-moe") < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert _running_replicas(name, "debug-moe") == 1
    assert set(map(str, results)) <= {"ok", "503", "500"}, results  # failures only while it was down
    after = [_ask(live["client"], model="debug-moe", content=f"after {i}") for i in range(3)]
    assert all(a.usage.completion_tokens >= 1 for a in after)


def test_rendered_serve_config_builds_the_app_by_import_path():
    """`sphinx-x render --to serve` names pipelines.stages.serve:build_app with {"spec": ...}: that builds."""
    import importlib

    from ray.serve import Application

    from cluster.render import render_serve_config
    from cluster.spec import parse_spec
    from models.errors import UserError
    from pipelines.stages import serve as serve_stage

    spec = parse_spec({"name": "rendered", "storage": {"uri": "/tmp/sphinx-x-render-test"}, "serve": {"models": [
        {"name": "a", "flavour": "debug"}, {"name": "b", "flavour": "debug-moe", "max_queued_requests": 5}]}})
    app_cfg = render_serve_config(spec, serve_stage.STAGE.service)["applications"][0]
    module, _, attr = app_cfg["import_path"].partition(":")
    app = getattr(importlib.import_module(module), attr)(app_cfg["args"])
    assert isinstance(app, Application)
    members = app._bound_deployment.init_args[2]  # the ingress's {name: member app}
    assert {n: m._bound_deployment.name for n, m in members.items()} == {"a": "a", "b": "b"}
    assert members["b"]._bound_deployment._deployment_config.max_queued_requests == 5
    with pytest.raises(UserError, match="spec"):
        getattr(importlib.import_module(module), attr)({})
    bad = dict(app_cfg["args"]["spec"])
    bad["serve"] = {**bad["serve"], "models": [{"name": "a", "flavour": "debug", "max_queued_requests": 0}]}
    with pytest.raises(UserError, match="max_queued_requests"):
        getattr(importlib.import_module(module), attr)({"spec": bad})


def test_a_second_app_on_another_port_is_refused_naming_both(live):
    """Ray Serve keeps the port it started with; a spec asking for another one while other apps
    use that Serve is an error naming both, not an app that answers somewhere unexpected."""
    from cluster.spec import parse_spec
    from models.errors import UserError
    from pipelines.stages import serve as serve_stage

    data = live["spec"].model_dump(mode="json")
    running = int(live["url"].rsplit(":", 1)[1])
    data.update(name="other-app", serve={**data["serve"], "http": {"host": "127.0.0.1", "port": free_port()},
                                         "models": [{"name": "x", "flavour": "debug"}]})
    with pytest.raises(UserError, match=f"already listens on 127.0.0.1:{running}"):
        serve_stage.run_stage(parse_spec(data))
    assert {m.id for m in live["client"].models.list()} == {"debug", "debug-moe", "pre"}  # untouched


def test_engine_options_follow_the_members_reservation():
    """GPUs reserved: a CUDA engine in bf16 with CUDA graphs, TP needing that many GPUs; else CPU,
    fp32, eager, the replica's CPUs as OpenMP threads split over the TP workers."""
    from cluster.spec import parse_spec
    from models.errors import UserError
    from pipelines.stages.serve import engine_options

    spec = parse_spec({"storage": {"uri": "/tmp/x"}, "serve": {"models": [
        {"name": "g", "flavour": "debug", "ray_actor_options": {"num_cpus": 4, "num_gpus": 2},
         "tensor_parallel_size": 2, "max_model_len": 512, "gpu_memory_utilization": 0.5},
        {"name": "c", "flavour": "debug", "ray_actor_options": {"num_cpus": 4}, "tensor_parallel_size": 2,
         "cpu_kv_cache_gb": 2, "max_num_seqs": 8},
        {"name": "bad", "flavour": "debug", "ray_actor_options": {"num_gpus": 1}, "tensor_parallel_size": 2}]}})
    g, c, bad = spec.serve.models
    eg, ec = engine_options(g), engine_options(c)
    assert (eg.device, eg.dtype, eg.enforce_eager, eg.tensor_parallel_size, eg.max_model_len,
            eg.gpu_memory_utilization) == ("cuda", "bfloat16", False, 2, 512, 0.5)
    assert (ec.device, ec.dtype, ec.enforce_eager, ec.threads, ec.cpu_kv_cache_gb, ec.max_num_seqs) == (
        "cpu", "float32", True, 2, 2.0, 8)
    with pytest.raises(UserError, match="num_gpus >= 2"):
        engine_options(bad)


def test_issue24_client_errors_are_400_and_forms_415(live):
    """Bad inputs from issue 24 on the live endpoint: each a 4xx in OpenAI's shape, no address."""
    ok = {"model": "debug", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for body in [dict(ok, n=2, temperature=0), dict(ok, seed=2**64)]:
        assert _err(_post(live, body), 400)["param"] in ("n", "seed")
    for raw in [b"[" * 10000 + b"]" * 10000, b'{"model": "debug", "temperature": NaN}',
                b'{"model": "debug", "max_tokens": ' + b"9" * 5000 + b"}"]:
        err = _err(_post(live, None, raw=raw), 400)
        assert "0x" not in err["message"] and "Traceback" not in err["message"]
    form = _post(live, None, raw=b"model=debug", **{"Content-Type": "application/x-www-form-urlencoded"})
    assert _err(form, 415)["code"] == "unsupported_media_type"
    outside = live["spec"].storage.uri.rstrip("/") + "/train/export/config.json"
    img = {"type": "image_url", "image_url": {"url": outside}}
    assert _err(_post(live, dict(ok, messages=[{"role": "user", "content": [img]}])), 400)["code"] \
        == "image_host_not_allowed"


def test_open_endpoint_warning_at_start(capsys):
    from cluster.spec import parse_spec
    from pipelines.stages.serve import warn_if_open

    assert warn_if_open(parse_spec({"serve": {"http": {"host": "0.0.0.0"}}}), [])
    assert "NO API keys" in capsys.readouterr().err
    assert not warn_if_open(parse_spec({"serve": {"http": {"host": "0.0.0.0"}}}), ["hash"])
    assert not warn_if_open(parse_spec({}), [])
    assert capsys.readouterr().err == ""


def test_ingress_bound_sits_under_serves_own():
    from cluster.spec import parse_spec
    from pipelines.stages.serve import INGRESS_HEADROOM, build_application

    spec = parse_spec({"serve": {"ingress_max_ongoing_requests": 3, "ingress_max_queued_requests": 5}})
    ingress = build_application(spec)
    config = ingress._bound_deployment._deployment_config
    assert config.max_ongoing_requests == config.max_queued_requests == 3 + 5 + INGRESS_HEADROOM
