"""Serving throughput and latency; prints ONE JSON object.

Same weights everywhere (the ``debug`` flavour's seeded random weights, optionally with a wider /
deeper LLM, written ONCE as a model directory that every system loads), a fixed image+text
prompt (a 60x30 PNG and a question; ``--no-image``: text only), a fixed output length
(``ignore_eos``, greedy), concurrency 1 / 8 / 32:

    a  our endpoint: Ray Serve + the vLLM engine (this tree)
    b  the previous endpoint: Ray Serve + the hand-written decode loop, run from a checkout of the
       commit before it was retired (``--baseline-tree``, e.g. ``git worktree add /tmp/base fbfc7a6``)
    c  vLLM offline ``LLM.generate`` on the same model (all C requests of a round in one call: the limit for a)
    d  `transformers serve` on the same LLM backbone saved as an HF Llama directory (text part only)

    .venv/bin/python benchmarks/serve.py [--tokens 32] [--requests-per-client 2] [--no-image]
        [--llm-width 1024 --llm-layers 4] [--baseline-tree /tmp/base] [--systems a,b,c,d]

For each system and concurrency C, C client threads each send ``--requests-per-client``
requests back to back (a plain keep-alive ``http.client`` connection per thread, the same
client for a, b and d, so the client's own CPU cost is small and equal); requests/s = all
requests / wall time, latencies are per request. Every replica / engine gets 1 CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.ports import free_port  # noqa: E402

PROMPT = "Describe the picture in detail: the shapes, their colours and where they are."
IMAGE_SIZE = (60, 30)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", IMAGE_SIZE, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _content(image: bool):
    """The user message's content: the image then the question (OpenAI parts), or the text."""
    import base64

    if not image:
        return PROMPT
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
CONCURRENCY = (1, 8, 32)


def _summary(latencies: list[float], wall: float, tokens: list[int]) -> dict:
    lat = np.asarray(latencies)
    return {"requests": len(lat), "rps": round(len(lat) / wall, 3), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3), "mean_completion_tokens": round(float(np.mean(tokens)), 1)}


def _drive(call, concurrency: int, per_client: int) -> dict:
    """``call() -> completion tokens``; C threads, each ``per_client`` calls back to back."""
    def client(_):
        out = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            n = call()
            out.append((time.perf_counter() - t0, n))
        return out

    call()  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    return _summary([r[0] for r in results], wall, [r[1] for r in results])


def _openai_call(base_url: str, model: str, tokens: int, extra: dict, image: bool = False):
    """``call() -> completion tokens``: one OpenAI chat completion over this thread's keep-alive
    connection (``http.client``: the openai SDK costs several ms of CPU per request, which on 2
    shared cores would be measured as server time)."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    where = urlsplit(base_url)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": _content(image)}], "max_tokens": tokens,
                       "temperature": 0, **extra}).encode()
    local = threading.local()

    def call() -> int:
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more, fresh
            reused = getattr(local, "conn", None) is not None
            if not reused:
                local.conn = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
            try:
                local.conn.request("POST", where.path + "/chat/completions", body,
                                   {"Content-Type": "application/json"})
                resp = local.conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException) as err:
                local.conn.close()
                local.conn = None
                stale = isinstance(err, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected))
                if not (reused and stale and attempt == 0):
                    raise
        if resp.status != 200:
            raise RuntimeError(f"{base_url}: HTTP {resp.status}: {data[:300]!r}")
        out = json.loads(data)
        return (out.get("usage") or {}).get("completion_tokens", tokens)

    return call


def write_weights(width: int | None, layers: int | None) -> Path:
    """The ``debug`` flavour (LLM widened / deepened when asked) with seeded random weights, saved
    once as a sphinx-x model directory: every system below loads exactly these weights."""
    import torch

    from actors.serve.model_loader import RANDOM_SEED, debug_tokenizer
    from models.weights.model_dir import save_model_dir
    from models.flavours import from_name
    from models.sphinx import SphinxX

    llm: dict = {}
    if width:
        heads = max(1, width // 64)
        llm.update(hidden_size=width, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                   intermediate_size=int(width * 2.75))
    if layers:
        llm["num_hidden_layers"] = layers
    flavour = from_name("debug", llm=llm) if llm else from_name("debug")
    tokenizer = debug_tokenizer(int(flavour.llm["vocab_size"]))
    torch.manual_seed(RANDOM_SEED)
    model = SphinxX.from_flavour(flavour, tokenizer)
    return save_model_dir(model, tokenizer, tempfile.mkdtemp(prefix="sphinx-bench-model-"))


def _endpoint_spec(model_dir: Path, port: int, member: dict) -> dict:
    return {"name": "bench-serve", "storage": {"uri": tempfile.mkdtemp(prefix="sphinx-bench-")},
            "serve": {"http": {"port": port}, "max_image_pixels": 1_000_000, "models": [
                {"name": "debug", "checkpoint": str(model_dir), "max_ongoing_requests": 64, "max_queued_requests": -1,
                 "ray_actor_options": {"num_cpus": 1}, **member}]}}


def _drive_endpoint(url: str, tokens: int, per_client: int, image: bool) -> dict:
    call = _openai_call(url + "/v1", "debug", tokens, {"ignore_eos": True}, image)
    out = {str(c): _drive(call, c, per_client) for c in CONCURRENCY}
    stats = json.loads(_get(url + "/v1/stats"))["models"]["debug"]
    out["batch_size_histogram"] = stats["batch_size_histogram"]  # requests by largest batch, all C
    return out


def bench_endpoint(model_dir: Path, tokens: int, per_client: int, image: bool) -> dict:
    """(a): this tree's app, one vLLM replica (max_num_seqs 32, fp32, eager)."""
    import ray

    from cluster.spec import parse_spec
    from pipelines.stages import serve as serve_stage

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    spec = parse_spec(_endpoint_spec(model_dir, free_port(), {"max_num_seqs": 32}))
    summary = serve_stage.run_stage(spec)
    try:
        return _drive_endpoint(summary["url"], tokens, per_client, image)
    finally:
        serve_stage.shutdown(spec)
        ray.shutdown()  # a fresh Ray (and Serve) per system: nothing carries over


_BASELINE_SERVER = """
import json, sys, time, ray
from cluster.spec import parse_spec
from pipelines.stages import serve as serve_stage
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
summary = serve_stage.run_stage(parse_spec(json.loads(sys.argv[1])))
print("URL", summary["url"], flush=True)
sys.stdin.read()
"""


def bench_baseline(tree: Path, model_dir: Path, tokens: int, per_client: int, image: bool) -> dict:
    """(b): the decode-loop app of ``tree`` (its code on PYTHONPATH, for the driver and Ray's
    workers), continuous batching with max_batch_size 32, batch_wait_timeout_s 0.01."""
    if not (tree / "actors" / "decode_loop.py").is_file():
        raise RuntimeError(f"{tree} is not a checkout with actors/decode_loop.py (git worktree add DIR fbfc7a6)")
    spec = _endpoint_spec(model_dir, free_port(), {"max_batch_size": 32, "batch_wait_timeout_s": 0.01})
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", _BASELINE_SERVER, json.dumps(spec)], cwd=tree, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while not line.startswith("URL "):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"the baseline server exited {proc.returncode}")
        return _drive_endpoint(line.split()[1], tokens, per_client, image)
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_vllm_offline(model_dir: Path, tokens: int, per_client: int, image: bool) -> dict:
    """(c): one ``LLM.generate`` of C requests per round, in this process's engine (same engine
    settings as a's replica: fp32, eager, max_num_seqs 32, 1 OpenMP thread)."""
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    from vllm import LLM, SamplingParams

    from actors.serve.vllm.plugin import engine_args, register
    from models.conversation import build_prompt, load_tokenizer

    register()
    llm = LLM(**engine_args(model_dir, dtype="float32", max_model_len=1024, max_num_seqs=32, enforce_eager=True,
                            kv_cache_memory_bytes=2**30, hf_overrides={"max_image_pixels": 1_000_000}))
    tokenizer = load_tokenizer(model_dir / "llm")
    parts = [{"type": "image", "index": 0}, {"type": "text", "text": PROMPT}] if image else PROMPT
    prompt: dict = {"prompt_token_ids": build_prompt([{"role": "user", "content": parts}], tokenizer,
                                                     [1] if image else [])}
    if image:
        prompt["multi_modal_data"] = {"image": [_png()]}
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    out = {}
    for c in CONCURRENCY:
        llm.generate([prompt] * c, params, use_tqdm=False)
        lat, n, t0 = [], [], time.perf_counter()
        for _ in range(per_client):
            t1 = time.perf_counter()
            outs = llm.generate([prompt] * c, params, use_tqdm=False)
            lat += [time.perf_counter() - t1] * c
            n += [len(o.outputs[0].token_ids) for o in outs]
        out[str(c)] = _summary(lat, time.perf_counter() - t0, n)
    return out


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def bench_transformers_serve(model_dir: Path, tokens: int, per_client: int) -> dict:
    """`transformers serve DIR` on the same LLM backbone saved with save_pretrained."""
    import urllib.request

    from models.weights.model_dir import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    hf_dir = Path(tempfile.mkdtemp(prefix="sphinx-bench-hf-"))
    model.llm.save_pretrained(hf_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(hf_dir)
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(hf_dir / "serve.log", "w")
    proc = subprocess.Popen([str(exe), "serve", str(hf_dir), "--port", str(port), "--host", "127.0.0.1",
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited {proc.returncode}: "
                                   f"{(hf_dir / 'serve.log').read_text()[-800:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("transformers serve did not come up in 180 s") from None
                time.sleep(1)
        call = _openai_call(f"http://127.0.0.1:{port}/v1", str(hf_dir), tokens, {})
        return {str(c): _drive(call, c, per_client) for c in CONCURRENCY}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _load() -> str:
    """The 1/5/15-minute load averages (the box is shared: read figures against them)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--llm-width", type=int, default=None, help="debug LLM hidden size (default 128)")
    p.add_argument("--llm-layers", type=int, default=None, help="debug LLM layers (default 2)")
    p.add_argument("--no-image", action="store_true", help="text-only requests for a, b and c")
    p.add_argument("--baseline-tree", type=Path, default=None, help="(b): a checkout of the decode-loop commit")
    p.add_argument("--systems", default="a,b,c,d", help="which of a,b,c,d to run")
    a = p.parse_args()
    # stdout carries exactly one JSON object: Ray's raylet and core-worker lines (written to fd 1
    # from C++ too) go to stderr until the result is ready
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    systems = set(a.systems.split(","))
    if a.baseline_tree is None:
        systems.discard("b")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    image = not a.no_image
    model_dir = write_weights(a.llm_width, a.llm_layers)
    from models.weights.model_dir import read_config

    llm = read_config(model_dir)["flavour"].llm
    result: dict = {"benchmark": "serve", "flavour": "debug",
                    "llm": {k: llm[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "intermediate_size", "vocab_size")},
                    "prompt_chars": len(PROMPT), "image": list(IMAGE_SIZE) if image else None,
                    "max_tokens": a.tokens, "requests_per_client": a.requests_per_client, "loadavg_start": _load()}
    runs = [("a", "a_vllm_endpoint", lambda: bench_endpoint(model_dir, a.tokens, a.requests_per_client, image)),
            ("b", "b_decode_loop_endpoint",
             lambda: bench_baseline(a.baseline_tree, model_dir, a.tokens, a.requests_per_client, image)),
            ("d", "d_transformers_serve", lambda: bench_transformers_serve(model_dir, a.tokens, a.requests_per_client)),
            ("c", "c_vllm_offline", lambda: bench_vllm_offline(model_dir, a.tokens, a.requests_per_client, image))]
    for key, name, run in runs:  # c last: its engine lives in this process until the end
        if key in systems:
            load = _load()
            try:
                result[name] = run()
            except Exception as err:  # noqa: BLE001 - reported, not hidden
                result[name] = {"error": f"{type(err).__name__}: {err}"}
            result[name]["loadavg"] = [load, _load()]
    result["loadavg_end"] = _load()
    ratios = {}
    for c in map(str, CONCURRENCY):
        a_rps = result.get("a_vllm_endpoint", {}).get(c, {}).get("rps")
        if not a_rps:
            break
        ratios[c] = {}
        for key, name in (("a_over_b", "b_decode_loop_endpoint"), ("a_over_c", "c_vllm_offline"),
                          ("a_over_d", "d_transformers_serve")):
            other = result.get(name, {}).get(c)
            if other:
                ratios[c][key] = round(a_rps / other["rps"], 2)
    result["ratios_rps"] = ratios
    print(json.dumps(result), file=json_out, flush=True)


if __name__ == "__main__":
    main()
