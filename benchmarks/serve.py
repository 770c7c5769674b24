"""Serving throughput and latency; prints ONE JSON object.

Same weights everywhere (the ``debug`` flavour's seeded random weights, as every replica builds
them), a fixed text prompt, a fixed output length (``ignore_eos``), concurrency 1 / 8 / 32:

    a  our endpoint (Ray Serve, dynamic batching)
    b  our endpoint with batching off (max_batch_size 1)
    c  `transformers serve` on the same LLM backbone saved as an HF Llama directory
    d  the raw batched generate loop in one process (the ceiling: batch = concurrency)

    .venv/bin/python benchmarks/serve.py [--tokens 32] [--requests-per-client 2] [--skip-hf]

For each system and concurrency C, C client threads each send ``--requests-per-client``
requests back to back; requests/s = all requests / wall time, latencies are per request.
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
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def call() -> int:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=tokens, temperature=0, extra_body=extra or None)
        return out.usage.completion_tokens if out.usage else tokens

    return call


def bench_endpoint(tokens: int, per_client: int, batching: bool) -> dict:
    from cluster.spec import parse_spec
    from pipelines import serve as serve_stage

    port = _free_port()
    spec = parse_spec({"name": "bench-serve", "storage": {"uri": tempfile.mkdtemp(prefix="sphinx-bench-")},
                       "serve": {"http": {"port": port}, "models": [
                           {"name": "debug", "flavour": "debug", "max_ongoing_requests": 64,
                            "max_queued_requests": -1, "max_batch_size": 32, "batch_wait_timeout_s": 0.01,
                            "ray_actor_options": {"num_cpus": 1}}]}})
    summary = serve_stage.run_stage(spec, batching=batching)
    try:
        call = _openai_call(summary["url"] + "/v1", "debug", tokens, {"ignore_eos": True})
        return {str(c): _drive(call, c, per_client) for c in CONCURRENCY}
    finally:
        serve_stage.shutdown(spec)


def bench_raw(tokens: int, per_client: int) -> dict:
    """Batch = concurrency, every request of a round decoded together, in this process."""
    import torch

    from actors.model_loader import random_member
    from models.conversation import build_prompt

    torch.set_num_threads(1)
    model, tokenizer = random_member("debug")
    model.eval()
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


def bench_transformers_serve(tokens: int, per_client: int) -> dict:
    """`transformers serve FORCE_MODEL` on the debug LLM backbone saved with save_pretrained."""
    import urllib.request

    from actors.model_loader import random_member

    model, tokenizer = random_member("debug")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    result: dict = {"benchmark": "serve", "flavour": "debug", "prompt_chars": len(PROMPT),
                    "max_tokens": a.tokens, "requests_per_client": a.requests_per_client}
    try:
        result["a_endpoint"] = bench_endpoint(a.tokens, a.requests_per_client, batching=True)
        result["b_endpoint_no_batching"] = bench_endpoint(a.tokens, a.requests_per_client, batching=False)
    finally:
        ray.shutdown()
    result["d_raw_batched_loop"] = bench_raw(a.tokens, a.requests_per_client)
    if a.skip_hf:
        result["c_transformers_serve"] = {"skipped": "--skip-hf"}
    else:
        try:
            result["c_transformers_serve"] = bench_transformers_serve(a.tokens, a.requests_per_client)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            result["c_transformers_serve"] = {"error": f"{type(err).__name__}: {err}"}
    ratios = {}
    for c in map(str, CONCURRENCY):
        a_rps = result["a_endpoint"][c]["rps"]
        ratios[c] = {"a_over_b": round(a_rps / result["b_endpoint_no_batching"][c]["rps"], 2),
                     "a_over_d": round(a_rps / result["d_raw_batched_loop"][c]["rps"], 2)}
        hf = result["c_transformers_serve"].get(c)
        if hf:
            ratios[c]["a_over_c"] = round(a_rps / hf["rps"], 2)
    result["ratios_rps"] = ratios
    print(json.dumps(result))


if __name__ == "__main__":
    main()
