"""models.weights.meta_llama: the one Meta→HF Llama key map, both ways, and the rotary permute."""

from __future__ import annotations

import pytest
import torch

from models.weights.meta_llama import from_meta, hf_name, llama_shapes, meta_name, permute_rotary
from models.weights.stream import LazyTensors

KWARGS = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=24)


def test_permute_rotary_turns_interleaved_pairs_into_halves():
    w = torch.arange(2 * 8).float().view(8, 2)  # 2 heads of head_dim 4: rows (0 1 2 3) (4 5 6 7)
    assert permute_rotary(w, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


def test_the_table_covers_every_llama_weight_both_ways():
    assert hf_name("layers.3.attention.wq.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("layers.0.feed_forward.w1.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight" and meta_name("model.embed_tokens.weight") == "tok_embeddings.weight"
    for hf in llama_shapes(KWARGS):
        assert hf_name(meta_name(hf)) == hf
    with pytest.raises(KeyError):
        hf_name("layers.0.attention.wqkv.weight")


def test_from_meta_takes_each_weight_once_by_its_meta_name_and_permutes_q_and_k():
    shapes = {meta_name(k): s for k, s in llama_shapes(KWARGS).items()}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    taken = []

    def take(key, shape):
        taken.append(key)
        assert tuple(state[key].shape) == shape
        return state[key]

    plain = from_meta(take, KWARGS, interleaved_rotary=False)
    assert sorted(taken) == sorted(state) and len(plain) == len(state)
    rotated = from_meta(take, KWARGS, interleaved_rotary=True)
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(rotated[q], permute_rotary(state["layers.1.attention.wq.weight"], 4))
    assert torch.equal(rotated[k], permute_rotary(state["layers.1.attention.wk.weight"], 2))
    assert torch.equal(rotated["model.layers.1.self_attn.v_proj.weight"], state["layers.1.attention.wv.weight"])
    recipes = LazyTensors.from_state(state).recipes()
    lazy = from_meta(lambda key, shape: recipes[key], KWARGS, interleaved_rotary=True)
    assert torch.equal(lazy[q].materialise(), rotated[q])
