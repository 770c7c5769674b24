"""Model benchmark: debug forward+backward throughput, and what skip tokens save.

    .venv/bin/python benchmarks/model.py [--steps 10] [--threads 1]

Prints ONE JSON object:

- ``train_step``: for `debug` and `debug-moe`, a fixed batch (4 samples × ~256 tokens, one
  image each of mixed aspect ratios) → forward + backward; 3 warm-up steps, then the median
  of ``--steps`` timed steps; tokens/s = batch tokens / median step time.
- ``skip_tokens``: over a fixed list of image sizes (portraits, landscapes, panoramas), the
  LLM image tokens and encoded views with the skip rule vs. the same grid encoding every tile
  ((1 + G²)(N + 2) tokens per image), for the real flavours' N = 257 at G = 2 and G = 3, and
  for `debug` (N = 17, G = 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.flavours import from_name  # noqa: E402
from models.sphinx import IGNORE_INDEX, SphinxX  # noqa: E402
from models.tiling import TileSpec, image_token_count, kept_mask, tile_image  # noqa: E402

# (W, H): portraits, landscapes, a square, panoramas (wide and tall)
SIZES = [(768, 1024), (1080, 1920), (1024, 768), (1920, 1080), (1000, 1000), (1600, 900),
         (4000, 1000), (3000, 800), (6000, 1000), (800, 3000)]
TRAIN_BATCH_SIZES = [(96, 96), (192, 64), (64, 160), (300, 60)]
SEQ_LEN = 256


def _batch(model: SphinxX) -> dict[str, torch.Tensor]:
    f = model.flavour
    spec = TileSpec.from_flavour(f)
    gen = torch.Generator().manual_seed(0)
    rows, views, kept = [], [], []
    for i, (w, h) in enumerate(TRAIN_BATCH_SIZES):
        rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        t = tile_image(Image.fromarray(rgb), spec)
        views.append(t.views)
        kept.append(t.kept)
        n_img = (1 + t.n_kept) * (f.tokens_per_view + 2) + t.n_skipped
        text = torch.randint(10, model.vocab_size, (SEQ_LEN - n_img - 1,), generator=gen)
        rows.append(torch.cat([torch.tensor([model.bos_token_id] + [model.image_token_id] * n_img), text]))
    ids = torch.stack(rows)
    labels = ids.clone()
    labels[:, : SEQ_LEN // 2] = IGNORE_INDEX  # the second half is the "answer"
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                views=torch.from_numpy(np.concatenate(views)), kept=torch.from_numpy(np.stack(kept)))


def train_step(name: str, steps: int) -> dict:
    torch.manual_seed(0)
    f = from_name(name)
    model = SphinxX(f, vocab_size=f.llm["vocab_size"], image_token_id=4, pad_token_id=3, bos_token_id=0,
                    eos_token_id=1).train()
    batch = _batch(model)
    times = []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = int(batch["input_ids"].numel())
    return {"batch": list(batch["input_ids"].shape), "views": int(batch["views"].shape[0]),
            "step_s_median": round(med, 4), "step_s_min": round(min(times), 4),
            "tokens_per_s": round(tokens / med, 1)}


def skip_savings(tokens_per_view: int, grid: int, tile_size: int) -> dict:
    spec = TileSpec(grid=grid, tile_size=tile_size)
    full_tokens = (1 + grid * grid) * (tokens_per_view + 2)
    with_skip = sum(image_token_count(w, h, spec, tokens_per_view) for w, h in SIZES)
    views = sum(1 + int(kept_mask(w, h, spec).sum()) for w, h in SIZES)
    without = full_tokens * len(SIZES)
    return {"N": tokens_per_view, "grid": grid, "images": len(SIZES),
            "image_tokens_with_skip": with_skip, "image_tokens_without_skip": without,
            "token_ratio": round(with_skip / without, 4), "tokens_saved_fraction": round(1 - with_skip / without, 4),
            "views_encoded_with_skip": views, "views_encoded_without_skip": (1 + grid * grid) * len(SIZES)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    debug = from_name("debug")
    result = {
        "benchmark": "model",
        "torch_threads": args.threads,
        "train_step": {name: train_step(name, args.steps) for name in ("debug", "debug-moe")},
        "skip_tokens": {
            "sizes": [list(s) for s in SIZES],
            "real_G2": skip_savings(257, 2, 224),
            "real_G3": skip_savings(257, 3, 224),
            "debug": skip_savings(debug.tokens_per_view, debug.grid, debug.tile_size),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
