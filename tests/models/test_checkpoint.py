"""Model directories round-trip exactly; pretrained LLM / encoder weights import strictly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from models.checkpoint import (CheckpointError, import_encoder_weights, import_llm_weights, import_weights_dir,
                               load_model_dir, save_model_dir)
from models.conversation import train_bpe_tokenizer
from models.flavours import from_name
from models.sphinx import SphinxX



@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["a small red square", "three blue circles", "the word apple"] * 10, vocab_size=300)


def _model(tokenizer, name="debug", **overrides):
    torch.manual_seed(0)
    return SphinxX.from_flavour(from_name(name, **overrides), tokenizer).eval()


def _inputs(model):
    n = model.flavour.tokens_per_view
    kept = torch.tensor([[True, True, False, False]])
    ids = torch.tensor([[1] + [model.image_token_id] * (3 * (n + 2) + 2) + [10, 11, 12]])
    views = torch.randint(0, 256, (3, model.flavour.tile_size, model.flavour.tile_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, views=views, kept=kept)


def test_save_load_bit_identical(tokenizer, tmp_path):
    model = _model(tokenizer, grid=2, llm={"num_hidden_layers": 1}, freeze_vision=False)
    save_model_dir(model, tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["flavour"]["llm"]["num_hidden_layers"] == 1 and config["flavour"]["freeze_vision"] is False
    assert config["token_ids"]["image_token_id"] == model.image_token_id
    loaded, tok = load_model_dir(tmp_path / "m")
    assert loaded.flavour == model.flavour and tok.encode("red square") == tokenizer.encode("red square")
    with torch.no_grad():
        assert torch.equal(model(**_inputs(model)).logits, loaded(**_inputs(model)).logits)
    half, _ = load_model_dir(tmp_path / "m", dtype=torch.bfloat16)
    assert half.llm.lm_head.weight.dtype == torch.bfloat16


def test_forced_sharding(tokenizer, tmp_path):
    model = _model(tokenizer, "debug-moe")
    save_model_dir(model, tokenizer, tmp_path / "m", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "m" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded, _ = load_model_dir(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(**_inputs(model)).logits, loaded(**_inputs(model)).logits)
    (tmp_path / "m" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model_dir(tmp_path / "m")


def test_bad_model_dirs(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model_dir(tmp_path)
    model = _model(tokenizer)
    save_model_dir(model, tokenizer, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state.pop("vision.skip")
    state["vision.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): vision.skip; unexpected keys \(1\): vision.extra"):
        load_model_dir(tmp_path / "m")


def _hf_llm(model, **changes):
    cfg = model.llm.config.to_dict()
    cfg.update(changes)
    torch.manual_seed(42)
    if model.is_moe:
        return MixtralForCausalLM(MixtralConfig(**cfg))
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.mark.parametrize("name", ["debug", "debug-moe"])
def test_import_hf_llm_dir(tokenizer, tmp_path, name):
    model = _model(tokenizer, name)
    hf = _hf_llm(model)
    hf.save_pretrained(tmp_path / "hf")
    import_llm_weights(model, tmp_path / "hf")
    theirs = hf.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.llm.state_dict().items())


def test_import_hf_llm_with_smaller_vocab_keeps_extra_rows(tokenizer, tmp_path):
    model = _model(tokenizer)
    extra = model.llm.lm_head.weight[-2:].detach().clone()
    hf = _hf_llm(model, vocab_size=model.vocab_size - 2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    import_llm_weights(model, tmp_path / "hf")
    assert torch.equal(model.llm.lm_head.weight[:-2], hf.lm_head.weight)
    assert torch.equal(model.llm.lm_head.weight[-2:], extra)


def test_import_hf_llm_mismatch_lists_keys(tokenizer, tmp_path):
    model = _model(tokenizer)
    _hf_llm(model, num_hidden_layers=1).save_pretrained(tmp_path / "short")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): model\.layers\.1\."):
        import_llm_weights(model, tmp_path / "short")
    _hf_llm(model, hidden_size=64, intermediate_size=100).save_pretrained(tmp_path / "narrow")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        import_llm_weights(model, tmp_path / "narrow")
    with pytest.raises(CheckpointError, match="no config.json"):
        import_llm_weights(model, tmp_path)


def test_import_encoders(tokenizer, tmp_path):
    model, donor = _model(tokenizer), _model(tokenizer)
    torch.nn.init.normal_(donor.vision.dino.embeddings.cls_token)
    save_file({f"convnext.{k}": v.contiguous() for k, v in donor.vision.convnext.state_dict().items()},
              str(tmp_path / "convnext.safetensors"))
    torch.save(donor.vision.dino.state_dict(), tmp_path / "dinov2.bin")
    assert import_weights_dir(model, tmp_path) == ["convnext", "dino"]
    assert torch.equal(model.vision.dino.embeddings.cls_token, donor.vision.dino.embeddings.cls_token)
    broken = {k: v for k, v in donor.vision.dino.state_dict().items() if "layer.1." not in k}
    broken["head.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys .*encoder\.layer\.1\..*unexpected keys \(1\): head.weight"):
        import_encoder_weights(model, "dino", tmp_path / "bad.safetensors")
