"""Learnability benchmark: can the demo's model learn the demo's tasks in the demo's budget?

    .venv/bin/python benchmarks/learnability.py [--steps 800] [--batch 16] [--lr 3e-3]
        [--train-encoders | --frozen-encoders] [--n-train 1500] [--overrides JSON] [--threads 2]
        [--schedule bare|deepspeed] [--regions] [--train-mix SCENE WORD CHAT]
        [--spell off|row|sep] [--where-scenes N]

The demo (pipelines/demo/demo.py) trains through Ray Train + DeepSpeed on 2 workers; this is the
same model, data and recipe in one plain PyTorch loop, so settings can be tried in minutes:

- data: ``pipelines.demo.synthetic.generate(n_train, n_heldout, seed)``, tiled with
  ``models.tiling`` and tokenized with ``models.conversation`` (the debug BPE tokenizer is
  trained on the training text, as preprocess does);
- model: the demo's flavour (``debug`` + ``pipelines.demo.demo.MODEL_OVERRIDES`` unless
  ``--overrides`` replaces them), random init, encoders trainable as the demo sets them;
- recipe: AdamW β (0.9, 0.95), no weight decay, linear warm-up 5 % then cosine to 0,
  gradient clipping 1.0 (the demo's DeepSpeed config); ``--schedule deepspeed`` runs the train
  stage's lr per step exactly (DeepSpeed's WarmupCosineLR: the first two steps at lr 0);
- evaluation: greedy answers to every held-out question, exact match after
  ``synthetic.normalise_answer`` (the demo's scoring), next to the majority baseline;
  ``--regions`` adds the demo's grounding questions (``where``: their ``<box:k>`` slots filled as
  preprocess fills them, ``actors.data.regions.fill``), scored as the demo scores them
  (Acc@IoU >= 0.5 in the flavour's own frame, ``actors.eval.grounding``); ``--train-mix`` draws
  the training split with other (scene, word, chat) shares (the held-out split keeps the demo's);
- training-only extras (the held-out split is untouched): ``--spell`` asks every training word
  image to be spelt ("Spell the word letter by letter." -> "z e b r a"), as a second turn of its
  row in random order (``row``) or as a row of its own with the same image (``sep``);
  ``--where-scenes N`` adds N one-shape scenes asked only where the shape is.

Prints ONE JSON object: ``{"config", "accuracy": {type: {"accuracy", "baseline", "n"}},
"loss": {"first", "final"}, "train_cpu_s", "train_wall_s", "steps_per_cpu_s"}``. CPU time is
reported because the dev box is shared: wall time depends on the neighbours, CPU time less so.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import conversation as conv  # noqa: E402
from models import tiling  # noqa: E402
from models.flavours import from_name  # noqa: E402
from models.sphinx import SphinxX  # noqa: E402
from actors.data.regions import fill, text_of  # noqa: E402
from actors.eval.grounding import IOU_THRESHOLD, frame_of_pad, grounding_iou  # noqa: E402
from pipelines.demo import demo, synthetic  # noqa: E402
from pipelines.demo.benchmark import WHERE_MAX_TOKENS  # noqa: E402


def _prepare(rows: list[dict], images: dict[str, bytes], tok, spec: tiling.TileSpec, n_per_view: int) -> list:
    """Rows → (input_ids, labels, tiled image or None), as preprocess writes them."""
    out = []
    for row in rows:
        tiled = tiling.load_and_tile(images[row["image"]], spec) if "image" in row else None
        n = [(1 + tiled.n_kept) * (n_per_view + 2) + tiled.n_skipped] if tiled else []
        t = conv.tokenize_conversation(row["conversations"], tok, image_tokens=n, max_seq_len=1024)
        out.append((t.input_ids, t.labels, tiled))
    return out


def tokenizer_and_items(ds: synthetic.Dataset, spec: tiling.TileSpec, flavour) -> tuple:
    """(the debug BPE tokenizer trained on the training text as preprocess trains it, a slot read
    as a placeholder box; the training rows as ``_prepare`` items, slots filled)."""
    texts = [text_of(t["value"]).replace(conv.IMAGE, " ") for r in ds.train_rows() for t in r["conversations"]]
    tok = conv.train_bpe_tokenizer(texts, vocab_size=int(flavour.llm["vocab_size"]))
    images = {s.image_path: s.image for s in ds.train if s.image is not None}
    return tok, _prepare(filled_rows(ds, spec), images, tok, spec, flavour.tokens_per_view)


SPELL_QUESTION = "Spell the word letter by letter."


def training_extras(ds: synthetic.Dataset, spell: str, where_scenes: int) -> synthetic.Dataset:
    """``ds`` with the training-only extras of ``--spell`` / ``--where-scenes`` (each from its own
    random stream: the demo's samples, images and held-out split stay as they are)."""
    train = list(ds.train)
    for i, s in enumerate(ds.train):
        if s.kind != "word" or spell == "off":
            continue
        turn = ("spell", SPELL_QUESTION, " ".join(s.meta["word"]))
        if spell == "row":
            qa = list(s.qa)
            qa.insert(random.Random(f"{s.id}:spell").randint(0, len(qa)), turn)
            train[i] = synthetic.Sample(s.id, s.kind, qa, s.image, s.size, s.meta, s.boxes)
        else:
            train.append(synthetic.Sample(f"{s.id}-spell", s.kind, [turn], s.image, s.size, s.meta))
    rng = random.Random(f"extra-where:{ds.seed}")
    for i in range(where_scenes):
        size = rng.choice(synthetic.ASPECTS)
        shape, colour = rng.choice(synthetic.SHAPES), rng.choice(list(synthetic.COLOURS))
        img, boxes = synthetic.render_scene(rng, size, shape, colour, 1)
        q = rng.choice(synthetic.QUESTIONS[synthetic.REGION_TYPE]).format(c=colour, s=shape)
        train.append(synthetic.Sample(f"where-{i:05d}", "scene", [(synthetic.REGION_TYPE, q, synthetic.BOX_SLOT)],
                                      synthetic._png(img), size, {}, [[0] + [round(v, 2) for v in boxes[0]]]))
    return synthetic.Dataset(train, ds.heldout, ds.seed)


def shard_rows(ds: synthetic.Dataset, items: list, spec: tiling.TileSpec, n_per_view: int) -> list[dict]:
    """``_prepare`` items -> rows in the shard schema's columns (``actors.data.tiler``), so the train
    stage's own batching and collate can read what this loop trains on."""
    out = []
    for row, (ids, labels, tiled) in zip(ds.train_rows(), items):
        out.append({
            "id": row["id"], "input_ids": np.asarray(ids), "labels": np.asarray(labels),
            "views": tiled.views.tobytes() if tiled else b"", "view_counts": [len(tiled.views)] if tiled else [],
            "kept": tiled.kept.tolist() if tiled else [], "tile_size": spec.tile_size, "grid": spec.grid,
            "image_tokens": (1 + tiled.n_kept) * (n_per_view + 2) + tiled.n_skipped if tiled else 0,
            "saved_tokens": tiled.n_skipped * n_per_view if tiled else 0})
    return out


def _collate(items: list, pad_id: int) -> dict:
    width = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    views, kept = [], []
    for i, (a, b, tiled) in enumerate(items):
        ids[i, :len(a)], labels[i, :len(b)], mask[i, :len(a)] = torch.tensor(a), torch.tensor(b), 1
        if tiled is not None:
            views.append(torch.from_numpy(tiled.views))
            kept.append(torch.from_numpy(tiled.kept))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "views": torch.cat(views) if views else None, "kept": torch.stack(kept) if kept else None}


def filled_rows(ds: synthetic.Dataset, spec: tiling.TileSpec) -> list[dict]:
    """The training rows with every ``<box:k>`` slot written as preprocess writes it."""
    sizes = {s.image_path: s.size for s in ds.train if s.image is not None}
    rows = ds.train_rows()
    for row in rows:
        if "boxes" in row:
            row["conversations"] = fill(row["conversations"], row["boxes"], [sizes[row["image"]]], spec)
    return rows


def evaluate(model: SphinxX, ds: synthetic.Dataset, tok, spec: tiling.TileSpec, n_per_view: int) -> dict:
    """Greedy answers to every held-out question; accuracy per type next to the majority baseline
    (``where``: Acc@IoU >= 0.5 next to the mean training box's)."""
    images = {s.image_path: s.image for s in ds.heldout if s.image is not None}
    sizes = {s.image_path: s.size for s in ds.heldout if s.image is not None}
    frame = frame_of_pad(spec.pad)
    hits: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for row in ds.heldout_rows():
            msgs = conv.conversation_to_messages(row["conversations"])
            views = kept = None
            n: list[int] = []
            if "image" in row:
                tiled = tiling.load_and_tile(images[row["image"]], spec)
                n = [(1 + tiled.n_kept) * (n_per_view + 2) + tiled.n_skipped]
                views, kept = torch.from_numpy(tiled.views), torch.from_numpy(tiled.kept)[None]
            where = row["type"] == synthetic.REGION_TYPE
            out = model.generate([conv.build_prompt(msgs, tok, n)], views, kept,
                                 max_new_tokens=WHERE_MAX_TOKENS if where else 4)[0]
            text = tok.decode(out, skip_special_tokens=True)
            if where:
                iou, _ = grounding_iou(text, json.loads(row["answer"]), *sizes[row["image"]], frame)
                hits.setdefault(row["type"], []).append(iou >= IOU_THRESHOLD)
            else:
                hits.setdefault(row["type"], []).append(synthetic.normalise_answer(text) == row["answer"])
    stats = ds.stats()["types"]
    return {t: {"accuracy": round(sum(h) / len(h), 3), "baseline": round(stats[t]["baseline"], 3), "n": len(h)}
            for t, h in sorted(hits.items())}


def bare_lr_factor(s: int, steps: int, warm: int) -> float:
    """This loop's schedule (``LambdaLR``; ``s`` steps taken so far): min(1, (s+1)/warm) × a
    cosine over all ``steps``, warm-up included."""
    return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def deepspeed_lr_factor(s: int, steps: int, warm: int) -> float:
    """The lr factor of the train stage's optimizer step ``s`` (0-based): DeepSpeed's
    ``WarmupCosineLR`` as ``actors.train.deepspeed_config`` sets it (linear warm-up from 0 over
    max(2, warm) steps, then a cosine to 0 over the rest). DeepSpeed sets lr 0 when it builds the
    scheduler and steps it after every optimizer step, so step ``s`` runs at its ratio for
    iteration s - 1: steps 0 AND 1 at lr 0, the warm-up and the cosine one step late
    (tests/actors/train/test_loop_equivalence.py measures it on the engine)."""
    i, warm = s - 1, max(2, warm)
    if i < 0:
        return 0.0
    if i < warm:
        return i / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm + 1) / max(1, steps - warm))))


SCHEDULES = {"bare": bare_lr_factor, "deepspeed": deepspeed_lr_factor}


def bare_optimizer(model: SphinxX, *, lr: float, steps: int, warmup_ratio: float,
                   vision_lr: float | None = None, schedule: str = "bare"):
    """(AdamW, LambdaLR) over ``model``'s trainable parameters: β (0.9, 0.95), eps 1e-8, no weight
    decay, the lr factor of ``SCHEDULES[schedule]``; trained encoders in their own group at
    ``vision_lr``. ``tests/actors/train/test_loop_equivalence.py`` holds this loop to the train
    stage's DeepSpeed path step by step."""
    params = [q for q in model.parameters() if q.requires_grad]
    encoders = {id(q) for m in (model.vision.convnext, model.vision.dino) for q in m.parameters()}
    groups = [{"params": [q for q in params if id(q) not in encoders]},
              {"params": [q for q in params if id(q) in encoders], "lr": vision_lr or lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    warm, factor = max(1, math.ceil(warmup_ratio * steps)), SCHEDULES[schedule]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor(s, steps, warm))


def bare_step(model: SphinxX, batch: dict, opt: torch.optim.Optimizer, sched,
              grad_clip: float = 1.0) -> tuple[float, float]:
    """One optimizer step on one whole (global) batch: the mean loss over its supervised tokens,
    backward, clipping to a global gradient norm of ``grad_clip``, AdamW, the schedule; returns
    (the loss before the update, the gradient norm before clipping)."""
    loss = model(**batch).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], grad_clip)
    opt.step(), sched.step(), opt.zero_grad()
    return loss.item(), float(norm)


def main() -> None:
    cfg = demo.FULL
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=cfg.steps)
    p.add_argument("--batch", type=int, default=cfg.micro_batch * 2, help="global batch (demo: 2 workers)")
    p.add_argument("--lr", type=float, default=cfg.lr)
    p.add_argument("--n-train", type=int, default=cfg.n_train)
    p.add_argument("--n-heldout", type=int, default=cfg.n_heldout)
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--train-encoders", dest="train_encoders", action="store_true", default=None)
    enc.add_argument("--frozen-encoders", dest="train_encoders", action="store_false")
    p.add_argument("--vision-lr", type=float, default=None, help="lr of trained encoders (default: --lr)")
    p.add_argument("--overrides", type=json.loads, default=None, help="flavour overrides (JSON)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=cfg.seed)
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="bare",
                   help="lr schedule: this loop's own, or the train stage's (DeepSpeed's, step for step)")
    p.add_argument("--regions", action="store_true", help="add the demo's grounding (where) questions")
    p.add_argument("--train-mix", type=float, nargs=3, default=None, metavar=("SCENE", "WORD", "CHAT"),
                   help="the training split's shares (default: the demo's 0.6 0.3 0.1)")
    p.add_argument("--spell", choices=("off", "row", "sep"), default="off",
                   help="training word images also asked to spell the word: in their row, or a row of their own")
    p.add_argument("--where-scenes", type=int, default=0, help="training-only one-shape scenes asked only 'where'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = demo.MODEL_OVERRIDES if args.overrides is None else args.overrides
    train_encoders = cfg.train_encoders if args.train_encoders is None else args.train_encoders
    flavour = from_name("debug", **json.loads(json.dumps(overrides)))
    spec, n_per_view = tiling.TileSpec.from_flavour(flavour), flavour.tokens_per_view

    ds = synthetic.generate(args.n_train, args.n_heldout, seed=args.seed, regions=args.regions)
    if args.train_mix:  # the held-out split stays the demo's (its own random stream)
        train_only = synthetic.generate(args.n_train, 0, seed=args.seed, mix=tuple(args.train_mix), regions=args.regions)
        ds = synthetic.Dataset(train_only.train, ds.heldout, ds.seed)
    if args.where_scenes and not args.regions:
        p.error("--where-scenes needs --regions (the held-out where questions)")
    ds = training_extras(ds, args.spell, args.where_scenes)
    tok, train = tokenizer_and_items(ds, spec, flavour)

    torch.manual_seed(args.seed)
    model = SphinxX.from_flavour(flavour, tok)
    model.set_vision_trainable(train_encoders)
    params = [q for q in model.parameters() if q.requires_grad]
    opt, sched = bare_optimizer(model, lr=args.lr, steps=args.steps, warmup_ratio=cfg.warmup_ratio,
                                vision_lr=args.vision_lr, schedule=args.schedule)
    rng, order, losses = random.Random(args.seed), [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch:
            order += rng.sample(range(len(train)), len(train))
        batch = _collate([train[i] for i in order[:args.batch]], tok.pad_token_id)
        del order[:args.batch]
        losses.append(bare_step(model, batch, opt, sched)[0])
        if step % 100 == 0:
            print(f"step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.3f} "
                  f"cpu {time.process_time() - cpu0:.0f}s", file=sys.stderr, flush=True)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0

    print(json.dumps({
        "config": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "n_train": args.n_train,
                   "n_heldout": args.n_heldout, "train_encoders": train_encoders, "vision_lr": args.vision_lr, "overrides": overrides,
                   "threads": args.threads, "seed": args.seed, "schedule": args.schedule,
                   "regions": args.regions, "train_mix": args.train_mix, "spell": args.spell,
                   "where_scenes": args.where_scenes},
        "accuracy": evaluate(model, ds, tok, spec, n_per_view),
        "loss": {"first": round(losses[0], 3), "final": round(sum(losses[-20:]) / len(losses[-20:]), 3)},
        "trainable_params": sum(q.numel() for q in params),
        "train_cpu_s": round(cpu_s, 1), "train_wall_s": round(wall_s, 1),
        "steps_per_cpu_s": round(args.steps / cpu_s, 3),
    }))


if __name__ == "__main__":
    main()
