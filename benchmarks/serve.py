"""Serving throughput and latency; prints ONE JSON object.

Same weights everywhere (the ``debug`` flavour's seeded random weights, optionally with a wider /
deeper LLM, written ONCE as a model directory that every system loads), a fixed text prompt, a
fixed output length (``ignore_eos``, greedy), concurrency 1 / 8 / 32:

    a  our endpoint (Ray Serve, dynamic batching)
    b  our endpoint with batching off (max_batch_size 1)
    c  `transformers serve` on the same LLM backbone saved as an HF Llama directory
    d  the raw batched generate loop in one process (the ceiling: batch = concurrency)

    .venv/bin/python benchmarks/serve.py [--tokens 32] [--requests-per-client 2] [--skip-hf]
        [--llm-width 512 --llm-layers 4] [--batch-wait-s 0.01] [--systems a,b,c,d]

For each system and concurrency C, C client threads each send ``--requests-per-client``
requests back to back (a plain keep-alive ``http.client`` connection per thread, the same
client for a, b and c, so the client's own CPU cost is small and equal); requests/s = all
requests / wall time, latencies are per request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Describe the picture in detail: the shapes, their colours and where they are."
CONCURRENCY = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _openai_call(base_url: str, model: str, tokens: int, extra: dict):
    """``call() -> completion tokens``: one OpenAI chat completion over this thread's keep-alive
    connection (``http.client``: the openai SDK costs several ms of CPU per request, which on 2
    shared cores would be measured as server time)."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    where = urlsplit(base_url)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
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

    from actors.model_loader import RANDOM_SEED, debug_tokenizer
    from models.checkpoint import save_model_dir
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


def bench_endpoint(model_dir: Path, tokens: int, per_client: int, batching: bool, batch_wait_s: float) -> dict:
    import ray

    from cluster.spec import parse_spec
    from pipelines import serve as serve_stage

    port = _free_port()
    spec = parse_spec({"name": "bench-serve", "storage": {"uri": tempfile.mkdtemp(prefix="sphinx-bench-")},
                       "serve": {"http": {"port": port}, "models": [
                           {"name": "debug", "checkpoint": str(model_dir), "max_ongoing_requests": 64,
                            "max_queued_requests": -1, "max_batch_size": 32, "batch_wait_timeout_s": batch_wait_s,
                            "ray_actor_options": {"num_cpus": 1}}]}})
    summary = serve_stage.run_stage(spec, batching=batching)
    try:
        call = _openai_call(summary["url"] + "/v1", "debug", tokens, {"ignore_eos": True})
        out = {str(c): _drive(call, c, per_client) for c in CONCURRENCY}
        stats = json.loads(_get(summary["url"] + "/v1/stats"))["models"]["debug"]
        out["batch_size_histogram"] = stats["batch_size_histogram"]  # requests by largest batch, all C
        from ray import serve

        replica = serve.get_deployment_handle("debug", app_name=spec.name).stats.remote().result()
        out["decode_loop"] = {k: replica.get(k) for k in ("steps", "mean_rows_per_step", "busy_s", "busy_cpu_s")}
        return out
    finally:
        serve_stage.shutdown(spec)
        ray.shutdown()  # a fresh Ray (and Serve) per system: nothing carries over between a and b


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def bench_raw(model_dir: Path, tokens: int, per_client: int) -> dict:
    """Batch = concurrency, every request of a round decoded together, in this process."""
    import torch

    from models.checkpoint import load_model_dir
    from models.conversation import build_prompt

    torch.set_num_threads(1)
    model, tokenizer = load_model_dir(model_dir)
    ids = build_prompt([{"role": "user", "content": PROMPT}], tokenizer)
    out = {}
    for c in CONCURRENCY:
        gen = lambda: model.generate([ids] * c, max_new_tokens=[tokens] * c, temperature=0.0,  # noqa: E731
                                     eos_token_id=-1)
        gen()
        lat, t0 = [], time.perf_counter()
        for _ in range(per_client):
            t1 = time.perf_counter()
            outs = gen()
            lat += [time.perf_counter() - t1] * c
        out[str(c)] = _summary(lat, time.perf_counter() - t0, [len(o) for o in outs] * per_client)
    return out


def bench_transformers_serve(model_dir: Path, tokens: int, per_client: int) -> dict:
    """`transformers serve DIR` on the same LLM backbone saved with save_pretrained."""
    import urllib.request

    from models.checkpoint import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    hf_dir = Path(tempfile.mkdtemp(prefix="sphinx-bench-hf-"))
    model.llm.save_pretrained(hf_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(hf_dir)
    port = _free_port()
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
    p.add_argument("--batch-wait-s", type=float, default=0.01, help="(a)'s batch_wait_timeout_s")
    p.add_argument("--systems", default="a,b,c,d", help="which of a,b,c,d to run")
    p.add_argument("--skip-hf", action="store_true", help="same as leaving c out of --systems")
    a = p.parse_args()
    # stdout carries exactly one JSON object: Ray's raylet and core-worker lines (written to fd 1
    # from C++ too) go to stderr until the result is ready
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    systems = set(a.systems.split(",")) - ({"c"} if a.skip_hf else set())
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    model_dir = write_weights(a.llm_width, a.llm_layers)
    from models.checkpoint import load_model_dir

    llm = load_model_dir(model_dir)[0].flavour.llm
    result: dict = {"benchmark": "serve", "flavour": "debug",
                    "llm": {k: llm[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "intermediate_size", "vocab_size")},
                    "prompt_chars": len(PROMPT), "max_tokens": a.tokens, "requests_per_client": a.requests_per_client,
                    "batch_wait_s": a.batch_wait_s, "loadavg_start": _load()}
    runs = [("a", "a_endpoint", True), ("b", "b_endpoint_no_batching", False)]
    for key, name, batching in runs:
        if key in systems:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            load = _load()
            result[name] = bench_endpoint(model_dir, a.tokens, a.requests_per_client, batching, a.batch_wait_s)
            result[name]["loadavg"] = [load, _load()]
    if "d" in systems:
        load = _load()
        result["d_raw_batched_loop"] = bench_raw(model_dir, a.tokens, a.requests_per_client)
        result["d_raw_batched_loop"]["loadavg"] = [load, _load()]
    if "c" in systems:
        load = _load()
        try:
            result["c_transformers_serve"] = bench_transformers_serve(model_dir, a.tokens, a.requests_per_client)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            result["c_transformers_serve"] = {"error": f"{type(err).__name__}: {err}"}
        result["c_transformers_serve"]["loadavg"] = [load, _load()]
    result["loadavg_end"] = _load()
    ratios = {}
    for c in map(str, CONCURRENCY):
        a_rps = result.get("a_endpoint", {}).get(c, {}).get("rps")
        if not a_rps:
            break
        ratios[c] = {}
        for key, name in (("a_over_b", "b_endpoint_no_batching"), ("a_over_c", "c_transformers_serve"),
                          ("a_over_d", "d_raw_batched_loop")):
            other = result.get(name, {}).get(c)
            if other:
                ratios[c][key] = round(a_rps / other["rps"], 2)
    result["ratios_rps"] = ratios
    print(json.dumps(result), file=json_out, flush=True)


if __name__ == "__main__":
    main()
