"""Packed vs length-grouped training rows over one epoch of a demo-like mix (``benchmarks/train.py --scale``).

The mix: ``pipelines.demo.synthetic_shards.build_rows("debug")`` (the demo's tasks in miniature:
colour / word / chat rows with and without images), the demo's ``max_seq_len`` 512 and
micro-batch 8. Both arms run the same model (``debug``, fp32, one thread, AdamW) over the same
samples, one epoch, micro-batches from the training code's own plan and collate:

- ``grouped``: ``plan_batches`` on the samples (micro-batch 8, length-grouped), padded to each
  micro-batch's longest row;
- ``packed``: ``pack_rows`` into rows of ≤ 512 tokens, ``plan_batches`` on the packed rows with
  the same micro-batch of 8 rows (what a spec gets with ``packing`` on and nothing else
  changed), each row's samples merged by ``actors.train.data.merge_pack``.

Reported per arm: the padding share of the tokens the micro-batches hold, real (non-padding)
tokens per second over the epoch (after one warm-up micro-batch), and micro-batches.
"""

from __future__ import annotations

import time

import numpy as np
import torch

MAX_SEQ_LEN = 512
MICRO = 8


def _collated(rows, tokenizer, packs, plan):
    from actors.train.batching import collate
    from actors.train.data import merge_pack

    out = []
    for micro in plan.reshape(-1, plan.shape[-1]):
        chunk = [merge_pack([rows[i] for i in packs[k]]) for k in micro]
        cols = {c: np.array([r[c] for r in chunk] + [None], dtype=object)[:-1] for c in chunk[0]}
        out.append(collate(cols, pad_token_id=tokenizer.pad_token_id))
    return out


def _epoch(tokenizer, batches) -> float:
    """Real tokens per second of forward + backward + AdamW over ``batches`` (first one warms up)."""
    from actors.train.batching import model_inputs
    from models.flavours import from_name
    from models.sphinx import SphinxX

    torch.manual_seed(0)
    model = SphinxX.from_flavour(from_name("debug"), tokenizer).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    tokens = 0
    for i, batch in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        model(**model_inputs(batch)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def packing_section(n_rows: int = 512, seed: int = 0) -> dict:
    from actors.train.batching import pack_rows, padding_share, plan_batches
    from pipelines.demo.synthetic_shards import build_rows

    torch.set_num_threads(1)
    tokenizer, rows = build_rows("debug", n_rows=n_rows, seed=seed)
    lengths = np.array([r["num_tokens"] for r in rows])
    singles = [np.array([i]) for i in range(len(rows))]
    grouped_plan = plan_batches(lengths, micro_batch=MICRO, grad_accum=1, world_size=1,
                                steps=len(rows) // MICRO, seed=seed)
    packs = pack_rows(lengths, capacity=MAX_SEQ_LEN, seed=seed)
    pack_lengths = np.array([lengths[p].sum() for p in packs])
    micro_packed = MICRO
    packed_plan = plan_batches(pack_lengths, micro_batch=micro_packed, grad_accum=1, world_size=1,
                               steps=len(packs) // micro_packed, seed=seed)
    arms = {}
    for name, plan, packs_, lens in (("grouped", grouped_plan, singles, lengths),
                                     ("packed", packed_plan, packs, pack_lengths)):
        batches = _collated(rows, tokenizer, packs_, plan)
        arms[name] = {"micro_batch_rows": int(plan.shape[-1]), "micro_batches": len(batches),
                      "samples": int(sum(len(packs_[k]) for k in plan.reshape(-1))),
                      "padding_share": round(padding_share(lens, plan), 4),
                      "tokens_per_s": round(_epoch(tokenizer, batches), 1)}
    arms["mix"] = {"rows": len(rows), "mean_sample_tokens": round(float(lengths.mean()), 1),
                   "packed_rows": len(packs), "mean_packed_tokens": round(float(pack_lengths.mean()), 1),
                   "max_seq_len": MAX_SEQ_LEN}
    arms["tokens_per_s_ratio"] = round(arms["packed"]["tokens_per_s"] / arms["grouped"]["tokens_per_s"], 3)
    return arms
