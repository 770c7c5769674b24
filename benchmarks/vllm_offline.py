"""vLLM offline ``LLM.generate`` vs models.sphinx's generate on the same SPHINX-X weights; prints ONE JSON object.

The ``debug`` (or ``debug-moe``) flavour, LLM optionally widened / deepened, seeded random
weights written once as a model directory; N image+text requests (images of several aspect
ratios, so skip tokens vary), greedy, ``--tokens`` new tokens each (EOS ignored):

    vllm_start_s       LLM(...) construction (engine in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)
    vllm_s             one LLM.generate over the N requests
    torch_batched_s    one SphinxX.generate over the N requests (left-padded batch, KV cache)
    torch_serial_s     SphinxX.generate one request at a time
    identical          requests whose token ids agree between vLLM and the serial PyTorch run

    /work/vllm-venv/bin/python benchmarks/vllm_offline.py [--flavour debug] [--requests 32]
        [--tokens 32] [--llm-width 1024 --llm-layers 4] [--threads 1]
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

SIZES = [(96, 96), (200, 60), (60, 200), (300, 100), (50, 49), (1000, 10), (97, 40), (640, 480)]


def _requests(n: int) -> list[tuple[list[dict], bytes]]:
    from PIL import Image

    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "PNG")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
        out.append((messages, buf.getvalue()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavour", default="debug", choices=["debug", "debug-moe"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--llm-width", type=int, default=None)
    p.add_argument("--llm-layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both systems")
    a = p.parse_args()
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

    import torch
    import vllm

    from actors.serve.model_loader import RANDOM_SEED, debug_tokenizer
    from actors.serve.vllm.plugin import engine_args, register
    from models.weights.model_dir import save_model_dir
    from models.conversation import build_prompt
    from models.flavours import from_name
    from models.sphinx import SphinxX
    from models.tiling import TileSpec, image_token_count, load_and_tile

    llm_kw: dict = {}
    if a.llm_width:
        heads = max(1, a.llm_width // 64)
        llm_kw.update(hidden_size=a.llm_width, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      intermediate_size=int(a.llm_width * 2.75))
    if a.llm_layers:
        llm_kw["num_hidden_layers"] = a.llm_layers
    flavour = from_name(a.flavour, llm=llm_kw) if llm_kw else from_name(a.flavour)
    tokenizer = debug_tokenizer(int(flavour.llm["vocab_size"]))
    torch.manual_seed(RANDOM_SEED)
    model = SphinxX.from_flavour(flavour, tokenizer).eval()
    model_dir = save_model_dir(model, tokenizer, tempfile.mkdtemp(prefix="sphinx-vllm-bench-"))

    requests = _requests(a.requests)
    spec = TileSpec.from_flavour(flavour)
    tiled = [load_and_tile(img, spec) for _, img in requests]
    counts = [image_token_count(*t.original_size, spec, flavour.tokens_per_view) for t in tiled]
    prompts = [build_prompt(m, tokenizer, [c]) for (m, _), c in zip(requests, counts)]

    register()
    start = time.perf_counter()
    llm = vllm.LLM(**engine_args(model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0))
    vllm_start = time.perf_counter() - start
    torch.set_num_threads(a.threads)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": build_prompt(m, tokenizer, [1]), "multi_modal_data": {"image": img}}
              for m, img in requests]
    llm.generate(inputs[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    vllm_s = time.perf_counter() - start

    views = torch.from_numpy(np.concatenate([t.views for t in tiled]))
    kept = torch.from_numpy(np.stack([t.kept for t in tiled]))
    gen = dict(max_new_tokens=a.tokens, temperature=0.0, eos_token_id=-1)
    model.generate(prompts[:2], torch.from_numpy(np.concatenate([t.views for t in tiled[:2]])), kept[:2], **gen)
    start = time.perf_counter()
    model.generate(prompts, views, kept, **gen)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    serial = [model.generate([ids], torch.from_numpy(t.views), torch.from_numpy(t.kept[None]), **gen)[0]
              for ids, t in zip(prompts, tiled)]
    serial_s = time.perf_counter() - start
    identical = sum(list(o.outputs[0].token_ids) == ref for o, ref in zip(outs, serial))
    print(json.dumps({
        "flavour": flavour.name, "llm": {k: flavour.llm[k] for k in ("hidden_size", "num_hidden_layers")},
        "requests": a.requests, "tokens": a.tokens, "threads": a.threads,
        "prompt_tokens_mean": round(float(np.mean([len(x) for x in prompts])), 1),
        "vllm_start_s": round(vllm_start, 2), "vllm_s": round(vllm_s, 3), "torch_batched_s": round(batched_s, 3),
        "torch_serial_s": round(serial_s, 3), "vllm_tokens_per_s": round(a.requests * a.tokens / vllm_s, 1),
        "identical": f"{identical}/{a.requests}", "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
