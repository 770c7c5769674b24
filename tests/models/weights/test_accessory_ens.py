"""The four-branch SPHINX releases (SPHINX, -1k / -v2-1k, -MoE, -MoE-1k) → model directories, against the
release's forward written from its code (accessory_ens_reference)."""

import numpy as np
import pytest
import torch
from PIL import Image

from accessory_ens_reference import FLAVOURS, MOE_TYPES, TOYS, make_toy_ens_release, release_logits
from accessory_reference import release_image
from models.flavours import from_name
from models.tiling import TileSpec, tile_image
from models.weights.accessory import AccessoryError, convert_accessory, read_accessory
from models.weights.model_dir import load_model_dir

TOL = 2e-5  # fp32
TYPES = sorted(TOYS)


@pytest.fixture(scope="module", params=TYPES)
def converted(request, tmp_path_factory):
    llama_type = request.param
    release = make_toy_ens_release(tmp_path_factory.mktemp(llama_type), llama_type, mp=2, seed=TYPES.index(llama_type))
    out = tmp_path_factory.mktemp("converted") / "m"
    report = convert_accessory(release.directory, out, flavour=FLAVOURS[llama_type])
    model, tokenizer = load_model_dir(out)
    return release, report, model, tokenizer


def _caption(tokenizer, text="### Human: What colour is the square?\n### Assistant:"):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _image(model, seed=0):
    """A 100×50 random image → (our views uint8, kept [1, G·G], the release's input [1, 3, C, C])."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8))
    tiled = tile_image(image, TileSpec.from_flavour(model.flavour))
    release_input = release_image(image, model.flavour.grid * model.flavour.tile_size)
    return torch.from_numpy(tiled.views), torch.from_numpy(tiled.kept)[None], release_input


def test_merge_and_report(converted):
    release, report, model, _ = converted
    ckpt = read_accessory(release.directory)
    assert ckpt.mp_size == 2 and set(ckpt.state) == set(release.state) and ckpt.replica_max_diff == {}
    assert all(torch.equal(ckpt.state[k], v) for k, v in release.state.items())  # experts merged per expert
    encoders = report["source"]["encoders"]
    assert set(encoders) == {"convnext", "dino", "clip", "qformer"}
    assert "clip.text_projection" in encoders["clip"]["ignored"] and "clip.visual.proj" in encoders["clip"]["ignored"]
    assert "qformer.qformer.encoder.layer.0.intermediate.dense.weight" in encoders["qformer"]["ignored"]
    assert encoders["qformer"]["notes"] == ["vision qkv bias built as [q_bias, 0, v_bias] in 2 layer(s)"]
    assert report["model_dir"]["release"] == release.llama_type
    assert report["model_dir"]["encoders"] == ["convnext", "dinov2", "clip", "blip2_vision", "qformer"]
    from pipelines.convert import render_model_dir

    assert (f"release {release.llama_type}, float32; 5 visual towers: convnext, dinov2, clip, blip2_vision, qformer)"
            in render_model_dir(report["model_dir"]))
    assert "skip tokens off, the release's resampling" in render_model_dir(report["model_dir"])  # as the releases
    assert report["model_dir"]["geometry"]["resample"] == "release"
    parts = report["model_dir"]["parts"]
    assert {"clip", "blip2_vision", "qformer"} <= set(parts) and model.flavour.release == release.llama_type
    assert model.is_moe == (release.llama_type in MOE_TYPES)


def test_text_logits_match_the_release(converted):
    release, _, model, tokenizer = converted
    caption = _caption(tokenizer)
    with torch.no_grad():
        ours = model(torch.tensor([[tokenizer.bos_token_id] + caption])).logits[..., :release.n_words]
    ref = release_logits(release, tokenizer.bos_token_id, caption, None)
    assert ours.shape == ref.shape and ref.abs().max() > 1
    assert (ours - ref).abs().max() < TOL


def test_image_logits_and_greedy_ids_match_the_release(converted):
    """One image as each side gets it: ours tiled by models.tiling and each encoder's input made by the
    flavour's ``resample: release`` (models.release_pixels), the release's through its own transform
    (release_image) and encode_image's fp16 resize-then-crop (accessory_ens_reference.encoder_inputs); right
    after <s>. Every fp16 interpolate of the release is in both, so they agree to fp32 precision."""
    release, _, model, tokenizer = converted
    views, kept, release_input = _image(model)
    f = model.flavour
    n_views = TOYS[release.llama_type]["views"]
    assert f.resample == "release" and release_input.shape[-1] == release.canvas
    assert views.shape[0] == n_views and f.tokens_per_view == 4 + 17
    n_image = n_views * (f.tokens_per_view + 2)
    caption = _caption(tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.image_token_id] * n_image + caption])
    with torch.no_grad():
        ours = model(ids, views=views, kept=kept).logits[..., :release.n_words]
    ref = release_logits(release, tokenizer.bos_token_id, caption, release_input)
    assert ours.shape == ref.shape == (1, 1 + n_image + len(caption), release.n_words)
    # measured 6.4e-6 (llama_ens) .. 1.2e-5 (mixtral_sparse_ens5); the same reference with its fp16
    # interpolates done in fp32 moves by 1.5e-3 .. 5.5e-3, so this sees every fp16 round trip
    assert (ours - ref).abs().max() < TOL
    # greedy decoding: the served reference (models.sphinx.generate) against the release's argmax, token by token
    prompt = ids[0].tolist()
    with torch.no_grad():
        new = model.generate([prompt], views=views, kept=kept, max_new_tokens=4, eos_token_id=-1)[0]
    text = list(caption)
    for token in new:
        step = release_logits(release, tokenizer.bos_token_id, text, release_input)[0, -1]
        assert int(step.argmax()) == token
        text.append(token)


def test_flavour_must_match_the_llm(converted, tmp_path):
    release = converted[0]
    wrong = "debug-sphinx" if release.llama_type in MOE_TYPES else "debug-sphinx-moe"
    with pytest.raises(AccessoryError, match=rf"has a {'Mixtral' if release.llama_type in MOE_TYPES else 'Llama'} "
                                             rf"LLM but flavour '{wrong}'"):
        convert_accessory(release.directory, tmp_path / "x", flavour=from_name(wrong))


def test_expert_merge_undoes_the_release_split():
    """_sparse_expert_split (mixtral_sparse_ens.py:220-223): each expert's rows chunked over the ranks."""
    from models.weights.accessory import merge_experts

    e, f, d = 4, 96, 8
    full = torch.randn(e * f, d)
    for mp in (1, 2, 4, 8):
        parts = [p.reshape(-1, d) for p in full.view(e, -1, d).chunk(mp, dim=1)]
        assert torch.equal(merge_experts(parts, e, "w1"), full)
    with pytest.raises(AccessoryError, match=r"w1 \[10, 8\] is not 4 experts' rows"):
        merge_experts([torch.zeros(10, d)], e, "w1")
