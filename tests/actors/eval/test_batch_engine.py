"""Both answer engines on one debug model directory (needs the heavy lock: Ray, Serve, two vLLM engines).

One module-scoped served app (the serve stage, one member loading the model directory) and the
batch engine (Ray Data over one vLLM actor) on the same directory:
- greedy answers agree between the two, text for text;
- a rerun of the batch engine reuses its finished blocks (no engine started);
- the served endpoint takes the request bodies that VLMEvalKit's and lmms-eval's OpenAI clients
  send (vlmeval/api/gpt.py ``OpenAIWrapper.generate_inner``; lmms_eval/models/simple/
  openai_compatible.py and lmms_eval/protocol.py ``ChatMessages.to_openai_messages``).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from actors.eval.endpoint_engine import AnswerRequest, EndpointEngine, EndpointOptions
from cluster.ports import free_port


def _image(i: int, size=(64, 40), fmt="PNG") -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue()


def _requests() -> list[AnswerRequest]:
    out = []
    for i in range(6):
        content = [{"type": "text", "text": f"Question {i}: what is in the image?\nAnswer the question using "
                                            "a single word or phrase."}]
        images = []
        if i % 3:
            content.insert(0, {"type": "image"})
            images.append(_image(i, size=(40 + 30 * i, 50)))
        out.append(AnswerRequest(id=f"q{i}", messages=[{"role": "user", "content": content}], images=images,
                                 max_tokens=8))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_module):
    # the session's Ray (with its dashboard: later tests ask its state API), never one of its own
    from actors.serve.model_loader import random_member
    from cluster.spec import parse_spec
    from models.weights.model_dir import save_model_dir
    from pipelines.stages import serve as serve_stage

    model_dir = tmp_path_factory.mktemp("eval-model")
    model, tokenizer = random_member("debug")
    save_model_dir(model, tokenizer, model_dir)
    spec = parse_spec({
        "name": "eval-engines", "storage": {"uri": str(tmp_path_factory.mktemp("store")), "endpoint_url": None},
        "serve": {"http": {"host": "127.0.0.1", "port": free_port()},
                  "models": [{"name": "m", "checkpoint": str(model_dir), "ray_actor_options": {"num_cpus": 0.5},
                              "cpu_kv_cache_gb": 0.25, "max_num_seqs": 8}]},
    })
    summary = serve_stage.run_stage(spec)
    try:
        yield {"spec": spec, "url": summary["url"], "model_dir": model_dir}
    finally:
        serve_stage.shutdown(spec)


def _batch_engine(served, cache):
    from actors.eval.batch_engine import BatchEngine, BatchOptions
    from actors.serve.model_loader import MemberWeights
    from actors.serve.vllm.engine import EngineOptions

    engine = EngineOptions(device="cpu", dtype="float32", max_model_len=None, max_num_seqs=8,
                           tensor_parallel_size=1, gpu_memory_utilization=0.9, cpu_kv_cache_gb=0.25,
                           enforce_eager=True, threads=1)
    return BatchEngine(MemberWeights(name="m", checkpoint_uri=str(served["model_dir"])), served["spec"].storage,
                       BatchOptions(engine=engine, actors=1, num_cpus=1, batch_size=4, block_size=4),
                       cache_uri=str(cache))


def test_greedy_answers_agree_and_finished_blocks_are_reused(served, tmp_path):
    requests = _requests()
    endpoint = EndpointEngine(EndpointOptions(url=served["url"], model="m", concurrency=4)).answer(requests)
    engine = _batch_engine(served, tmp_path / "answers")
    batch = engine.answer(requests)
    assert [a.error for a in endpoint] == [None] * 6, endpoint
    assert [a.error for a in batch] == [None] * 6, batch
    assert [a.text for a in batch] == [a.text for a in endpoint]
    assert any(a.text for a in batch)
    files = sorted(p.name for p in (tmp_path / "answers").iterdir())
    assert len(files) == 2 and all(f.startswith("block-") for f in files)  # 6 requests, blocks of 4
    again = _batch_engine(served, tmp_path / "answers")
    assert again.answer(requests) == batch and again.reused == 6


def _post(served, body: dict) -> httpx.Response:
    return httpx.post(served["url"] + "/v1/chat/completions", timeout=120,
                      headers={"Content-Type": "application/json", "Authorization": "Bearer sk-anything"},
                      content=json.dumps(body))


def test_vlmevalkit_request_shape_is_accepted(served):
    # OpenAIWrapper.prepare_inputs / generate_inner: system prompt, image_url with detail 'low'
    # (JPEG data URL), n=1, temperature, max_tokens (its `max_tokens` kwarg; default 2048 is over
    # a small model's context, which the official API refuses too)
    b64 = base64.b64encode(_image(1, fmt="JPEG")).decode()
    body = {"model": "m", "n": 1, "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "text", "text": "Question: What is shown?\nOptions:\nA. cat\nB. dog\nPlease select the "
                                     "correct answer from the options above. \n"},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64}", "detail": "low"}}]}]}
    r = _post(served, body)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_lmms_eval_request_shapes_are_accepted(served):
    b64 = base64.b64encode(_image(2)).decode()
    content = [{"type": "text", "text": "What is shown?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]
    # simple/openai_compatible.py: text first, then the images; max_tokens and temperature
    r = _post(served, {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                       "temperature": 0})
    assert r.status_code == 200, r.text
    # chat/openai_compatible.py (ChatMessages.to_openai_messages): system content as text parts
    # too; its o-series branch sends response_format {"type": "text"} and max_completion_tokens
    r = _post(served, {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                                  {"role": "user", "content": content}],
                       "response_format": {"type": "text"}, "max_completion_tokens": 8})
    assert r.status_code == 200, r.text
    # null for "the default", as the official API takes it
    r = _post(served, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       "temperature": None, "top_p": None})
    assert r.status_code == 200, r.text


def test_finished_blocks_are_read_back_without_starting_anything(tmp_path):
    """Pure logic (no Ray): every block file present -> the answers come from them, in order."""
    from actors.eval.batch_engine import BatchEngine, BatchOptions, block_key
    from actors.serve.model_loader import MemberWeights
    from actors.serve.vllm.engine import EngineOptions
    from cluster.spec import StorageSection

    requests = _requests()
    cache = tmp_path / "answers"
    cache.mkdir()
    for k in range(2):
        block = requests[4 * k:4 * k + 4]
        (cache / f"block-{k:05d}-{block_key(block)}.jsonl").write_text(
            "".join(json.dumps({"id": r.id, "text": r.id.upper(), "error": None}) + "\n" for r in block))
    engine = EngineOptions(device="cpu", dtype="float32", max_model_len=None, max_num_seqs=8, tensor_parallel_size=1,
                           gpu_memory_utilization=0.9, cpu_kv_cache_gb=0.25, enforce_eager=True, threads=1)
    batch = BatchEngine(MemberWeights(name="m", checkpoint_uri="/nowhere"),
                        StorageSection(uri=str(tmp_path / "store"), endpoint_url=None),
                        BatchOptions(engine=engine, block_size=4), cache_uri=str(cache))
    assert [a.text for a in batch.answer(requests)] == [f"Q{i}" for i in range(6)] and batch.reused == 6
    assert block_key(requests[:4]) != block_key(requests[1:5])
