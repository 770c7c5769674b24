"""The model directory: standard parts (llm/ loads in transformers unchanged), exact round trips,
the stored dtype, sharding; every mismatch names the file and the key."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.weights.model_dir import (CheckpointError, inspect_model_dir, load_model_dir, part_files, save_model_dir,
                                      skeleton)
from models.conversation import IMAGE, train_bpe_tokenizer
from models.flavours import from_name
from models.sphinx import SphinxX


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["a small red square", "three blue circles", "the word apple"] * 10, vocab_size=300)


def _model(tokenizer, name="debug", seed=0, **overrides):
    torch.manual_seed(seed)
    model = SphinxX.from_flavour(from_name(name, **overrides), tokenizer).eval()
    with torch.no_grad():  # start/end/skip and the projector away from their init, so a swap would show
        for p in model.vision.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _inputs(model):
    n = model.flavour.tokens_per_view
    kept = torch.tensor([[True, True, False, False]])
    ids = torch.tensor([[1] + [model.image_token_id] * (3 * (n + 2) + 2) + [10, 11, 12]])
    views = torch.randint(0, 256, (3, model.flavour.tile_size, model.flavour.tile_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, views=views, kept=kept)


def _dtypes(files) -> set:
    out = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    return out


def test_layout_and_exact_round_trip(tokenizer, tmp_path):
    model = _model(tokenizer, grid=2, llm={"num_hidden_layers": 1}, freeze_vision=False)
    save_model_dir(model, tokenizer, tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "convnext", "dinov2", "llm", "mm_projector.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["flavour"]["llm"]["num_hidden_layers"] == 1 and config["flavour"]["freeze_vision"] is False
    assert config["token_ids"]["image_token_id"] == model.image_token_id and config["dtype"] == "float32"
    assert config["geometry"] == {"grid": 2, "tile_size": 48, "canvas": 96, "mean_u8": [123, 117, 104],
                                  "pad": "top_left", "skip_tokens": True, "tokens_per_view": 17,
                                  "max_image_tokens": 5 * 19}
    assert config["parts"]["llm"]["model_type"] == "llama" and config["parts"]["dinov2"]["class"] == "Dinov2Model"
    assert set(load_file(str(tmp_path / "m" / "mm_projector.safetensors"))) == {
        "projector.0.weight", "projector.0.bias", "projector.1.weight", "projector.1.bias", "start", "end", "skip"}
    loaded, tok = load_model_dir(tmp_path / "m")
    assert loaded.flavour == model.flavour and tok.encode("red square") == tokenizer.encode("red square")
    theirs = loaded.state_dict()
    assert set(theirs) == set(model.state_dict())
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert loaded.vision.convnext.training is False and next(loaded.vision.dino.parameters()).requires_grad
    with torch.no_grad():
        assert torch.equal(model(**_inputs(model)).logits, loaded(**_inputs(model)).logits)
    half, _ = load_model_dir(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # buffers keep full precision: rotary frequencies, the pixel statistics (122.77 is 122.5 in bf16)
    assert {b.dtype for b in half.buffers()} == {torch.float32}


@pytest.mark.parametrize("name", ["debug", "debug-moe"])
def test_exported_llm_gives_the_same_logits_in_transformers(tokenizer, tmp_path, name):
    model = _model(tokenizer, name)
    save_model_dir(model, tokenizer, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "llm"), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m" / "llm"), local_files_only=True)
    assert type(hf).__name__ == ("MixtralForCausalLM" if model.is_moe else "LlamaForCausalLM")
    assert len(tok) == len(tokenizer) and tok.convert_tokens_to_ids(IMAGE) == model.image_token_id
    ids = torch.tensor([tok.encode("three blue circles and a small red square")])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], model.vocab_size)
    assert (ours - theirs).abs().max() < 1e-5


def test_bf16_writes_bf16_and_shards_with_an_index(tokenizer, tmp_path):
    model = _model(tokenizer, "debug-moe")
    save_model_dir(model, tokenizer, tmp_path / "m", dtype=torch.bfloat16, max_shard_bytes=200_000)
    files = part_files(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "llm" / "model.safetensors.index.json").read_text())
    assert len(files["llm"]) > 3 and not (tmp_path / "m" / "llm" / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files["llm"]]
    # HF shards before splitting fused tensors: a fused expert tensor (> the limit) fills a shard
    assert {d for fs in files.values() for d in _dtypes(fs)} == {"BF16"}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "m" / "llm" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    loaded, _ = load_model_dir(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    theirs = loaded.state_dict()
    assert all(torch.equal(v.to(torch.bfloat16), theirs[k]) for k, v in model.state_dict().items())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "llm"), local_files_only=True)
    assert hf.lm_head.weight.dtype == torch.bfloat16  # dtype "auto" from llm/config.json
    report = inspect_model_dir(tmp_path / "m")
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["parts"]["llm"]["params"] == sum(p.numel() for p in model.llm.parameters())
    assert report["parts"]["llm"]["dtypes"] == ["bfloat16"] and report["tokenizer"]["size"] == len(tokenizer)
    dense = _model(tokenizer)
    save_model_dir(dense, tokenizer, tmp_path / "d", max_shard_bytes=100_000)
    shards = part_files(tmp_path / "d")["llm"]
    assert len(shards) > 3 and all(f.stat().st_size <= 100_000 + 4096 or len(load_file(str(f))) == 1 for f in shards)
    (files["llm"][1]).unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json names model-00002-of-\d+.safetensors"):
        load_model_dir(tmp_path / "m")


def test_skeleton_holds_no_parameter_memory():
    ids = dict(vocab_size=300, image_token_id=4, pad_token_id=3, bos_token_id=0, eos_token_id=1)
    model = skeleton(from_name("moe"), ids)  # 47 B parameters, on meta
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.llm.parameters()) > 46e9
    assert not model.vision.mean_u8.is_meta  # buffers are real


def test_mismatches_name_the_file_and_the_key(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model_dir(tmp_path)
    model = _model(tokenizer)
    save_model_dir(model, tokenizer, tmp_path / "m")
    good = load_file(str(tmp_path / "m" / "mm_projector.safetensors"))
    state = dict(good)
    state.pop("skip")
    state["extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "m" / "mm_projector.safetensors"))
    for read in (load_model_dir, inspect_model_dir):
        with pytest.raises(CheckpointError, match=r"mm_projector.safetensors does not match the model: "
                                                  r"missing keys \(1\): skip; unexpected keys \(1\): extra"):
            read(tmp_path / "m")
    save_file(good, str(tmp_path / "m" / "mm_projector.safetensors"))

    llm_file = tmp_path / "m" / "llm" / "model.safetensors"
    state = load_file(str(llm_file))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(llm_file), metadata={"format": "pt"})
    for read in (load_model_dir, inspect_model_dir):
        with pytest.raises(CheckpointError, match=r"llm/model.safetensors does not match the model: "
                                                  r"missing keys \(1\): model.layers.1.mlp.up_proj.weight"):
            read(tmp_path / "m")

    save_model_dir(model, tokenizer, tmp_path / "m")  # rewriting replaces every part
    conv = tmp_path / "m" / "convnext" / "model.safetensors"
    state = load_file(str(conv))
    state["embeddings.layernorm.weight"] = torch.ones(7)
    save_file(state, str(conv), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"convnext.*embeddings.layernorm.weight"):
        load_model_dir(tmp_path / "m")

    save_model_dir(model, tokenizer, tmp_path / "m", dtype=torch.bfloat16)
    state = {k: v.float() for k, v in load_file(str(tmp_path / "m" / "mm_projector.safetensors")).items()}
    save_file(state, str(tmp_path / "m" / "mm_projector.safetensors"))
    with pytest.raises(CheckpointError, match=r"mm_projector.safetensors: tensors in float32, config.json says bfloat16"):
        inspect_model_dir(tmp_path / "m")

    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["geometry"]["skip_tokens"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: geometry.skip_tokens is False but the flavour gives True"):
        load_model_dir(tmp_path / "m")
    config["format_version"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"format_version 1; this code reads 2"):
        load_model_dir(tmp_path / "m")

    save_model_dir(model, tokenizer, tmp_path / "m")
    llm_config = tmp_path / "m" / "llm" / "config.json"
    config = json.loads(llm_config.read_text())
    config["rms_norm_eps"] = 1e-3
    llm_config.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"llm/config.json: rms_norm_eps is 0.001 but flavour 'debug' has 1e-05"):
        load_model_dir(tmp_path / "m")


@pytest.mark.parametrize("name", ["debug-sphinx", "debug-sphinx-moe-1k"])
def test_four_branch_round_trip(tokenizer, tmp_path, name):
    """CLIP and the Q-Former's two towers are Hugging Face parts of their own; its query tokens and
    projection go with the projector. Saved, inspected, loaded and streamed: the same logits."""
    from models.weights.model_dir import read_weights
    from models.weights.stream import stream

    model = _model(tokenizer, name)
    save_model_dir(model, tokenizer, tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["blip2_vision", "clip", "config.json", "convnext", "dinov2", "llm", "mm_projector.safetensors",
                     "qformer"]
    report = inspect_model_dir(tmp_path / "m")
    assert set(report["parts"]) == {"llm", "convnext", "dinov2", "clip", "blip2_vision", "qformer", "mm_projector"}
    assert "qformer.query_tokens" in load_file(str(tmp_path / "m" / "mm_projector.safetensors"))
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    loaded, _ = load_model_dir(tmp_path / "m")
    g = model.flavour.grid
    gg = g * g if g > 1 else 0
    kept = torch.ones(1, gg, dtype=torch.bool)
    n = (1 + gg) * (model.flavour.tokens_per_view + 2)
    views = torch.randint(0, 256, (1 + gg, model.flavour.tile_size, model.flavour.tile_size, 3), dtype=torch.uint8)
    ids = torch.tensor([[1] + [model.image_token_id] * n + [10, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids, views=views, kept=kept).logits, loaded(ids, views=views, kept=kept).logits)
    streamed = dict(stream(read_weights(tmp_path / "m").recipes()))
    assert set(streamed) == set(model.state_dict())
    assert all(torch.equal(streamed[k], v) for k, v in model.state_dict().items())
