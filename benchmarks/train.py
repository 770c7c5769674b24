"""Training throughput: bare PyTorch vs Ray Train + DeepSpeed, 2-worker scaling, skip tokens.

Prints ONE JSON object. Same model (`debug`), same collated batches everywhere:

- ``bare_steps_per_s``: a single-process PyTorch loop (AdamW, the same micro-batch);
- ``ray_ds_1_steps_per_s``: Ray Train TorchTrainer + DeepSpeed ZeRO-2, 1 worker, timed inside
  the worker after warm-up (startup excluded); ``overhead_ratio`` = bare / ray (goal ≤ 1.15);
- ``ray_ds_2_steps_per_s`` and ``scaling_efficiency`` = samples/s with 2 workers / (2 × with 1);
- ``skip_step_s`` vs ``noskip_step_s``: forward+backward of a batch of 2:1 wide images with skip
  tokens (2 of 4 tiles skipped) and with every tile encoded.

    .venv/bin/python benchmarks/train.py [--steps 30]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "pipelines"))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MICRO = 4


def _batches(n: int, wide_only: bool = False):
    from train_shards import build_rows

    from actors.batching import collate

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
    from actors.batching import model_inputs

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

    from actors.batching import model_inputs
    from actors.deepspeed_config import deepspeed_config
    from cluster.spec import TrainSection

    torch.set_num_threads(1)
    world = ray.train.get_context().get_world_size()
    model = _model(config["tokenizer"])
    train = TrainSection(workers=world, micro_batch=MICRO, lr=1e-4, zero_stage=2)
    cfg = deepspeed_config(train, model.flavour, world_size=world, total_steps=1000)
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
    from actors.batching import model_inputs
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import ray

    tokenizer, batches = _batches(8)
    bare = bare_loop(tokenizer, batches, args.steps)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        one = ray_loop(tokenizer, batches, args.steps, 1)
        two = ray_loop(tokenizer, batches, args.steps, 2)
    finally:
        ray.shutdown()
    skip = skip_vs_noskip(tokenizer, reps=max(3, args.steps // 5))
    print(json.dumps({
        "benchmark": "train", "model": "debug", "micro_batch": MICRO, "steps": args.steps,
        "bare_steps_per_s": round(bare, 3), "ray_ds_1_steps_per_s": round(one, 3),
        "overhead_ratio": round(bare / one, 3), "ray_ds_2_steps_per_s": round(two, 3),
        "scaling_efficiency": round(two / one, 3),  # samples/s (2 workers) / (2 × samples/s (1 worker))
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in skip.items()},
        "skip_speedup": round(skip["noskip_step_s"] / skip["skip_step_s"], 3),
        "gpu": False,
    }))


if __name__ == "__main__":
    main()
