"""The family's shapes against the published shapes (docs/architecture.md "The model") (meta device: no memory, fast)."""

import pytest
import torch
from transformers import ConvNextConfig, ConvNextModel, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, \
    MixtralConfig, MixtralForCausalLM

from models.flavours import FLAVOURS, Flavour, from_name


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _llm_params(f: Flavour) -> int:
    with torch.device("meta"):
        if f.is_moe:
            return _count(MixtralForCausalLM(MixtralConfig(**f.llm)))
        return _count(LlamaForCausalLM(LlamaConfig(**f.llm)))


@pytest.mark.parametrize("name,billions", [("tiny", 1.100), ("intern2", 7.738), ("plus", 13.016),
                                           ("plus-3x3", 13.016), ("moe", 46.703)])
def test_llm_params_match_design_table(name, billions):
    assert _llm_params(FLAVOURS[name]) / 1e9 == pytest.approx(billions, rel=0.01)


def test_vision_encoders_are_convnext_xxl_and_dinov2_g():
    f = FLAVOURS["plus"]
    with torch.device("meta"):
        conv = _count(ConvNextModel(ConvNextConfig(**f.convnext)))
        dino = _count(Dinov2Model(Dinov2Config(**f.dino)))
    assert conv / 1e9 == pytest.approx(0.84, rel=0.02)
    assert dino / 1e9 == pytest.approx(1.14, rel=0.02)


def test_token_grid_and_grids():
    assert all(f.tokens_per_view == (289 if f.qformer else 257) for n, f in FLAVOURS.items() if not n.startswith("debug"))
    assert FLAVOURS["plus-3x3"].grid == 3 and FLAVOURS["plus"].grid == 2
    assert FLAVOURS["moe"].is_moe and FLAVOURS["debug-moe"].is_moe and not FLAVOURS["debug"].is_moe
    assert FLAVOURS["moe"].llm["rope_theta"] == 1e6 and FLAVOURS["moe"].llm["num_experts_per_tok"] == 2
    # the debug encoders land on the same grid: ConvNeXt stride 16 at 64 px, DINOv2 48/12
    d = FLAVOURS["debug"]
    assert d.tokens_per_view == 17 and d.dino_input // d.dino["patch_size"] == d.convnext_input // 16


def test_overrides_merge_and_round_trip():
    f = from_name("debug", grid=3, llm={"num_hidden_layers": 1}, freeze_vision=False)
    assert f.grid == 3 and f.llm["num_hidden_layers"] == 1 and f.llm["hidden_size"] == 128
    assert Flavour.from_dict(f.to_dict()) == f
    with pytest.raises(KeyError, match="unknown flavour override"):
        from_name("debug", bogus=1)
    with pytest.raises(KeyError, match="unknown flavour"):
        from_name("nope")
