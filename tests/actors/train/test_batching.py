import numpy as np
import pytest
import torch

from actors.train.batching import GROUP_WINDOW, collate, model_inputs, pack_rows, padding_share, plan_batches, total_steps
from models.errors import UserError


def test_plan_is_seeded_complete_per_epoch_and_length_grouped():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 500, size=200)
    plan = plan_batches(lengths, micro_batch=4, grad_accum=2, world_size=2, steps=12, seed=7)
    assert plan.shape == (12, 2, 2, 4)
    again = plan_batches(lengths, micro_batch=4, grad_accum=2, world_size=2, steps=12, seed=7)
    assert np.array_equal(plan, again)
    assert not np.array_equal(plan, plan_batches(lengths, micro_batch=4, grad_accum=2, world_size=2, steps=12, seed=8))
    # one epoch = 200 // 16 = 12 steps: every row at most once
    flat = plan.reshape(-1)
    assert len(set(flat.tolist())) == len(flat) == 192
    # grouping: rows in a micro-batch are far closer in length than random rows ...
    spread = np.mean([np.ptp(lengths[mb]) for mb in plan.reshape(-1, 4)])
    random_spread = np.mean([np.ptp(lengths[rng.choice(200, 4)]) for _ in range(200)])
    assert spread < random_spread / 2

def test_every_step_is_the_global_batch_plain_shuffling_would_give():
    """Grouping only reorders rows INSIDE a global batch (LLaVA's megabatch): the rows of a step
    are the same set as without grouping, so no step is all-short or all-long (one task)."""
    lengths = np.random.default_rng(3).integers(5, 500, size=64)
    plan = plan_batches(lengths, micro_batch=8, grad_accum=1, world_size=2, steps=4, seed=5)
    order = np.random.default_rng([5, 0]).permutation(64)  # epoch 0's seeded permutation
    for k in range(4):
        assert set(plan[k].reshape(-1).tolist()) == set(order[16 * k:16 * (k + 1)].tolist())


def test_plan_spans_epochs_with_new_orders():
    plan = plan_batches(np.arange(10), micro_batch=2, grad_accum=1, world_size=2, steps=5, seed=0)
    assert plan.shape == (5, 2, 1, 2)
    first, second = plan[:2].reshape(-1), plan[2:4].reshape(-1)  # 10 // 4 = 2 steps per epoch
    assert len(set(first)) == 8 and len(set(second)) == 8 and not np.array_equal(first, second)
    assert GROUP_WINDOW >= 1


def test_total_steps_and_too_little_data():
    assert total_steps(100, 8, steps=None, epochs=3) == 36
    assert total_steps(100, 8, steps=5, epochs=None) == 5
    with pytest.raises(UserError, match="fewer than one global batch"):
        total_steps(7, 8, steps=5, epochs=None)


def _row(rid, n, views=0, s=4, g=2, kept=None):
    kept = kept if kept is not None else ([True] * (g * g) if views else [])
    return {"id": rid, "input_ids": np.arange(1, n + 1, dtype=np.int32), "labels": np.full(n, 3, dtype=np.int32),
            "views": np.full((views, s, s, 3), 7, dtype=np.uint8).tobytes(),
            "view_counts": np.array([views] if views else [], dtype=np.int32),
            "kept": np.array(kept, dtype=bool), "tile_size": s, "grid": g,
            "image_tokens": 10 if views else 0, "saved_tokens": 2 if views else 0}


def _batch(rows):
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def test_collate_pads_to_batch_longest_and_concatenates_views():
    batch = _batch([_row("a", 5, views=3, kept=[True, False, True, False]), _row("b", 2), _row("c", 3, views=5)])
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].shape == (3, 5)  # the batch's longest, not max_seq_len
    assert out["input_ids"][1].tolist() == [1, 2, 0, 0, 0]
    assert out["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    assert out["labels"][1].tolist() == [3, 3, -100, -100, -100]
    assert out["views"].dtype == torch.uint8 and out["views"].shape == (8, 4, 4, 3)
    assert out["kept"].tolist() == [[True, False, True, False], [True, True, True, True]]
    assert int(out["image_tokens"]) == 20 and int(out["saved_tokens"]) == 4 and int(out["num_tokens"]) == 10
    inputs = model_inputs(out)
    assert set(inputs) == {"input_ids", "attention_mask", "labels", "views", "kept", "position_ids"}
    assert inputs["position_ids"] is None  # one sample per row: no seq_lens column


def test_collate_text_only_has_no_views_and_bad_rows_fail():
    out = collate(_batch([_row("a", 2), _row("b", 4)]), pad_token_id=9)
    assert "views" not in out and model_inputs(out)["views"] is None
    bad = _row("x", 3, views=2)
    bad["views"] = bad["views"][:-1]
    with pytest.raises(UserError, match="'x': views hold"):
        collate(_batch([bad]), pad_token_id=0)
    bad = _row("y", 3)
    bad["labels"] = bad["labels"][:2]
    with pytest.raises(UserError, match="'y': 3 input_ids but 2 labels"):
        collate(_batch([bad]), pad_token_id=0)


# ---------------------------------------------------------------- packing


def test_pack_rows_fills_rows_up_to_capacity_with_every_sample_once():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 300, 400), [900]])  # one sample longer than a row
    packs = pack_rows(lengths, capacity=512, seed=3)
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # each sample exactly once
    totals = np.array([lengths[p].sum() for p in packs])
    assert [p.tolist() for p in packs if lengths[p].sum() > 512] == [[400]]  # alone in its row
    assert totals[totals <= 512].mean() > 0.95 * 512  # nearly full rows
    again = pack_rows(lengths, capacity=512, seed=3)
    assert all((a == b).all() for a, b in zip(packs, again)) and len(packs) == len(again)
    assert [p.tolist() for p in pack_rows(lengths, capacity=512, seed=4)] != [p.tolist() for p in packs]
    with pytest.raises(UserError, match="max_seq_len"):
        pack_rows([3], capacity=0, seed=0)


def test_packed_plan_pads_far_less_than_length_grouping():
    """A mix like the demo's (short chat rows, long image rows): packing then grouping the rows."""
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(15, 60, 300), rng.integers(280, 700, 100)])
    kw = dict(micro_batch=2, grad_accum=1, world_size=2, seed=0)
    grouped = plan_batches(lengths, steps=len(lengths) // 4, **kw)
    packs = pack_rows(lengths, capacity=1024, seed=0)
    rows = np.array([lengths[p].sum() for p in packs])
    packed = plan_batches(rows, steps=len(rows) // 4, **kw)
    assert padding_share(rows, packed) < 0.05
    assert padding_share(lengths, grouped) > padding_share(rows, packed)


def test_collate_packed_rows_restart_positions_and_mask_each_first_label():
    a, b, c = _row("a", 3, views=3), _row("b", 2), _row("c", 4)
    packed = {**a, "id": "a+b", "input_ids": np.concatenate([a["input_ids"], b["input_ids"]]),
              "labels": np.concatenate([a["labels"], b["labels"]]), "seq_lens": np.array([3, 2])}
    out = collate(_batch([packed, {**c, "seq_lens": np.array([4])}]), pad_token_id=0)
    assert out["input_ids"].shape == (2, 5)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding: its own run
    assert out["labels"].tolist() == [[-100, 3, 3, -100, 3], [-100, 3, 3, 3, -100]]
    assert int(out["num_tokens"]) == 9 and out["views"].shape == (3, 4, 4, 3)
    bad = {**packed, "seq_lens": np.array([3, 3])}
    with pytest.raises(UserError, match="'a\\+b': seq_lens \\[3, 3\\] sum to 6, not its 5 input_ids"):
        collate(_batch([bad]), pad_token_id=0)
