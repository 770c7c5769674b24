"""Serving overload probe (issue 24): bursts over the ingress's queue bound; prints ONE JSON object.

What runs: the ingress's own FastAPI app and ``Ingress`` class (actors.serve.ingress: auth,
Content-Type, the bounded queue of actors.serve.request_gate, body and schema checks, image
fetch + header checks + pixel budget) under uvicorn in a child process on 127.0.0.1, with a
stub model handle that answers after ``--gen-s`` seconds (a stand-in for a replica's
generation, so the queue fills on 2 CPU cores without a vLLM engine). Ray Serve's proxy is not
in the path: the 429s counted here are the ingress's own (the proxy forwards them unchanged).

    .venv/bin/python benchmarks/serve_overload.py [--bursts 3] [--burst 64] [--ongoing 4] [--queued 8]

Each burst sends ``--burst`` concurrent chat requests (each with one 256x256 PNG as a data:
URL) with httpx; the figures: status counts, the bound (ongoing + queued), peak RSS of the
server process (psutil, sampled every 20 ms), and whether /healthz answers afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

from cluster.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(port: int, ongoing: int, queued: int, gen_s: float) -> None:
    """The child: the ingress app with a stub handle, served by uvicorn on 127.0.0.1:port."""
    import types

    import ray.serve
    import uvicorn

    from actors.serve.ingress import Ingress, app
    from cluster.spec import parse_spec

    class _Complete:
        def remote(self, payload):
            async def answer():
                await asyncio.sleep(gen_s)
                return {"prompt_tokens": 10, "choices": [{"text": "ok", "finish_reason": "stop", "logprobs": None}],
                        "completion_tokens": 1, "batch_size": 1}
            return answer()

    handle = types.SimpleNamespace(complete=_Complete(), options=lambda **_: handle)
    spec = parse_spec({"serve": {"ingress_max_ongoing_requests": ongoing, "ingress_max_queued_requests": queued}})
    cls = Ingress.func_or_class
    inst = object.__new__(cls)
    cls.__mro__[1].__init__(inst, spec.serve, spec.storage, {"debug": handle}, [])
    ray.serve.get_replica_context = lambda: types.SimpleNamespace(servable_object=inst)  # Serve's lookup
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", limit_concurrency=4096)


def _png_url(side: int = 256) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _burst(base: str, n: int, body: dict) -> Counter:
    import httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        async def one():
            try:
                return (await client.post("/v1/chat/completions", json=body)).status_code
            except httpx.HTTPError as err:
                return type(err).__name__
        return Counter(await asyncio.gather(*(one() for _ in range(n))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--burst", type=int, default=64)
    p.add_argument("--ongoing", type=int, default=4)
    p.add_argument("--queued", type=int, default=8)
    p.add_argument("--gen-s", type=float, default=0.5)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the child
    a = p.parse_args()
    if a.serve is not None:
        _serve(a.serve, a.ongoing, a.queued, a.gen_s)
        return

    import httpx
    import psutil

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--ongoing", str(a.ongoing),
                              "--queued", str(a.queued), "--gen-s", str(a.gen_s)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise SystemExit("the probe server did not start")
            time.sleep(0.2)
        proc = psutil.Process(child.pid)
        rss_idle = proc.memory_info().rss
        peak = [rss_idle]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        body = {"model": "debug", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_url()}}, {"type": "text", "text": "colour?"}]}]}
        totals: Counter = Counter()
        t0 = time.monotonic()
        per_burst = []
        for _ in range(a.bursts):
            counts = asyncio.run(_burst(base, a.burst, body))
            per_burst.append({str(k): v for k, v in sorted(counts.items(), key=str)})
            totals.update(counts)
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
        health = httpx.get(base + "/healthz", timeout=5)
        after = httpx.post(base + "/v1/chat/completions", json=body, timeout=30).status_code
        print(json.dumps({
            "path": "actors.serve.ingress app + Ingress under uvicorn, stub model handle",
            "bound": {"ongoing": a.ongoing, "queued": a.queued}, "gen_s": a.gen_s,
            "bursts": a.bursts, "burst_size": a.burst, "requests": a.bursts * a.burst,
            "status_counts": {str(k): v for k, v in sorted(totals.items(), key=str)}, "per_burst": per_burst,
            "wall_s": round(wall, 2), "rss_idle_mib": round(rss_idle / 2**20, 1),
            "rss_peak_mib": round(peak[0] / 2**20, 1),
            "healthz_after": health.status_code, "request_after": after,
        }))
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


if __name__ == "__main__":
    main()
