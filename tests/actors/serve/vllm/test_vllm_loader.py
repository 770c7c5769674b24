"""Weights for the vLLM model: the model directory as a stream of SphinxX names, and HF Mixtral's
fused experts renamed for vLLM's Mixtral (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from actors.serve.vllm.loader import iter_model_weights, mixtral_to_vllm
from models.weights.model_dir import CheckpointError
from models.weights.model_dir_writer import save_model_dir
from models.conversation import train_bpe_tokenizer
from models.flavours import from_name
from models.sphinx import SphinxX


@pytest.fixture(scope="module", params=["debug", "debug-moe"])
def model(request):
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(["a red square and a blue circle"] * 10, vocab_size=300)
    return SphinxX.from_flavour(from_name(request.param), tok), tok


def _vllm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm.* through mixtral_to_vllm (HF's in-memory fused experts and its on-disk per-expert ones
    meet in vLLM's names); the rest unchanged."""
    out = {}
    for name, t in state.items():
        if name.startswith("llm."):
            out.update({"llm." + k: v for k, v in mixtral_to_vllm(name[4:], t)})
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("shard_bytes", [5 * 10**9, 200_000])
def test_stream_is_the_state_dict(model, shard_bytes, tmp_path):
    sphinx, tok = model
    directory = save_model_dir(sphinx, tok, tmp_path, max_shard_bytes=shard_bytes)
    assert (len(list((directory / "llm").glob("model-*.safetensors"))) > 1) == (shard_bytes < 10**6)
    streamed = _vllm_names(dict(iter_model_weights(directory)))
    state = _vllm_names(sphinx.state_dict())
    assert sorted(streamed) == sorted(state)
    assert all(torch.equal(streamed[k], state[k]) for k in state)


def test_missing_weights_are_named(model, tmp_path):
    sphinx, tok = model
    with pytest.raises(CheckpointError, match="no config.json"):
        list(iter_model_weights(tmp_path))
    directory = save_model_dir(sphinx, tok, tmp_path / "m", max_shard_bytes=200_000)
    shard = sorted((directory / "llm").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names {shard.name}, which is missing"):
        list(iter_model_weights(directory))


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
