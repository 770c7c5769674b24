"""Eval engines on one model directory: Ray Data batch vs plain offline vLLM vs the endpoint; ONE JSON object.

The ``debug`` flavour with its LLM widened / deepened (default d1024 x 4 layers), seeded random
weights written once as a model directory; N multiple-choice prompts with images of several
aspect ratios (the eval prompt, ``actors.eval.prompts`` ``mcq``), greedy, ``--tokens`` at most:

    offline_start_s     vllm.LLM(...) construction in this process
    offline_s           one LLM.generate over the N prompts (the same prompt ids and sampling
                        parameters the batch engine builds)
    batch_wall_s        BatchEngine.answer (Ray Data, ``--actors`` vLLM actors): actor + engine start included
    batch_s             batch_wall_s minus offline_start_s (the engine start it also pays)
    endpoint_s          EndpointEngine.answer at ``--concurrency`` against the served app (started before)
    batch_vs_offline    offline_s / batch_s      (goal >= 0.85)
    batch_vs_endpoint   endpoint_s / batch_s     (goal >= 2)
    agree               prompts whose answer text is the same for all three

    .venv/bin/python benchmarks/eval.py [--prompts 200] [--tokens 16] [--llm-width 1024 --llm-layers 4]
        [--actors 1] [--threads 2] [--concurrency 8] [--skip-endpoint]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.ports import free_port  # noqa: E402

SIZES = [(96, 96), (200, 60), (60, 200), (300, 100), (50, 49), (640, 480)]


def _requests(n: int, max_tokens: int):
    from PIL import Image

    from actors.eval.benchmark_file import Question
    from actors.eval.endpoint_engine import AnswerRequest
    from actors.eval.prompts import build_messages

    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "PNG")
        q = Question(id=str(i), row=i, images=(buf.getvalue(),), question=f"What is in picture {i}?",
                     options={"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}, answers=("A",))
        out.append(AnswerRequest(id=str(i), messages=build_messages(q, "mcq"), images=[buf.getvalue()],
                                 max_tokens=max_tokens))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--llm-width", type=int, default=1024)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads of each vLLM engine")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kv-gb", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=256, help="requests per map_batches call and per block")
    p.add_argument("--skip-endpoint", action="store_true")
    a = p.parse_args()
    os.environ.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"})

    import torch

    from actors.serve.model_loader import RANDOM_SEED, debug_tokenizer
    from models.flavours import from_name
    from models.sphinx import SphinxX
    from models.weights.model_dir import save_model_dir

    heads = max(1, a.llm_width // 64)
    flavour = from_name("debug", llm={"hidden_size": a.llm_width, "num_attention_heads": heads,
                                      "num_key_value_heads": max(1, heads // 2),
                                      "intermediate_size": int(a.llm_width * 2.75), "num_hidden_layers": a.llm_layers})
    tokenizer = debug_tokenizer(int(flavour.llm["vocab_size"]))
    torch.manual_seed(RANDOM_SEED)
    model_dir = save_model_dir(SphinxX.from_flavour(flavour, tokenizer).eval(), tokenizer,
                               tempfile.mkdtemp(prefix="sphinx-eval-bench-"))
    requests = _requests(a.prompts, a.tokens)
    result: dict = {"llm": {"hidden_size": a.llm_width, "num_hidden_layers": a.llm_layers}, "prompts": a.prompts,
                    "max_tokens": a.tokens, "actors": a.actors, "threads": a.threads, "concurrency": a.concurrency}

    # 1. plain offline vLLM in this process, the batch engine's own request builder
    from actors.eval.batch_engine import BatchEngine, BatchOptions, VLLMAnswerer
    from actors.serve.model_loader import MemberWeights
    from actors.serve.vllm.engine import EngineOptions
    from cluster.spec import StorageSection

    engine = EngineOptions(device="cpu", dtype="float32", max_model_len=None, max_num_seqs=64, tensor_parallel_size=1,
                           gpu_memory_utilization=0.9, cpu_kv_cache_gb=a.kv_gb, enforce_eager=True, threads=a.threads)
    storage = StorageSection(uri=tempfile.mkdtemp(prefix="sphinx-eval-bench-store-"), endpoint_url=None)
    weights = MemberWeights(name="bench", checkpoint_uri=str(model_dir))
    options = BatchOptions(engine=engine, actors=a.actors, num_cpus=1, batch_size=a.batch, block_size=a.batch)
    start = time.perf_counter()
    offline = VLLMAnswerer(weights, storage, options)
    result["offline_start_s"] = round(time.perf_counter() - start, 2)
    torch.set_num_threads(a.threads)
    prepared = [offline._prepare(r.messages, r.images, r.max_tokens) for r in requests]
    offline.llm.generate([x for x, _ in prepared[:2]], [s for _, s in prepared[:2]], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = offline.llm.generate([x for x, _ in prepared], [s for _, s in prepared], use_tqdm=False)
    result["offline_s"] = round(time.perf_counter() - start, 2)
    offline_text = [o.outputs[0].text for o in outs]
    del offline, outs
    import gc

    gc.collect()

    # 2. the batch engine: Ray Data over vLLM actors
    import ray

    ray.init(num_cpus=max(4, a.actors + 2), include_dashboard=False, log_to_driver=False)  # logical CPUs
    start = time.perf_counter()
    batch = BatchEngine(weights, storage, options, cache_uri=None).answer(requests)
    result["batch_wall_s"] = round(time.perf_counter() - start, 2)
    result["batch_s"] = round(result["batch_wall_s"] - result["offline_start_s"], 2)
    result["batch_vs_offline"] = round(result["offline_s"] / result["batch_s"], 3)
    batch_text = [x.text for x in batch]
    result["batch_errors"] = sum(1 for x in batch if x.error)

    # 3. the endpoint: this project's served app on the same directory
    agree = [b == o for b, o in zip(batch_text, offline_text)]
    if not a.skip_endpoint:
        from actors.eval.endpoint_engine import EndpointEngine, EndpointOptions
        from cluster.spec import parse_spec
        from pipelines.stages import serve as serve_stage

        spec = parse_spec({"name": "eval-bench", "storage": {"uri": storage.uri, "endpoint_url": None},
                           "serve": {"http": {"host": "127.0.0.1", "port": free_port()},
                                     "models": [{"name": "bench", "checkpoint": str(model_dir),
                                                 "ray_actor_options": {"num_cpus": a.threads},
                                                 "cpu_kv_cache_gb": a.kv_gb, "max_num_seqs": 64,
                                                 "max_ongoing_requests": 64}]}})
        url = serve_stage.run_stage(spec)["url"]
        try:
            client = EndpointEngine(EndpointOptions(url=url, model="bench", concurrency=a.concurrency))
            client.answer(requests[:2])  # warm-up
            start = time.perf_counter()
            answers = client.answer(requests)
            result["endpoint_s"] = round(time.perf_counter() - start, 2)
        finally:
            serve_stage.shutdown(spec)
        result["endpoint_errors"] = sum(1 for x in answers if x.error)
        result["batch_vs_endpoint"] = round(result["endpoint_s"] / result["batch_s"], 3)
        agree = [g and x.text == b for g, x, b in zip(agree, answers, batch_text)]
    result["agree"] = f"{sum(agree)}/{len(agree)}"
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
