"""Length-grouped, seeded batch plans and the collate function of training.

The plan decides, before training starts, which sample every rank sees at every step, so a
restarted run can skip exactly what was consumed and see the same order again:

    >>> plan = plan_batches([5, 9, 7, 30, 31, 8, 6, 29], micro_batch=2, grad_accum=1, world_size=2,
    ...                     steps=3, seed=0)
    >>> plan.shape                      # [steps, world_size, grad_accum, micro_batch] row indices
    (3, 2, 1, 2)

SPHINX groups samples of similar length: each epoch is a seeded permutation, cut into windows
of ``GROUP_WINDOW`` global batches; inside a window the rows are sorted by length and cut into
micro-batches, whose order is then shuffled. The window is one global batch, as LLaVA's
"megabatch": a wider one makes whole steps homogeneous (all panoramas, all text-only — in a
small mixed set, all one task), and the demo model learned visibly worse with it. A batch is padded to its own longest row, not to
``max_seq_len``. The rows an epoch cannot fill a global batch with (``n % global_batch``) wait
for the next epoch (the permutation changes, so no row is left out for good).

**Packing** (``train.packing``, on by default): ``pack_rows`` first packs the samples into
training rows of at most ``max_seq_len`` tokens (best-fit decreasing, seeded ties), once per
run; the plan then groups and shuffles those packed rows exactly as it does single samples
(a single sample is a pack of one: one code path). A packed row is its samples'
concatenation (``actors.train.data.ReadPlannedRows``) with ``seq_lens``; ``collate`` restarts
the position ids at every sample and masks each sample's first label, and the model confines
attention to each sample (``models.sphinx``). The loss and the cross-rank token weighting are
unchanged: the same supervised tokens, the same per-token cross entropy.

    >>> pack_rows([5, 9, 7, 3], capacity=12, seed=0)
    [array([0, 2]), array([1, 3])]          # 5+7, 9+3: two rows instead of four

``collate`` turns one micro-batch of shard rows (docs/interfaces.md columns) into the model's
inputs. Before (numpy batch of 2 rows, the first with one image of 3 views, G = 2)::

    input_ids [array([1, 9, 9, ..., 2]), array([1, 4, 2])]    labels likewise
    views [b"<3·S·S·3 bytes>", b""]   view_counts [array([3]), array([])]
    kept [array([T, F, T, F]), array([])]

After::

    input_ids long [2, T] (pad_token_id on the right)   attention_mask long [2, T]
    position_ids long [2, T] (only with a ``seq_lens`` column: packed rows)
    labels long [2, T] (-100 on padding)                 views uint8 [3, S, S, 3]
    kept bool [1, 4]      num_tokens / image_tokens / saved_tokens: long scalars (sums)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from models.errors import UserError

IGNORE_INDEX = -100
GROUP_WINDOW = 1  # global batches per length-grouping window (LLaVA: one "megabatch")


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return num_rows // global_batch


def total_steps(num_rows: int, global_batch: int, *, steps: int | None, epochs: int | None,
                rows: str = "rows") -> int:
    """``steps`` when given, else ``epochs`` full passes; raises UserError when no step fits
    (``rows`` names what is counted, e.g. "packed rows")."""
    per_epoch = steps_per_epoch(num_rows, global_batch)
    if per_epoch == 0:
        raise UserError(f"the shards hold {num_rows} {rows}, fewer than one global batch ({global_batch} = "
                        "micro_batch × grad_accum × workers); add data or lower the batch")
    return steps if steps is not None else per_epoch * int(epochs)


def plan_batches(lengths: Sequence[int], *, micro_batch: int, grad_accum: int, world_size: int,
                 steps: int, seed: int) -> np.ndarray:
    """Row indices ``[steps, world_size, grad_accum, micro_batch]`` (int64), seeded and length grouped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    global_batch = micro_batch * grad_accum * world_size
    per_epoch = steps_per_epoch(len(lengths), global_batch)
    if per_epoch == 0:
        raise UserError(f"{len(lengths)} rows cannot fill one global batch of {global_batch}")
    epochs = -(-steps // per_epoch)
    out = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(lengths))[: per_epoch * global_batch]
        micro: list[np.ndarray] = []
        window = GROUP_WINDOW * global_batch
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches = chunk.reshape(-1, micro_batch)
            micro.extend(batches[rng.permutation(len(batches))])
        out.append(np.stack(micro).reshape(per_epoch, world_size, grad_accum, micro_batch))
    return np.concatenate(out)[:steps]


def pack_rows(lengths: Sequence[int], *, capacity: int, seed: int) -> list[np.ndarray]:
    """Sample indices per packed row (each row's total ≤ ``capacity``; a longer sample alone).

    Best-fit decreasing: the samples, longest first (seeded order among equal lengths), each go
    into the open row with the least room that still fits them, else a new row. Rows come back
    in a seeded random order, each row's samples in a seeded random order.
    """
    import bisect

    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity < 1:
        raise UserError(f"packing capacity (data.max_seq_len) must be ≥ 1, got {capacity}")
    rng = np.random.default_rng([seed, 7919])
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row) of the rows that can still take one
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
            rows[r].append(i)
            free -= n
        else:
            r, free = len(rows), capacity - n
            rows.append([i])
        if free > 0:
            bisect.insort(room, (free, r))
    out = [np.asarray(rows[r], dtype=np.int64) for r in rng.permutation(len(rows))]
    return [row[rng.permutation(len(row))] for row in out]


def padding_share(lengths: Sequence[int], plan: np.ndarray) -> float:
    """The share of padding among the tokens the plan's micro-batches hold (each padded to its
    own longest row): ``1 - real / Σ micro-batch rows × longest``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    batches = lengths[plan.reshape(-1, plan.shape[-1])]
    held = int((batches.max(axis=1) * batches.shape[1]).sum())
    return 1.0 - int(batches.sum()) / held if held else 0.0


def _ragged(column: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in column]


def collate(batch: dict[str, Any], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch of shard rows (numpy columns) → padded model inputs (see module docstring)."""
    ids = _ragged(batch["input_ids"])
    labels = _ragged(batch["labels"])
    if not ids:
        raise ValueError("empty micro-batch")
    width = max(len(x) for x in ids)
    b = len(ids)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    label_t = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise UserError(f"row {batch['id'][i]!r}: {len(x)} input_ids but {len(y)} labels")
        input_ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        attention_mask[i, : len(x)] = 1
        label_t[i, : len(y)] = torch.from_numpy(y.astype(np.int64))

    views, kept = [], []
    for i in range(b):
        counts = np.asarray(batch["view_counts"][i], dtype=np.int64)
        if counts.size == 0:
            continue
        s, g = int(batch["tile_size"][i]), int(batch["grid"][i])
        raw = np.frombuffer(batch["views"][i], dtype=np.uint8)
        n_views = int(counts.sum())
        if raw.size != n_views * s * s * 3:
            raise UserError(f"row {batch['id'][i]!r}: views hold {raw.size} bytes, expected "
                            f"{n_views}×{s}×{s}×3 for view_counts {counts.tolist()}")
        views.append(raw.reshape(n_views, s, s, 3))
        mask = np.asarray(batch["kept"][i], dtype=bool)
        kept.append(mask.reshape(len(counts), g * g))
    position_ids = None
    if "seq_lens" in batch:  # packed rows: positions restart per sample, padding is one more run
        position_ids = torch.zeros((b, width), dtype=torch.long)
        for i, x in enumerate(ids):
            lens = [int(n) for n in np.asarray(batch["seq_lens"][i]).tolist()]
            if sum(lens) != len(x):
                raise UserError(f"row {batch['id'][i]!r}: seq_lens {lens} sum to {sum(lens)}, not its "
                                f"{len(x)} input_ids")
            runs = lens + ([width - len(x)] if width > len(x) else [])
            position_ids[i] = torch.cat([torch.arange(n) for n in runs])
            starts = np.cumsum([0] + lens[:-1])
            label_t[i, torch.as_tensor(starts, dtype=torch.long)] = IGNORE_INDEX  # never a target across samples
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_t,
        "num_tokens": torch.tensor(int(attention_mask.sum())),
        "image_tokens": torch.tensor(int(np.sum(batch["image_tokens"]))),
        "saved_tokens": torch.tensor(int(np.sum(batch["saved_tokens"]))),
    }
    if position_ids is not None:
        out["position_ids"] = position_ids
    if "_pos" in batch:
        out["pos"] = torch.as_tensor(np.asarray(batch["_pos"], dtype=np.int64))
    if views:
        out["views"] = torch.from_numpy(np.concatenate(views))
        out["kept"] = torch.from_numpy(np.concatenate(kept))
    return out


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor | None]:
    """The SphinxX.forward keyword arguments of a collated batch, moved to ``device``."""
    keys = ("input_ids", "attention_mask", "labels", "views", "kept", "position_ids")
    return {k: (batch[k].to(device) if k in batch else None) for k in keys}
