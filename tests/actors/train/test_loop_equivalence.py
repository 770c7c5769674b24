"""The train stage's DeepSpeed ZeRO-2 path and the bare PyTorch loop of
``benchmarks/learnability.py`` train the demo's model alike, step by step (issue #28).

The same rows (the demo's generator, tokenized and tiled as learnability.py does it), the same
seeded plan (``plan_batches`` with the demo's ``train`` section), the same initial weights:

- engine path: two gloo ranks, each ``construct_model`` + ``build_engine`` with the demo's
  DeepSpeed config and the worker's own ``_train_step`` over its planned micro-batches
  (``token_share`` weighting, ``engine.step``), no Ray;
- bare loop: one process, ``learnability.bare_optimizer`` / ``bare_step`` on the whole global
  batch of each step (both ranks' micro-batches in one batch).

Before: a global batch's 16 rows (plan ``[step, rank, 0, :]``). After: per step the loss before
the update, the gradient norm before clipping and the lr, one list per path. The bare loop runs
DeepSpeed's schedule here (``schedule="deepspeed"``: the first two steps at lr 0); its own
schedule is compared in BENCHMARKS.md ("The bare loop and the train stage, step by step").

The rows themselves: preprocess's row function (``actors.data.tiler.Tiler``) makes the same
ids, labels and views of a demo sample as learnability.py does (the last test).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[3]
STEPS = 5
N_ROWS = 96  # one epoch of 6 global batches of 16: the plan's first 5 steps see 80 distinct rows


def _learnability():
    spec = importlib.util.spec_from_file_location("learnability", ROOT / "benchmarks" / "learnability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _demo_spec(steps: int):
    """The demo's spec (its ``train`` section and model) with ``steps`` training steps."""
    from pipelines.demo import demo

    return demo.build_spec(replace(demo.FULL, steps=steps), run_id="equivalence", port=8000)


def _rows(n: int, seed: int = 0):
    """(tokenizer, shard-like rows, learnability's prepared items) for ``n`` demo samples."""
    from models import tiling
    from pipelines.demo import synthetic
    from pipelines.stages.train import train_flavour

    learn = _learnability()
    flavour = train_flavour(_demo_spec(STEPS))
    spec = tiling.TileSpec.from_flavour(flavour)
    ds = synthetic.generate(n, 1, seed=seed)
    tok, items = learn.tokenizer_and_items(ds, spec, flavour)
    return tok, learn.shard_rows(ds, items, spec, flavour.tokens_per_view), items


def _collate(rows: list[dict], pad_token_id: int) -> dict:
    """Shard-like rows → the train worker's batch (``actors.train.batching.collate``)."""
    from actors.train.batching import collate

    columns = {k: np.empty(len(rows), dtype=object) for k in rows[0]}
    for i, row in enumerate(rows):
        for k, v in row.items():
            columns[k][i] = v
    return collate(columns, pad_token_id=pad_token_id)


def _plan(rows: list[dict], steps: int) -> np.ndarray:
    from actors.train.batching import plan_batches
    from pipelines.stages.train import training_rows

    spec = _demo_spec(steps)
    t = spec.train
    _, lengths = training_rows(spec, np.asarray([len(r["input_ids"]) for r in rows]))
    return plan_batches(lengths, micro_batch=t.micro_batch, grad_accum=t.grad_accum, world_size=t.workers,
                        steps=steps, seed=t.seed)


def _engine_rank(rank: int, port: int, tok_dir: str, rows: list[dict], plan: np.ndarray, steps: int, out) -> None:
    """One rank of the train stage's path: the demo's DeepSpeed engine and the worker's step."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import build_engine, construct_model
        from actors.train.worker import _train_step
        from models.conversation import load_tokenizer
        from pipelines.stages.train import train_flavour

        spec = _demo_spec(steps)
        train, flavour, tok = spec.train, train_flavour(spec), load_tokenizer(tok_dir)
        cfg = deepspeed_config(train, flavour, world_size=2, total_steps=steps)
        engine = build_engine(train, construct_model(flavour, tok, train, cfg), 2, steps, cfg)
        engine.train()
        batches = (_collate([rows[i] for i in plan[s, rank, m]], tok.pad_token_id)
                   for s in range(steps) for m in range(train.grad_accum))
        config = SimpleNamespace(train=train)
        record = []
        for step in range(steps):
            metrics, _, _ = _train_step(engine, batches, config, step, rank, 2, None, report_s=0.0,
                                        restored_from=None)
            record.append((metrics["loss"], metrics["grad_norm"], metrics["lr"]))
        out.put((rank, record))
    finally:
        dist.destroy_process_group()


def _engine_path(tok, rows, plan, steps: int) -> list[tuple[float, float, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="sx-equiv-tok-") as tok_dir:
        tok.save_pretrained(tok_dir)
        port = free_port()
        procs = [ctx.Process(target=_engine_rank, args=(r, port, tok_dir, rows, plan, steps, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    assert results[0] == results[1]  # every rank logs the same all-reduced step
    return results[0]


def _bare_path(tok, rows, plan, steps: int, schedule: str = "deepspeed") -> list[tuple[float, float, float]]:
    """learnability.py's loop on each step's whole global batch: (loss, grad norm, lr) per step."""
    from models.sphinx import SphinxX
    from pipelines.stages.train import train_flavour

    learn = _learnability()
    spec = _demo_spec(steps)
    train = spec.train
    torch.manual_seed(train.seed)
    model = SphinxX.from_flavour(train_flavour(spec), tok)
    model.set_vision_trainable(train.train_encoders)
    model.train()
    opt, sched = learn.bare_optimizer(model, lr=train.lr, steps=steps, warmup_ratio=train.warmup_ratio,
                                      schedule=schedule)
    record = []
    for step in range(steps):
        batch = _collate([rows[i] for i in plan[step].reshape(-1)], tok.pad_token_id)
        lr = opt.param_groups[0]["lr"]
        inputs = {k: batch.get(k) for k in ("input_ids", "attention_mask", "labels", "views", "kept")}
        record.append((*learn.bare_step(model, inputs, opt, sched, grad_clip=train.grad_clip), lr))
    return record


def test_the_demo_config_is_what_the_bare_loop_mirrors():
    """The bare loop's fixed settings are the demo's: AdamW β (0.9, 0.95), eps 1e-8, no weight
    decay, clipping 1.0, fp32, ZeRO-2, frozen encoders, one sample per row; and its
    ``deepspeed_lr_factor`` is DeepSpeed's WarmupCosineLR as the train stage configures it."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from actors.train.deepspeed_config import deepspeed_config
    from pipelines.stages.train import train_flavour

    spec = _demo_spec(2000)
    t = spec.train
    cfg = deepspeed_config(t, train_flavour(spec), world_size=t.workers, total_steps=t.steps)
    adam = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and adam["torch_adam"]
    assert (tuple(adam["betas"]), adam["eps"], adam["weight_decay"]) == ((0.9, 0.95), 1e-8, 0.0)
    assert (cfg["gradient_clipping"], cfg["bf16"]["enabled"], cfg["zero_optimization"]["stage"]) == (1.0, False, 2)
    assert (t.train_encoders, t.packing, t.grad_accum, t.min_lr) == (False, False, 1, 0.0)

    learn = _learnability()
    for steps in (5, 200, 2000):
        cfg = deepspeed_config(t, train_flavour(spec), world_size=t.workers, total_steps=steps)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
        sched = WarmupCosineLR(opt, **{k: v for k, v in cfg["scheduler"]["params"].items() if k != "warmup_type"},
                               warmup_type=cfg["scheduler"]["params"]["warmup_type"])
        warm = max(1, math.ceil(t.warmup_ratio * steps))
        for s in range(steps + 2):
            assert opt.param_groups[0]["lr"] == pytest.approx(t.lr * learn.deepspeed_lr_factor(s, steps, warm),
                                                              abs=1e-12), (steps, s)
            sched.step()


def test_the_rows_collate_as_the_bare_loop_batches_them():
    """The shard-like rows fed to both paths collate (``actors.train.batching.collate``) into the
    same tensors as learnability.py's own ``_collate`` of its prepared items."""
    tok, rows, items = _rows(24)
    learn = _learnability()
    ours = _collate(rows[:16], tok.pad_token_id)
    theirs = learn._collate(items[:16], tok.pad_token_id)
    assert theirs["views"] is not None and theirs["views"].shape[0] > 16  # image rows, several views each
    for k in ("input_ids", "attention_mask", "labels", "views", "kept"):
        assert torch.equal(ours[k], theirs[k]), k


def test_deepspeed_zero2_steps_match_the_bare_loop():
    """Five steps of the demo's recipe (lr 3e-3, warm-up, cosine over 5 steps, clipping): the
    ZeRO-2 engine on two ranks and the bare loop on the global batch give the same loss, gradient
    norm and lr at every step (measured on the 2-core box: loss within 1e-7 relative, grad norm
    within 1e-6; DeepSpeed's first two steps run at lr 0). The step's metrics name the lr it ran
    at (they named the next step's before)."""
    tok, rows, _ = _rows(N_ROWS)
    plan = _plan(rows, STEPS)
    engine = _engine_path(tok, rows, plan, STEPS)
    bare = _bare_path(tok, rows, plan, STEPS)
    for step, ((loss, norm, lr), (want_loss, want_norm, want_lr)) in enumerate(zip(engine, bare)):
        assert lr == pytest.approx(want_lr, rel=1e-9, abs=1e-12), step
        assert loss == pytest.approx(want_loss, rel=1e-5), step
        assert norm == pytest.approx(want_norm, rel=1e-4), step
    assert bare[-1][0] < bare[0][0] - 0.5  # the steps trained: a mismatch in any update would show


def test_preprocess_writes_the_rows_the_bare_loop_trains_on():
    """The data path: preprocess's row function (``actors.data.tiler.Tiler``, the demo's
    ``data`` settings: max_seq_len, webp) turns each demo sample into the same input ids, labels,
    kept mask and views (decoded from the stored image) as learnability.py's ``_prepare``."""
    from actors.data.tiler import Tiler, TilerConfig
    from models import conversation as conv
    from models import tiling
    from models.stored_image import row_views
    from pipelines.demo import synthetic
    from pipelines.stages.train import train_flavour

    spec = _demo_spec(STEPS)
    flavour = train_flavour(spec)
    tile_spec, n_per_view = tiling.TileSpec.from_flavour(flavour), flavour.tokens_per_view
    ds = synthetic.generate(40, 1, seed=1)
    rows = ds.train_rows()
    tok = conv.train_bpe_tokenizer([t["value"].replace(conv.IMAGE, " ") for r in rows for t in r["conversations"]],
                                   vocab_size=int(flavour.llm["vocab_size"]))
    images = {s.image_path: s.image for s in ds.train if s.image is not None}
    items = _learnability()._prepare(rows, images, tok, tile_spec, n_per_view)
    tiler = Tiler(TilerConfig.from_flavour(flavour, max_seq_len=spec.data.max_seq_len, overflow=spec.data.overflow,
                                           codec=spec.data.image_codec), tok)
    n_images = 0
    for row, (ids, labels, tiled) in zip(rows, items):
        raw = {"image_paths": None, "image_bytes": [images[row["image"]]] if "image" in row else None,
               "conversations": json.dumps(row["conversations"]), "boxes": None}
        out = tiler._sample(raw, {})
        assert (out["input_ids"], out["labels"], out["truncated"]) == (list(ids), list(labels), False), row["id"]
        if tiled is None:
            assert out["images"] == [], row["id"]
            continue
        n_images += 1
        views = np.frombuffer(row_views(out["images"], out["plans"], out["kept"], tile_spec), np.uint8)
        assert out["kept"] == tiled.kept.tolist() and np.array_equal(views, tiled.views.reshape(-1)), row["id"]
    assert 10 < n_images < len(rows)  # scenes, words and text-only chats
