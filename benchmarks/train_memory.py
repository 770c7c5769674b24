"""Peak host memory per rank of a 300–500 M-parameter model: one process vs ZeRO-2 / ZeRO-3 on 2 ranks.

Used by ``benchmarks/train.py --scale`` (or alone: ``python benchmarks/train_memory.py``). The
model is ``SCALE_OVERRIDES`` on ``debug`` (a Llama of d 1024, 32 layers, GQA 16/8 heads, ffn
2816: 0.38 B parameters, the toy encoders), fp32 on CPU, AdamW, micro-batch 1 of one packed
synthetic row of ``SEQ`` tokens, two optimizer steps. Every configuration runs in fresh
processes (``ru_maxrss`` is a process's lifetime peak), one after another:

- ``single``: one process, the plain model and ``torch.optim.AdamW`` (no DeepSpeed): what a
  rank holds without sharding — parameters, gradients, two Adam moments;
- ``zero2`` / ``zero3``: two gloo ranks through the training code (``actors.train.engine``
  ``construct_model`` + ``build_engine``; ZeRO-3 builds under ``deepspeed.zero.Init``; the
  optimizer's fp32 master partition is the fp32 parameter partition itself, ``share_fp32_master``).

Every process, ``single`` included, runs with the training code's host allocator setting
(``actors.upstream.bound_host_allocator``: glibc mmaps every block of 1 MiB or more, so freed tensors return).

``zero3`` also measures the export after its steps, side by side on the same engine: the rise
of rank 0's resident memory (sampled every 5 ms) while (a) ``actors.train.consolidate.write_model_dir``
streams the model into a directory with ``EXPORT_SHARD_BYTES`` shards, and (b) the old way,
``consolidated_state_dict`` gathering the whole state on rank 0. ``export`` gives both rises and
the model's fp32 bytes.

The figure is each configuration's largest rank peak RSS (``ru_maxrss``), and its ratio to
``single`` (goal for ZeRO-3: ≤ 0.65). The processes start from the same imports (torch,
transformers, DeepSpeed: their ~0.5 GB is in every figure).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cluster.ports import free_port  # noqa: E402

SCALE_OVERRIDES = {"llm": {"hidden_size": 1024, "num_hidden_layers": 32, "num_attention_heads": 16,
                           "num_key_value_heads": 8, "intermediate_size": 2816}}
SEQ = 128
STEPS = 2
EXPORT_SHARD_BYTES = 128 * 2**20


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _phase(phases: dict, name: str) -> None:
    """Peak RSS so far at the end of a phase (GiB)."""
    phases[name] = round(_peak_rss_gib(), 3)


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _rise_while(fn) -> tuple[float, object]:
    """(GiB: the most resident memory rose over its start while ``fn`` ran, fn's result)."""
    import gc
    import threading

    gc.collect()
    start, peak, done = _rss_gib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_gib())
            done.wait(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    return round(max(peak[0], _rss_gib()) - start, 3), result


def _export_figures(engine, tokenizer, rank: int) -> dict:
    """Rank 0's memory rise: streamed export vs the whole state gathered (module docstring)."""
    import tempfile

    import torch

    from actors.train.consolidate import consolidated_state_dict, write_model_dir

    with tempfile.TemporaryDirectory(prefix="sx-bench-export-") as tmp:
        t0 = time.perf_counter()
        streamed, _ = _rise_while(lambda: write_model_dir(engine, tokenizer, tmp, dtype=torch.float32,
                                                          max_shard_bytes=EXPORT_SHARD_BYTES))
        stream_s = time.perf_counter() - t0
        files = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    t0 = time.perf_counter()
    gathered, state = _rise_while(lambda: consolidated_state_dict(engine, dtype=torch.float32))
    gather_s = time.perf_counter() - t0
    model_bytes = sum(v.numel() * v.element_size() for v in state.values()) if state is not None else None
    del state
    return {"rank": rank, "stream_rise_gib": streamed, "gather_rise_gib": gathered,
            "stream_s": round(stream_s, 1), "gather_s": round(gather_s, 1),
            "model_fp32_gib": round(model_bytes / 2**30, 3) if model_bytes else None,
            "written_gib": round(files / 2**30, 3) if rank == 0 else None,
            "shard_gib": round(EXPORT_SHARD_BYTES / 2**30, 3)}


def _batch(tokenizer):
    import numpy as np

    from actors.train.batching import collate
    from actors.train.data import merge_pack
    from pipelines.demo.synthetic_shards import build_rows

    _, rows = build_rows("debug", n_rows=16, seed=0)
    picked, total = [], 0
    for r in rows:
        if total + r["num_tokens"] <= SEQ:
            picked.append(r)
            total += r["num_tokens"]
    row = merge_pack(picked)
    cols = {c: np.array([row[c], None], dtype=object)[:-1] for c in row}
    return collate(cols, pad_token_id=tokenizer.pad_token_id)


def _rank(mode: str, rank: int, world: int, port: int, out) -> None:
    os.dup2(2, 1)  # a rank's own prints (DeepSpeed's op builds) go to stderr: stdout is the one JSON object
    import torch

    torch.set_num_threads(1)
    from models.flavours import from_name
    from pipelines.demo.synthetic_shards import build_rows

    tokenizer, _ = build_rows("debug", n_rows=4, seed=0)
    flavour = from_name("debug", **SCALE_OVERRIDES)
    batch = _batch(tokenizer)
    phases: dict = {}
    _phase(phases, "imports")
    t0 = time.perf_counter()
    export = None
    if mode == "single":
        from actors.train.batching import model_inputs
        from actors.upstream import bound_host_allocator
        from models.sphinx import SphinxX

        bound_host_allocator()  # the same host allocator settings as the training code's ranks
        torch.manual_seed(0)
        model = SphinxX.from_flavour(flavour, tokenizer)
        model.set_vision_trainable(False)
        params = sum(p.numel() for p in model.parameters())
        _phase(phases, "built")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
        for k in range(STEPS):
            model(**model_inputs(batch)).loss.backward()
            _phase(phases, f"backward{k}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            _phase(phases, f"step{k}")
        seconds = time.perf_counter() - t0
    else:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from actors.train.batching import model_inputs
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import build_engine, construct_model
        from cluster.spec import TrainSection

        train = TrainSection(workers=world, zero_stage=int(mode[-1]), micro_batch=1, lr=1e-5, steps=STEPS,
                             precision="fp32")
        cfg = deepspeed_config(train, flavour, world_size=world, total_steps=STEPS)
        model = construct_model(flavour, tokenizer, train, cfg)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        _phase(phases, "built")
        engine = build_engine(train, model, world, STEPS, cfg)
        _phase(phases, "engine")
        for k in range(STEPS):
            output = engine(**model_inputs(batch, engine.device))
            engine.backward(output.loss)
            _phase(phases, f"backward{k}")
            engine.step()
            _phase(phases, f"step{k}")
        dist.barrier()
        seconds = time.perf_counter() - t0
        export = _export_figures(engine, tokenizer, rank) if mode == "zero3" else None
    out.put({"rank": rank, "peak_rss_gib": phases[f"step{STEPS - 1}"], "params": int(params),
             "seconds": round(seconds, 1), "peak_after": phases, **({"export": export} if export else {})})


def measure(mode: str) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    world = 1 if mode == "single" else 2
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(mode, r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    peaks = sorted(results, key=lambda r: r["rank"])
    res = {"ranks": peaks, "peak_rss_gib": max(r["peak_rss_gib"] for r in peaks), "params": peaks[0]["params"],
           "seconds": max(r["seconds"] for r in peaks)}
    if "export" in peaks[0]:
        res["export"] = [r.pop("export") for r in peaks]
    return res


def memory_section(modes=("single", "zero3", "zero2")) -> dict:
    res = {m: measure(m) for m in modes}
    base = res["single"]["peak_rss_gib"] if "single" in res else None
    for m in modes:
        if base and m != "single":
            res[m]["ratio_to_single"] = round(res[m]["peak_rss_gib"] / base, 3)
    return res


if __name__ == "__main__":
    modes = tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else ("single", "zero3", "zero2")
    print(json.dumps(memory_section(modes), indent=2))
