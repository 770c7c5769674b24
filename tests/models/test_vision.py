"""Mixture of visual experts: layout, skip tokens, normalisation."""

import pytest
import torch

from models.errors import UserError
from models.flavours import from_name
from models.vision import MixtureOfVisualExperts



FLAVOUR = from_name("debug")
N = FLAVOUR.tokens_per_view
S = FLAVOUR.tile_size


@pytest.fixture(scope="module")
def mov():
    torch.manual_seed(0)
    return MixtureOfVisualExperts(FLAVOUR, d_llm=32).eval()


def _views(n):
    return torch.randint(0, 256, (n, S, S, 3), dtype=torch.uint8)


def test_skipped_tiles_are_never_encoded(mov):
    seen = []
    hooks = [enc.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"].shape[0]), with_kwargs=True)
             for enc in (mov.convnext, mov.dino)]
    try:
        kept = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
        mov(_views(3 + 2 + 2 + 4), kept)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [11, 11]  # 3 global views + 8 kept tiles, once per encoder; 4 skipped never


def test_sequence_lengths_and_layout(mov):
    kept = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert mov.token_counts(kept) == [5 * (N + 2), 3 * (N + 2) + 2, 2 * (N + 2) + 3]
    flat = mov(_views(5 + 3 + 2), kept)
    assert flat.shape == (sum(mov.token_counts(kept)), 32)
    out = flat.split(mov.token_counts(kept))
    wide = out[1]
    start, end, skip = mov.start.detach(), mov.end.detach(), mov.skip.detach()
    for v in range(3):  # [start, N, end] for the global view and the two kept tiles
        assert torch.equal(wide[v * (N + 2)], start) and torch.equal(wide[v * (N + 2) + N + 1], end)
    assert torch.equal(wide[-1], skip) and torch.equal(wide[-2], skip)
    # a skipped tile in the middle of the row-major order sits between kept tiles
    tall = mov(_views(3), torch.tensor([[1, 0, 1, 0]], dtype=torch.bool))
    assert torch.equal(tall[2 * (N + 2)], skip) and torch.equal(tall[2 * (N + 2) + 1], start)


def test_padding_is_exactly_zero_after_normalisation(mov):
    pad = torch.tensor(FLAVOUR.mean_u8, dtype=torch.uint8).expand(2, S, S, 3).contiguous()
    assert torch.count_nonzero(mov.normalise(pad)) == 0
    white = mov.normalise(torch.full((1, S, S, 3), 255, dtype=torch.uint8))
    assert white.shape == (1, 3, S, S) and (white > 1).all()


def test_frozen_by_default_and_switchable():
    m = MixtureOfVisualExperts(FLAVOUR, d_llm=16).train()
    assert not m.convnext.training and not any(p.requires_grad for p in m.dino.parameters())
    assert all(p.requires_grad for p in m.projector.parameters()) and m.skip.requires_grad
    m.set_encoders_trainable(True)
    m.train()
    assert m.convnext.training and all(p.requires_grad for p in m.convnext.parameters())
    m2 = MixtureOfVisualExperts(from_name("debug", freeze_vision=False), d_llm=16)
    assert all(p.requires_grad for p in m2.dino.parameters())


def test_bad_inputs_name_the_problem(mov):
    with pytest.raises(UserError, match="views hold 2 views but kept masks need 3"):
        mov(_views(2), torch.tensor([[1, 1, 0, 0]], dtype=torch.bool))
    with pytest.raises(UserError, match="uint8"):
        mov(torch.zeros(1, S, S, 3), torch.tensor([[0, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(UserError, match="kept must be"):
        mov(_views(1), torch.tensor([[0, 0, 0]], dtype=torch.bool))


def test_grid_one_is_the_global_view_only():
    m = MixtureOfVisualExperts(from_name("debug", grid=1), d_llm=8)
    kept = torch.zeros((2, 0), dtype=torch.bool)
    assert m(_views(2), kept).shape == (2 * (N + 2), 8) and m.token_counts(kept) == [N + 2, N + 2]


def _grads(m):
    return {name: p.grad for name, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kept", [None, [[1, 1, 1, 1]]], ids=["no-images", "no-skipped-tiles"])
def test_every_trainable_param_gets_a_grad_even_when_unused(kept):
    """Text-only batches (and images without skipped tiles) still give every trainable param a
    gradient, zero where unused: data-parallel gradient reduction needs the same grads on every rank."""
    m = MixtureOfVisualExperts(FLAVOUR, d_llm=16).train()
    calls = []
    hooks = [mod.register_forward_hook(lambda mod, a, o: calls.append(mod)) for mod in (m.convnext, m.dino, m.projector)]
    views = None if kept is None else _views(5)
    kept = None if kept is None else torch.tensor(kept, dtype=torch.bool)
    out = m(views, kept)
    for h in hooks:
        h.remove()
    assert calls == [m.convnext, m.dino, m.projector]  # every module runs: same module order on every rank
    assert out.shape == ((0 if kept is None else 5 * (N + 2)), 16)
    out.sum().backward()
    grads = _grads(m)
    assert set(grads) == {"start", "end", "skip", "projector.0.weight", "projector.0.bias",
                          "projector.1.weight", "projector.1.bias"}
    assert all(g is not None for g in grads.values()), [k for k, g in grads.items() if g is None]
    assert torch.count_nonzero(grads["skip"]) == 0  # unused in both cases
    if kept is None:
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    else:
        assert torch.count_nonzero(grads["start"]) > 0 and torch.count_nonzero(grads["projector.0.weight"]) > 0


def test_each_encoder_gets_its_own_normalisation(mov):
    """ConvNeXt: CLIP statistics (the mean-colour padding is exactly 0); DINOv2: ImageNet
    statistics of the same pixels, x_dino = (x_clip·std_clip + mean_clip - mean_in) / std_in."""
    seen = {}
    hooks = [enc.register_forward_pre_hook(lambda m, a, kw, name=name: seen.__setitem__(name, kw["pixel_values"]),
                                           with_kwargs=True) for name, enc in (("conv", mov.convnext), ("dino", mov.dino))]
    pad = torch.tensor(FLAVOUR.mean_u8, dtype=torch.uint8).expand(1, S, S, 3).contiguous()
    views = torch.cat([pad, _views(1)])
    try:
        mov.encode_views(views)
    finally:
        for h in hooks:
            h.remove()
    assert torch.count_nonzero(seen["conv"][0]) == 0
    x_clip = mov.normalise(views)
    mean_clip = torch.tensor(FLAVOUR.mean_u8).view(1, 3, 1, 1) / 255  # the colour normalise() subtracts
    std_clip = torch.tensor(FLAVOUR.std).view(1, 3, 1, 1)
    mean_in = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std_in = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    renormalised = (x_clip * std_clip + mean_clip - mean_in) / std_in
    assert torch.allclose(mov.normalise_dino(views), renormalised, atol=1e-5)
    assert torch.allclose(seen["dino"], renormalised, atol=1e-5)  # dino_input == tile_size in debug: no resize
    assert seen["dino"][0].abs().min() > 0.005  # the padding is not 0 for DINOv2 (as in the official release)


def test_the_final_convnext_norm_is_the_flavours_choice():
    """The release runs open_clip's trunk (final LayerNorm at every position); the toys take the
    raw last stage (their random frozen encoders keep each position's magnitude that way)."""
    from models.vision import build_convnext, convnext_feature_map

    assert not from_name("debug").convnext_final_norm and not from_name("debug-moe").convnext_final_norm
    assert from_name("sphinx-tiny").convnext_final_norm and from_name("debug-sphinx-tiny").convnext_final_norm
    tower = build_convnext(from_name("debug")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = tower(pixel_values=x).last_hidden_state
        normed = convnext_feature_map(tower, x)
        assert torch.equal(convnext_feature_map(tower, x, final_norm=False), raw)
    torch.testing.assert_close(normed, tower.layernorm(raw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_four_branch_views():
    """The four-branch releases' view: Q query tokens first, then N - Q channel-mixed tokens (CLIP | ConvNeXt |
    DINOv2); the ConvNeXt's 2x2 map is repeated onto the 4x4 grid (the release's repeat_interleave)."""
    f = from_name("debug-sphinx-1k")
    torch.manual_seed(0)
    vision = MixtureOfVisualExperts(f, 128).eval()
    assert len(vision.encoders()) == 4 and not any(p.requires_grad for e in vision.encoders() for p in e.parameters())
    assert vision.projector[0].in_features == 40 + 96 + 64  # CLIP, ConvNeXt, DINOv2 channels, in the release's order
    views = torch.randint(0, 256, (5, 56, 56, 3), dtype=torch.uint8)
    kept = torch.ones(1, 4, dtype=torch.bool)
    seen = {}
    vision.convnext.register_forward_hook(lambda m, i, o: seen.update(fmap=o.last_hidden_state))
    with torch.no_grad():
        out = vision(views, kept)
        tokens = vision.encode_views(views)
    assert seen["fmap"].shape[-2:] == (2, 2)  # 56 -> nearest 64 -> stride 32
    assert out.shape == (5 * (4 + 17 + 2), 128) and vision.token_counts(kept) == [115]
    assert tokens.shape == (5, 21, 128)
    assert torch.equal(out[1:22], tokens[0])  # start, then the view's Q + N tokens
