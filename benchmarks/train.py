"""Training throughput: bare PyTorch vs Ray Train + DeepSpeed, 2-worker scaling, skip tokens.

Prints ONE JSON object. Same model (`debug`), same collated batches everywhere:

- ``bare_steps_per_s``: a single-process PyTorch loop (AdamW, the same micro-batch);
- ``ray_ds_1_steps_per_s``: Ray Train TorchTrainer + DeepSpeed ZeRO-2, 1 worker, timed inside
  the worker after warm-up (startup excluded); ``overhead_ratio`` = bare / ray (goal ≤ 1.15);
  both are medians of ``--rounds`` interleaved bare / Ray pairs;
- ``ray_ds_2_steps_per_s`` and ``scaling_efficiency`` = samples/s with 2 workers / (2 × with 1);
- ``skip_step_s`` vs ``noskip_step_s``: forward+backward of a batch of 2:1 wide images with skip
  tokens (2 of 4 tiles skipped) and with every tile encoded;
- ``demo_like_*``: the real ``sphinx-x train`` stage (``pipelines.stages.train.run_stage``: planned
  per-rank datasets via ``get_dataset_shard``/``iter_torch_batches``, 2 workers, micro-batch 8,
  ZeRO-2, fp32, embedded S3) run twice: reporting to Ray Train every step (as before) and with
  the default report interval. Steady steps/s from the steps' ``wall_t``, and the mean per-step
  phases (data_s, compute_s, sync_s, report_s) from ``metrics.jsonl``.

    .venv/bin/python benchmarks/train.py [--steps 30] [--demo-steps 60] [--rounds 3]

``--scale`` (issue 15) runs instead, side by side in one run: (i) peak RSS per rank of a 0.38 B
model, one process vs ZeRO-3 and ZeRO-2 on 2 ranks (``benchmarks/train_memory.py``); (ii)
padding share and tokens/s over a demo-like epoch, packed vs length-grouped
(``benchmarks/train_packing.py``); (iii) Ray Train + DeepSpeed (1 worker) vs the bare loop on
packed micro-batches (``overhead_ratio``, goal ≤ 1.10).

    .venv/bin/python benchmarks/train.py --scale [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MICRO = 4


def _batches(n: int, wide_only: bool = False):
    from actors.train.batching import collate
    from pipelines.demo.synthetic_shards import build_rows

    tokenizer, rows = build_rows("debug", n_rows=n * MICRO, seed=3, wide_only=wide_only)
    cols = list(rows[0])
    out = []
    for k in range(n):
        chunk = rows[k * MICRO:(k + 1) * MICRO]
        batch = {c: np.array([r[c] for r in chunk] + [None], dtype=object)[:-1] for c in cols}
        out.append(collate(batch, pad_token_id=tokenizer.pad_token_id))
    return tokenizer, out


def _model(tokenizer):
    from models.flavours import from_name
    from models.sphinx import SphinxX

    torch.manual_seed(0)
    return SphinxX.from_flavour(from_name("debug"), tokenizer)


def bare_loop(tokenizer, batches, steps: int) -> float:
    from actors.train.batching import model_inputs

    torch.set_num_threads(1)
    model = _model(tokenizer)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        out = model(**model_inputs(batches[i % len(batches)]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def _ray_worker(config):
    import deepspeed
    import ray.train

    from actors.train.batching import model_inputs
    from actors.train.deepspeed_config import deepspeed_config
    from actors.upstream import no_cpu_shm_comm_build
    from cluster.spec import TrainSection

    torch.set_num_threads(1)
    world = ray.train.get_context().get_world_size()
    model = _model(config["tokenizer"])
    train = TrainSection(workers=world, micro_batch=MICRO, lr=1e-4, zero_stage=2)
    cfg = deepspeed_config(train, model.flavour, world_size=world, total_steps=1000)
    no_cpu_shm_comm_build()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    batches, steps = config["batches"], config["steps"]
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        out = engine(**model_inputs(batches[i % len(batches)]))
        engine.backward(out.loss)
        engine.step()
    rate = steps / (time.perf_counter() - t0)
    if ray.train.get_context().get_world_rank() == 0:  # v2 keeps metrics only with checkpoints
        with open(config["out"], "w") as f:
            f.write(str(rate))


def ray_loop(tokenizer, batches, steps: int, workers: int) -> float:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        trainer = TorchTrainer(_ray_worker, train_loop_config={"tokenizer": tokenizer, "batches": batches,
                                                               "steps": steps, "out": out},
                               scaling_config=ScalingConfig(num_workers=workers),
                               run_config=RunConfig(name=f"bench{workers}", storage_path=tmp))
        trainer.fit()
        with open(out) as f:
            return float(f.read())


def skip_vs_noskip(tokenizer, reps: int) -> dict:
    """Step time of a batch of wide images with skip tokens vs every tile encoded."""
    from actors.train.batching import model_inputs
    from models.flavours import from_name
    from models.tiling import TileSpec

    flavour = from_name("debug")
    spec = TileSpec.from_flavour(flavour)
    n = flavour.tokens_per_view
    _, batches = _batches(2, wide_only=True)
    skip = next(b for b in batches if "views" in b)
    # the same images with every tile kept: the skipped tiles are the (padding) canvas tiles
    kept_all = torch.ones_like(skip["kept"])
    views, s = [], spec.tile_size
    v = 0
    for mask in skip["kept"]:
        k = int(mask.sum())
        glob, tiles = skip["views"][v], list(skip["views"][v + 1:v + 1 + k])
        v += 1 + k
        pad = torch.tensor(spec.mean_u8, dtype=torch.uint8).expand(s, s, 3)
        full = iter(tiles)
        views += [glob] + [next(full) if keep else pad for keep in mask.tolist()]
    extra = [int((~m).sum()) * (n + 1) for m in skip["kept"]]  # each skipped tile: N+2 tokens instead of 1
    ids, labels = [], []
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for row in range(skip["input_ids"].shape[0]):
        seq = skip["input_ids"][row][skip["attention_mask"][row] == 1].tolist()
        lab = skip["labels"][row][skip["attention_mask"][row] == 1].tolist()
        first = seq.index(image_id) if image_id in seq else None
        if first is not None:
            add = extra.pop(0)
            seq = seq[:first] + [image_id] * add + seq[first:]
            lab = lab[:first] + [-100] * add + lab[first:]
        ids.append(seq)
        labels.append(lab)
    width = max(map(len, ids))
    noskip = {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
              "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
              "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
              "views": torch.stack(views), "kept": kept_all}
    model = _model(tokenizer)

    def step_time(batch):
        for i in range(reps + 2):
            if i == 2:
                t0 = time.perf_counter()
            model(**model_inputs(batch)).loss.backward()
        return (time.perf_counter() - t0) / reps

    return {"skip_step_s": step_time(skip), "noskip_step_s": step_time(noskip),
            "skip_tokens": int(skip["input_ids"].shape[1]), "noskip_tokens": width}


def demo_like(steps: int, report_every_s: float, s3_endpoint: str, shard_format: int = 2) -> dict:
    """The demo's train stage on the train-test shards (``shard_format``: 2 stored images, 1 raw
    views); steady-state steps/s and phase means."""
    import uuid

    from cluster.connect import storage_for
    from cluster.layout import Layout
    from cluster.spec import parse_spec
    from pipelines.demo.synthetic_shards import write_shards
    from pipelines.stages.train import run_stage

    spec = parse_spec({
        "name": "bench", "storage": {"uri": f"s3://sphinx-x-bench/{uuid.uuid4().hex[:8]}", "endpoint_url": "embedded"},
        "model": {"flavour": "debug"},
        "train": dict(workers=2, zero_stage=2, micro_batch=8, lr=3e-3, warmup_ratio=0.05, steps=steps, epochs=None,
                      checkpoint_every=steps, keep_checkpoints=1, max_failures=0, precision="fp32", use_gpu=False),
    }, "bench-spec")
    storage = storage_for(spec)
    lay = Layout.from_spec(spec, storage.uri)
    write_shards(storage, lay, n_rows=400, rows_per_shard=100, shard_format=shard_format)
    t0 = time.perf_counter()
    run_stage(spec, force=True, export=False, report_every_s=report_every_s)
    wall = time.perf_counter() - t0
    history = [json.loads(x) for x in storage.read_bytes(lay.metrics).decode().splitlines()]
    steady = history[5:-1]  # past warm-up, before the final checkpoint
    rate = (len(steady) - 1) / (steady[-1]["wall_t"] - steady[0]["wall_t"])
    phases = {k: round(float(np.mean([m[k] for m in steady])), 4)
              for k in ("step_time_s", "data_s", "compute_s", "sync_s", "report_s")}
    storage.delete(f"{spec.storage.uri}/")
    return {"steps_per_s": round(rate, 3), "stage_wall_s": round(wall, 1), **phases,
            "loss_last": round(history[-1]["loss"], 4)}


def _packed_batches(n: int):
    """``n`` packed micro-batches of 2 rows ≤ 512 tokens (the --scale overhead comparison)."""
    from actors.train.batching import collate, pack_rows
    from actors.train.data import merge_pack
    from pipelines.demo.synthetic_shards import build_rows

    tokenizer, rows = build_rows("debug", n_rows=16 * n, seed=3)
    packs = pack_rows([r["num_tokens"] for r in rows], capacity=512, seed=0)
    out = []
    for k in range(n):
        chunk = [merge_pack([rows[i] for i in p]) for p in packs[2 * k:2 * k + 2]]
        cols = {c: np.array([r[c] for r in chunk] + [None], dtype=object)[:-1] for c in chunk[0]}
        out.append(collate(cols, pad_token_id=tokenizer.pad_token_id))
    return tokenizer, out


def scale(args) -> dict:
    """Issue 15's measurements, one after another in this one run (see the module docstring)."""
    import ray

    sys.path.insert(0, os.path.dirname(__file__))
    from train_memory import memory_section
    from train_packing import packing_section

    sections = set(args.sections.split(","))
    out: dict = {"benchmark": "train --scale", "load_average_start": os.getloadavg()}
    if "memory" in sections:
        out["memory"] = memory_section()
    if "packing" in sections:
        out["packing"] = packing_section()
    if "overhead" not in sections:
        return out
    tokenizer, batches = _packed_batches(8)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        bares, ones = [], []
        for _ in range(args.rounds):
            bares.append(bare_loop(tokenizer, batches, args.steps))
            ones.append(ray_loop(tokenizer, batches, args.steps, 1))
    finally:
        ray.shutdown()
    bare, one = float(np.median(bares)), float(np.median(ones))
    out["overhead"] = {"batches": "packed, 2 rows ≤ 512 tokens", "bare_steps_per_s": round(bare, 3),
                       "ray_ds_1_steps_per_s": round(one, 3), "overhead_ratio": round(bare / one, 3),
                       "rounds": [[round(b, 2), round(o, 2)] for b, o in zip(bares, ones)]}
    out["load_average_end"] = os.getloadavg()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", action="store_true", help="issue 15: memory per rank, packing, overhead")
    p.add_argument("--sections", default="memory,packing,overhead", help="--scale: which of them")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--demo-steps", type=int, default=60, help="0 skips the demo-like runs")
    p.add_argument("--rounds", type=int, default=3, help="bare / Ray 1-worker pairs, interleaved; medians")
    args = p.parse_args()
    if args.scale:
        print(json.dumps(scale(args)))
        return
    import ray

    from cluster.connect import worker_env
    from cluster.spec import StorageSection
    from cluster.storage import EmbeddedS3

    tokenizer, batches = _batches(8)
    server = EmbeddedS3()
    server.start()
    os.environ["SPHINX_X_S3_ENDPOINT"] = server.endpoint_url
    demo = {}
    # the dashboard serves the state API Ray Train v2's placement-group cleaner asks (tests/conftest.py)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": worker_env(StorageSection(), server.endpoint_url)})
    try:
        bares, ones = [], []
        for _ in range(args.rounds):  # interleaved, so a burst of load on the shared box hits both
            bares.append(bare_loop(tokenizer, batches, args.steps))
            ones.append(ray_loop(tokenizer, batches, args.steps, 1))
        bare, one = float(np.median(bares)), float(np.median(ones))
        two = ray_loop(tokenizer, batches, args.steps, 2)
        if args.demo_steps:
            from actors.train.worker import REPORT_EVERY_S

            demo["demo_like_report_every_step"] = demo_like(args.demo_steps, 0.0, server.endpoint_url)
            demo["demo_like_report_every_%gs" % REPORT_EVERY_S] = demo_like(args.demo_steps, REPORT_EVERY_S,
                                                                            server.endpoint_url)
    finally:
        ray.shutdown()
        server.stop()
    skip = skip_vs_noskip(tokenizer, reps=max(3, args.steps // 5))
    print(json.dumps({
        "benchmark": "train", "model": "debug", "micro_batch": MICRO, "steps": args.steps,
        "bare_steps_per_s": round(bare, 3), "ray_ds_1_steps_per_s": round(one, 3),
        "overhead_ratio": round(bare / one, 3), "rounds": args.rounds,
        "bare_rounds": [round(x, 2) for x in bares], "ray_ds_1_rounds": [round(x, 2) for x in ones], "ray_ds_2_steps_per_s": round(two, 3),
        "scaling_efficiency": round(two / one, 3),  # samples/s (2 workers) / (2 × samples/s (1 worker))
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in skip.items()},
        "skip_speedup": round(skip["noskip_step_s"] / skip["skip_step_s"], 3),
        **demo,
        "load_average": os.getloadavg(),
        "gpu": False,
    }))


if __name__ == "__main__":
    main()
