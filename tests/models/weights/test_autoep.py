"""models.weights.autoep: an AutoEP layer's gathered experts under HF Mixtral's names (no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from models.weights.autoep import AUTOEP_KEYS, plain_moe


def test_gate_and_up_fuse_gate_first_and_names_are_mixtrals():
    e, f, d = 3, 4, 2
    got = {"router.gate.weight": torch.randn(e, d), "experts.w1": torch.randn(e, f, d),
           "experts.w2": torch.randn(e, d, f), "experts.w3": torch.randn(e, f, d)}
    assert set(AUTOEP_KEYS) == set(got)
    out = dict(plain_moe("llm.model.layers.0.mlp", got))
    assert sorted(out) == ["llm.model.layers.0.mlp.experts.down_proj", "llm.model.layers.0.mlp.experts.gate_up_proj",
                           "llm.model.layers.0.mlp.gate.weight"]
    fused = out["llm.model.layers.0.mlp.experts.gate_up_proj"]
    assert fused.shape == (e, 2 * f, d) and torch.equal(fused[:, :f], got["experts.w1"])
    assert torch.equal(fused[:, f:], got["experts.w3"])
    assert dict(plain_moe("p", {k: None for k in got}, keep=False))["p.experts.gate_up_proj"] is None
    with pytest.raises(RuntimeError, match="does not map: \\['experts.bias'\\]"):
        list(plain_moe("p", {**got, "experts.bias": torch.zeros(1)}))
