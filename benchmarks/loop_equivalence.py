"""The bare loop (benchmarks/learnability.py) and the train stage's DeepSpeed path, step by step,
on the demo's data:

    PYTHONPATH=. .venv/bin/python benchmarks/loop_equivalence.py [--steps 200] [--n-train 5000]
        [--paths engine,bare-ds,bare,learnability] [--eval]

The demo's rows (``synthetic.generate``, tokenized and tiled as learnability.py does it), the
demo's seeded plan (``plan_batches`` with its ``train`` section), the same initial weights; the
paths, each for ``--steps`` steps with the schedule over those steps:

- ``engine``: two gloo ranks (no Ray), each the demo's DeepSpeed ZeRO-2 engine
  (``construct_model`` + ``build_engine``) and the worker's ``_train_step`` over its planned
  micro-batches;
- ``bare-ds``: learnability's loop (``bare_optimizer`` / ``bare_step``) on each step's whole
  global batch, with the engine's lr per step (``schedule="deepspeed"``);
- ``bare``: the same with learnability's own schedule (``schedule="bare"``);
- ``learnability``: learnability.py as it runs: its own sample order (``random.Random(seed)``,
  no length grouping), its own schedule.

``--eval`` answers the held-out questions greedily after training (learnability's ``evaluate``).
Prints one JSON object: per path the loss per step, the grad norm per step, the lr per step,
the held-out accuracies, CPU seconds; and per pair the largest loss difference per window.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learnability  # noqa: E402
from actors.train.batching import collate, plan_batches  # noqa: E402
from cluster.ports import free_port  # noqa: E402
from models import tiling  # noqa: E402
from models.sphinx import SphinxX  # noqa: E402
from pipelines.demo import demo, synthetic  # noqa: E402
from pipelines.stages.train import train_flavour, training_rows  # noqa: E402


def demo_spec(steps: int, n_train: int, seed: int):
    return demo.build_spec(replace(demo.FULL, steps=steps, n_train=n_train, seed=seed), run_id="equivalence",
                           port=8000)


def data(n_train: int, n_heldout: int, seed: int, flavour):
    """(dataset, tokenizer, shard-like rows, learnability's items), as learnability.py builds them."""
    spec = tiling.TileSpec.from_flavour(flavour)
    ds = synthetic.generate(n_train, n_heldout, seed=seed)
    tok, items = learnability.tokenizer_and_items(ds, spec, flavour)
    return ds, tok, learnability.shard_rows(ds, items, spec, flavour.tokens_per_view), items


def batch_of(rows: list[dict], pad_token_id: int) -> dict:
    columns = {k: np.empty(len(rows), dtype=object) for k in rows[0]}
    for i, row in enumerate(rows):
        for k, v in row.items():
            columns[k][i] = v
    return collate(columns, pad_token_id=pad_token_id)


def _engine_rank(rank: int, port: int, args, tok_dir: str, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import build_engine, construct_model
        from actors.train.worker import _train_step

        spec = demo_spec(args.steps, args.n_train, args.seed)
        train, flavour = spec.train, train_flavour(spec)
        ds, tok, rows, _ = data(args.n_train, args.n_heldout, args.seed, flavour)
        plan = make_plan(spec, rows)
        cfg = deepspeed_config(train, flavour, world_size=2, total_steps=args.steps)
        engine = build_engine(train, construct_model(flavour, tok, train, cfg), 2, args.steps, cfg)
        engine.train()
        batches = (batch_of([rows[i] for i in plan[s, rank, m]], tok.pad_token_id)
                   for s in range(args.steps) for m in range(train.grad_accum))
        config = SimpleNamespace(train=train)
        record, cpu0 = [], time.process_time()
        for step in range(args.steps):
            metrics, _, _ = _train_step(engine, batches, config, step, rank, 2, None, report_s=0.0,
                                        restored_from=None)
            record.append((metrics["loss"], metrics["grad_norm"], metrics["lr"]))
        cpu = time.process_time() - cpu0
        accuracy = None
        if args.eval and rank == 0:
            spec_t = tiling.TileSpec.from_flavour(flavour)
            accuracy = learnability.evaluate(engine.module, ds, tok, spec_t, flavour.tokens_per_view)
        out.put((rank, record, accuracy, cpu))
    finally:
        dist.destroy_process_group()


def make_plan(spec, rows: list[dict]) -> np.ndarray:
    t = spec.train
    _, lengths = training_rows(spec, np.asarray([len(r["input_ids"]) for r in rows]))
    return plan_batches(lengths, micro_batch=t.micro_batch, grad_accum=t.grad_accum, world_size=t.workers,
                        steps=t.steps, seed=t.seed)


def engine_path(args, tok) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="sx-equiv-tok-") as tok_dir:
        tok.save_pretrained(tok_dir)
        port = free_port()
        procs = [ctx.Process(target=_engine_rank, args=(r, port, args, tok_dir, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        results = {r[0]: r[1:] for r in (out.get(timeout=7200) for _ in procs)}
        for p in procs:
            p.join(timeout=60)
    record, accuracy, cpu = results[0]
    return {"record": record, "accuracy": accuracy, "cpu_s": cpu + results[1][2]}


def bare_path(args, spec, ds, tok, rows, items, plan, schedule: str, own_order: bool) -> dict:
    train, flavour = spec.train, train_flavour(spec)
    torch.manual_seed(train.seed)
    model = SphinxX.from_flavour(flavour, tok)
    model.set_vision_trainable(train.train_encoders)
    model.train()
    opt, sched = learnability.bare_optimizer(model, lr=train.lr, steps=args.steps, warmup_ratio=train.warmup_ratio,
                                             schedule=schedule)
    rng, order, record, cpu0 = random.Random(args.seed), [], [], time.process_time()
    for step in range(args.steps):
        if own_order:  # learnability.py's order and collate
            if len(order) < train.global_batch:
                order += rng.sample(range(len(items)), len(items))
            batch = learnability._collate([items[i] for i in order[:train.global_batch]], tok.pad_token_id)
            del order[:train.global_batch]
        else:
            batch = batch_of([rows[i] for i in plan[step].reshape(-1)], tok.pad_token_id)
        lr = opt.param_groups[0]["lr"]
        inputs = {k: batch.get(k) for k in ("input_ids", "attention_mask", "labels", "views", "kept")}
        record.append((*learnability.bare_step(model, inputs, opt, sched, grad_clip=train.grad_clip), lr))
    cpu = time.process_time() - cpu0
    accuracy = None
    if args.eval:
        accuracy = learnability.evaluate(model, ds, tok, tiling.TileSpec.from_flavour(flavour), flavour.tokens_per_view)
    return {"record": record, "accuracy": accuracy, "cpu_s": cpu}


def windows(a: list, b: list, size: int) -> list[dict]:
    """Per window of ``size`` steps: each path's mean loss and the largest |difference| of a step."""
    out = []
    for k in range(0, len(a), size):
        x, y = [r[0] for r in a[k:k + size]], [r[0] for r in b[k:k + size]]
        out.append({"steps": f"{k}-{k + len(x) - 1}", "mean_a": round(sum(x) / len(x), 4),
                    "mean_b": round(sum(y) / len(y), 4),
                    "max_abs_diff": round(max(abs(p - q) for p, q in zip(x, y)), 6)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n-train", type=int, default=demo.FULL.n_train)
    p.add_argument("--n-heldout", type=int, default=demo.FULL.n_heldout)
    p.add_argument("--seed", type=int, default=demo.FULL.seed)
    p.add_argument("--paths", default="engine,bare-ds,bare,learnability")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = demo_spec(args.steps, args.n_train, args.seed)
    ds, tok, rows, items = data(args.n_train, args.n_heldout, args.seed, train_flavour(spec))
    plan = make_plan(spec, rows)
    results = {}
    for name in args.paths.split(","):
        t0 = time.time()
        if name == "engine":
            results[name] = engine_path(args, tok)
        else:
            results[name] = bare_path(args, spec, ds, tok, rows, items, plan,
                                      schedule="deepspeed" if name == "bare-ds" else "bare",
                                      own_order=name == "learnability")
        results[name]["wall_s"] = round(time.time() - t0, 1)
        r = results[name]["record"]
        print(f"{name}: loss {r[0][0]:.4f} -> {sum(x[0] for x in r[-20:]) / len(r[-20:]):.4f} "
              f"acc {results[name]['accuracy']} {results[name]['wall_s']} s", file=sys.stderr, flush=True)
    size = max(1, args.steps // 10)
    names = list(results)
    pairs = {f"{a} vs {b}": windows(results[a]["record"], results[b]["record"], size)
             for i, a in enumerate(names) for b in names[i + 1:]}
    print(json.dumps({"config": vars(args), "paths": results, "pairs": pairs,
                      "final_loss": {n: round(sum(x[0] for x in r["record"][-20:]) / len(r["record"][-20:]), 4)
                                     for n, r in results.items()}}))


if __name__ == "__main__":
    main()
