"""The streamed model-directory writer: each part equals transformers' save_pretrained, tensor
for tensor and config for config, while holding one block and one shard at a time."""

import json
import weakref

import pytest
import torch
from safetensors import safe_open
from transformers.core_model_loading import revert_weight_conversion

from models.weights.model_dir import (CheckpointError, ModelDirWriter, block_of, load_model_dir, safetensors_files,
                                      skeleton)
from models.conversation import train_bpe_tokenizer
from models.flavours import FLAVOURS, from_name
from models.sphinx import SphinxX


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["a small red square", "three blue circles"] * 10, vocab_size=300)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in safetensors_files(directory):
        with safe_open(str(f), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _config(path) -> dict:
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize("name", ["debug", "debug-moe"])
def test_each_part_is_what_save_pretrained_writes(tokenizer, tmp_path, name):
    torch.manual_seed(0)
    model = SphinxX.from_flavour(from_name(name), tokenizer)
    writer = ModelDirWriter(tmp_path / "m", skeleton(model.flavour, model.token_ids()), tokenizer,
                            dtype=torch.bfloat16, max_shard_bytes=60_000)
    for key, tensor in model.state_dict().items():
        writer.add(key, tensor)
    writer.close()
    for part, module in (("llm", model.llm), ("convnext", model.vision.convnext), ("dinov2", model.vision.dino)):
        module.save_pretrained(str(tmp_path / "hf" / part), state_dict={
            k: v.to(torch.bfloat16) for k, v in module.state_dict().items()}, max_shard_size=60_000)
        ours, theirs = _tensors(tmp_path / "m" / part), _tensors(tmp_path / "hf" / part)
        assert sorted(ours) == sorted(theirs), part  # Mixtral per-expert, DINOv2 weights_in names
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
        assert len(safetensors_files(tmp_path / "m" / part)) > 1  # sharded, with an index
        hf_config = _config(tmp_path / "hf" / part / "config.json")
        hf_config["dtype"] = "bfloat16"  # save_pretrained records the module's float32
        assert _config(tmp_path / "m" / part / "config.json") == hf_config
    loaded, _ = load_model_dir(tmp_path / "m")
    want = model.state_dict()
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in loaded.state_dict().items()
               if v.is_floating_point() and k in dict(loaded.named_parameters()))


@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_block_by_block_reversal_equals_the_whole_dicts(name):
    """On every flavour (meta tensors: shapes only), transformers' reverse conversion applied per
    block gives the names and shapes it gives the whole state dict: no conversion spans blocks."""
    flavour = from_name(name)
    with torch.device("meta"):  # the real flavours are billions of parameters: no memory at all
        model = skeleton(flavour, {"vocab_size": flavour.llm["vocab_size"], "image_token_id": 3,
                                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    for module in (model.llm, model.vision.convnext, model.vision.dino):
        state = module.state_dict()
        blocks: dict[str, dict] = {}
        for key, tensor in state.items():
            blocks.setdefault(block_of(key), {})[key] = tensor
        per_block = {k: tuple(v.shape) for block in blocks.values()
                     for k, v in revert_weight_conversion(module, block).items()}
        assert per_block == {k: tuple(v.shape) for k, v in revert_weight_conversion(module, dict(state)).items()}


def test_holds_one_block_and_one_shard(tokenizer, tmp_path):
    """Fed in model order, the writer keeps a tensor only until its shard is written."""
    torch.manual_seed(0)
    model = SphinxX.from_flavour(from_name("debug-moe"), tokenizer)
    limit = 40_000
    writer = ModelDirWriter(tmp_path / "m", skeleton(model.flavour, model.token_ids()), tokenizer,
                            dtype=torch.float32, max_shard_bytes=limit)
    alive: list = []
    peak = 0
    state = model.state_dict()
    blocks: dict[str, int] = {}
    for k, v in state.items():
        blocks[k[:4] + block_of(k[4:])] = blocks.get(k[:4] + block_of(k[4:]), 0) + v.numel() * 4
    largest_block = max(blocks.values())
    for key, tensor in state.items():
        copy = tensor.clone()  # what a gather hands over: the writer's to keep or drop
        alive.append(weakref.ref(copy))
        writer.add(key, copy)
        del copy
        peak = max(peak, sum(r().numel() * 4 for r in alive if r() is not None))
    writer.close()
    assert peak <= limit + largest_block, (peak, limit, largest_block)
    assert len(safetensors_files(tmp_path / "m" / "llm")) > 3


def test_unknown_twice_and_missing_keys_are_named(tokenizer, tmp_path):
    model = SphinxX.from_flavour(from_name("debug"), tokenizer)
    state = model.state_dict()
    writer = ModelDirWriter(tmp_path / "m", skeleton(model.flavour, model.token_ids()), tokenizer, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="llm/model.nope.weight: the model has no such key"):
        writer.add("llm.model.nope.weight", torch.zeros(1))
    writer.add("llm.model.norm.weight", state["llm.model.norm.weight"])
    with pytest.raises(CheckpointError, match="given twice"):
        writer.add("llm.model.norm.weight", state["llm.model.norm.weight"])
    with pytest.raises(CheckpointError, match="vision.nope: the model has no such key"):
        writer.add("vision.nope", torch.zeros(1))
    with pytest.raises(CheckpointError, match=r"llm: no tensor given for \d+ key\(s\): lm_head.weight"):
        writer.close()
