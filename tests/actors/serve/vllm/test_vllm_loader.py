"""Weights for the vLLM model: the model directory as a stream of SphinxX names
(models.weights.model_dir.stream_weights, what actors.serve.vllm.loader feeds vLLM), in vLLM's
Mixtral names (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from models.weights.model_dir import CheckpointError, save_model_dir, stream_weights
from models.weights.vllm_names import mixtral_to_vllm
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
    streamed = _vllm_names(dict(stream_weights(directory)))
    state = _vllm_names(sphinx.state_dict())
    assert sorted(streamed) == sorted(state)
    assert all(torch.equal(streamed[k], state[k]) for k in state)


def test_missing_weights_are_named(model, tmp_path):
    sphinx, tok = model
    with pytest.raises(CheckpointError, match="no config.json"):
        list(stream_weights(tmp_path))
    directory = save_model_dir(sphinx, tok, tmp_path / "m", max_shard_bytes=200_000)
    shard = sorted((directory / "llm").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names {shard.name}, which is missing"):
        list(stream_weights(directory))
