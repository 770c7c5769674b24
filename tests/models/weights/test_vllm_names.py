"""models.weights.vllm_names: HF Mixtral's fused experts renamed for vLLM's Mixtral (no vLLM needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from models.weights.vllm_names import mixtral_to_vllm


def test_mixtral_experts_split_per_expert_compute_the_same():
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, vocab_size=64, num_local_experts=4)
    hf = MixtralForCausalLM(config)
    renamed = dict(kv for name, t in hf.state_dict().items() for kv in mixtral_to_vllm(name, t))
    for layer in range(2):
        base = f"model.layers.{layer}.block_sparse_moe"
        assert torch.equal(renamed[f"{base}.gate.weight"], hf.model.layers[layer].mlp.gate.weight)
        experts = hf.model.layers[layer].mlp.experts
        x = torch.randn(5, 32)
        for e in range(4):
            gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            theirs = F.linear(F.silu(gate) * up, experts.down_proj[e])
            w1, w2, w3 = (renamed[f"{base}.experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3"))
            ours = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
            assert torch.allclose(ours, theirs, atol=1e-6)
    assert not any(".mlp." in name for name in renamed)
    assert torch.equal(renamed["model.layers.0.self_attn.q_proj.weight"], hf.model.layers[0].self_attn.q_proj.weight)
    assert len(renamed) == len(hf.state_dict()) - 2 * 2 + 2 * 4 * 3  # per layer: 2 fused tensors -> 4 experts x 3
