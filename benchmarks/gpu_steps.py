"""Training steps on one GPU through the training code's own path; prints ONE JSON object.

Run by ``benchmarks/gpu.sh`` (which installs the project first). Cases, each a fresh engine in
this one process (world size 1, NCCL, bf16 — ``precision: auto`` on GPU):

- ``tiny_zero2`` / ``tiny_zero3``: ``tiny`` (TinyLlama-1.1B shapes, the ConvNeXt-XXL and DINOv2-g
  encoders frozen), random init, packed rows of synthetic image + text samples
  (``pipelines.demo.synthetic_shards.build_rows`` → ``actors.train.batching.pack_rows`` /
  ``actors.train.data.merge_pack`` / ``collate``), activation checkpointing on (real flavour);
- ``debug_moe_autoep``: ``debug-moe`` with DeepSpeed AutoEP (expert-parallel size 1 on one GPU).

Per case: tokens/s over the timed steps (after warm-up), model FLOPs per token
(``model_flops_per_token``: FlopCounterMode on the forward; LLM ×3 for forward + backward, the
frozen encoders ×1; recomputation not counted), MFU = FLOPs per token × tokens/s ÷ the GPU's peak dense bf16 FLOP/s
(``--peak-tflops``, else a table by device name), peak GPU memory (``max_memory_allocated``).

``--cpu-smoke``: the same code on CPU with gloo, fp32, ``debug`` instead of ``tiny``, two steps
per case (what can be checked without a GPU).

    python benchmarks/gpu_steps.py [--steps 6] [--warmup 2] [--micro 2] [--seq 2048] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "A6000": 155.0}


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def init_process_group(backend: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=0, world_size=1)


def packed_batches(flavour_name: str, *, micro: int, seq: int, n: int):
    """(tokenizer, [collated packed micro-batches]) of synthetic samples of the flavour."""
    from actors.train.batching import collate, pack_rows
    from actors.train.data import merge_pack
    from pipelines.demo.synthetic_shards import build_rows

    tokenizer, rows = build_rows(flavour_name, n_rows=max(16, 4 * micro * n), seed=0)
    lengths = [r["num_tokens"] for r in rows]
    packs = [merge_pack([rows[i] for i in p]) for p in pack_rows(lengths, capacity=seq, seed=0)]
    packs.sort(key=lambda r: -sum(r["seq_lens"]))
    batches = []
    for k in range(n):
        chunk = [packs[(k * micro + j) % len(packs)] for j in range(micro)]
        cols = {c: np.array([r[c] for r in chunk] + [None], dtype=object)[:-1] for c in chunk[0]}
        batches.append(collate(cols, pad_token_id=tokenizer.pad_token_id))
    return tokenizer, batches


def model_flops_per_token(engine, batch) -> float:
    """Model FLOPs of one training step per token: the LLM forward ×3 (forward + backward), the
    frozen encoders' forward ×1 (no backward), counted by FlopCounterMode on no-grad forwards —
    so activation recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from actors.train.batching import model_inputs

    inputs = model_inputs(batch, engine.device)
    with torch.no_grad():
        whole = FlopCounterMode(display=False)
        with whole:
            engine(**inputs)
        vision = FlopCounterMode(display=False)
        with vision:
            if inputs["views"] is not None:
                engine.module.vision(inputs["views"], inputs["kept"])
    f_all, f_vis = whole.get_total_flops(), vision.get_total_flops()
    return (3 * (f_all - f_vis) + f_vis) / int(batch["attention_mask"].sum())


def run_case(name: str, flavour_name: str, *, zero: int, autoep: bool, gpu: bool, steps: int, warmup: int,
             micro: int, seq: int) -> dict:
    from actors.train.batching import model_inputs
    from actors.train.deepspeed_config import deepspeed_config
    from actors.train.engine import build_engine, construct_model
    from actors.train.export import export_dtype
    from cluster.spec import TrainSection
    from models.flavours import from_name

    flavour = from_name(flavour_name)
    train = TrainSection(workers=1, use_gpu=gpu, zero_stage=zero, micro_batch=micro, lr=1e-5, steps=steps + warmup,
                         checkpoint_every=10**6)
    tokenizer, batches = packed_batches(flavour_name, micro=micro, seq=seq, n=steps + warmup)
    cfg = deepspeed_config(train, flavour, world_size=1, total_steps=steps + warmup)
    if autoep and "expert_parallel" not in cfg:  # one GPU: AutoEP with one EP rank
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": 1, "preset_model": "mixtral",
                                  "moe_layer_pattern": r"llm\.model\.layers\.\d+\.mlp",
                                  "top_k": int(flavour.llm.get("num_experts_per_tok", 2)), "use_grouped_mm": gpu}
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else None
    t_build = time.perf_counter()
    model = construct_model(flavour, tokenizer, train, cfg, device)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = build_engine(train, model, 1, steps + warmup, cfg)
    build_s = time.perf_counter() - t_build
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step(batch) -> None:
        out = engine(**model_inputs(batch, engine.device))
        engine.backward(out.loss)
        engine.step()

    flops = model_flops_per_token(engine, batches[0])
    tokens = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        step(batch)
        if i >= warmup:
            tokens += int(batch["attention_mask"].sum())
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = tokens / elapsed
    out = {"case": name, "flavour": flavour_name, "zero_stage": zero, "autoep": bool(autoep and "expert_parallel" in cfg),
           "params": int(params), "dtype": str(export_dtype(engine)).replace("torch.", ""),
           "build_s": round(build_s, 1), "timed_steps": len(batches) - warmup, "tokens": tokens,
           "tokens_per_s": round(tps, 1), "flops_per_token": flops,
           "padding_share": round(1 - sum(int(b["attention_mask"].sum()) for b in batches)
                                  / sum(b["input_ids"].numel() for b in batches), 4)}
    if gpu:
        peak = peak_tflops(torch.cuda.get_device_name())
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["mfu"] = round(flops * tps / (peak * 1e12), 4) if peak and flops else None
    del engine, model
    if gpu:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="the same path on CPU/gloo, debug flavours")
    parser.add_argument("--cases", default="tiny_zero2,tiny_zero3,debug_moe_autoep")
    args = parser.parse_args()
    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke on a machine without a GPU")
    if args.cpu_smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        args.steps, args.warmup, args.micro, args.seq = 2, 1, 1, 512
    with contextlib.redirect_stdout(sys.stderr):
        init_process_group("nccl" if gpu else "gloo")
    dense = "tiny" if gpu else "debug"
    table = {"tiny_zero2": (dense, 2, False), "tiny_zero3": (dense, 3, False), "debug_moe_autoep": ("debug-moe", 2, True)}
    result: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "backend": "nccl" if gpu else "gloo",
                    "torch": torch.__version__, "cases": {}}
    if gpu:
        result["peak_bf16_tflops"] = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
        if args.peak_tflops:
            PEAK_BF16_TFLOPS[torch.cuda.get_device_name()] = args.peak_tflops
        try:
            import flash_attn  # noqa: F401

            result["flash_attn"] = True
        except ImportError:
            result["flash_attn"] = False
    for case in [c for c in args.cases.split(",") if c]:
        flavour_name, zero, autoep = table[case]
        try:
            with contextlib.redirect_stdout(sys.stderr):  # library prints: stdout holds the JSON alone
                    result["cases"][case] = run_case(case, flavour_name, zero=zero, autoep=autoep, gpu=gpu,
                                                 steps=args.steps, warmup=args.warmup, micro=args.micro, seq=args.seq)
        except Exception as err:  # noqa: BLE001 - one failing case must not hide the others' figures
            result["cases"][case] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
