"""LLaMA2-Accessory checkpoints → model directories, against the release's own forward (Meta layout)."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from accessory_reference import ARGS, DINO, TEXTS, make_toy_release, release_image, release_logits
from models.weights.accessory import AccessoryError, convert_accessory, ffn_size, read_accessory, split_dim
from models.weights.model_dir import load_model_dir
from models.conversation import IMAGE
from models.errors import UserError
from models.flavours import from_name
from models.tiling import TileSpec, tile_image

TOL = 2e-5  # fp32
TOY = "debug-sphinx-tiny-1k"  # the release's geometry, the toy's shapes


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_toy_release(tmp_path_factory.mktemp("sphinx-tiny-1k"))


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "m"
    report = convert_accessory(release.directory, out, flavour=TOY)
    return out, report


def _caption(tokenizer, text="### Human: What colour is the square?\n### Assistant:"):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_split_dims_follow_fairscale():
    assert split_dim("layers.3.attention.wq.weight") == 0 and split_dim("layers.0.feed_forward.w3.weight") == 0
    assert split_dim("output.weight") == 0 and split_dim("layers.1.attention.wo.weight") == 1
    assert split_dim("layers.1.feed_forward.w2.weight") == 1 and split_dim("tok_embeddings.weight") == 1
    for replicated in ("norm.weight", "layers.0.attention_norm.weight", "visual_proj.0.weight", "start_img",
                       "openclip_convnext_xxl.stem.0.weight", "dinov2_vitg14.blocks.0.attn.qkv.weight"):
        assert split_dim(replicated) is None
    assert ffn_size({"dim": 2048, "multiple_of": 256}) == 5632  # TinyLlama
    assert ffn_size({"dim": 4096, "multiple_of": 256, "ffn_dim_multiplier": 1.3}) == 14336


def test_merge_is_the_full_model(release):
    ckpt = read_accessory(release.directory)
    assert (ckpt.llama_type, ckpt.mp_size, ckpt.args["dim"]) == ("llama_ens5_light", 2, 128)
    assert set(ckpt.state) == set(release.state) and ckpt.replica_max_diff == {}
    assert all(torch.equal(ckpt.state[k], v) for k, v in release.state.items())


def test_text_logits_match_the_release(release, converted):
    out, _ = converted
    model, tokenizer = load_model_dir(out)
    caption = _caption(tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id] + caption])
    with torch.no_grad():
        ours = model(ids).logits[..., :release.n_words]
    ref = release_logits(release, tokenizer.bos_token_id, caption, None)
    assert ours.shape == ref.shape and ref.abs().max() > 1
    assert (ours - ref).abs().max() < TOL
    hf = AutoModelForCausalLM.from_pretrained(str(out / "llm"), local_files_only=True).eval()
    with torch.no_grad():
        assert (hf(ids).logits[..., :release.n_words] - ref).abs().max() < TOL


def test_image_logits_match_the_release(release, converted):
    """One image, tiled by models.tiling with the release's geometry (centred, every tile kept),
    placed right after <s> as the release does; the reference encodes the same five views."""
    out, _ = converted
    model, tokenizer = load_model_dir(out)
    flavour = model.flavour
    assert (flavour.pad, flavour.skip_tokens, flavour.image_position) == ("centre", False, "after_bos")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8))
    tiled = tile_image(image, TileSpec.from_flavour(flavour))
    assert tiled.views.shape == (5, 64, 64, 3) and tiled.kept.all()
    n_image = 5 * (flavour.tokens_per_view + 2)
    caption = _caption(tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.image_token_id] * n_image + caption])
    views = torch.from_numpy(tiled.views)
    with torch.no_grad():
        ours = model(ids, views=views, kept=torch.from_numpy(tiled.kept)[None]).logits[..., :release.n_words]
    ref = release_logits(release, tokenizer.bos_token_id, caption, views)
    assert ours.shape == ref.shape == (1, 1 + n_image + len(caption), release.n_words)
    assert (ours - ref).abs().max() < TOL
    # the rows the release computes its loss on (from the end token on): the caption's predictions
    assert (ours[0, n_image:] - ref[0, n_image:]).abs().max() < TOL


def test_tiny_single_view(tmp_path):
    release = make_toy_release(tmp_path / "src", llama_type="llama_ens_light", mp=1, seed=3)
    report = convert_accessory(release.directory, tmp_path / "m", flavour="debug-sphinx-tiny")
    assert report["source"]["mp_size"] == 1 and report["model_dir"]["geometry"]["max_image_tokens"] == 19
    model, tokenizer = load_model_dir(tmp_path / "m")
    tiled = tile_image(Image.new("RGB", (30, 90), (10, 200, 30)), TileSpec.from_flavour(model.flavour))
    assert tiled.views.shape == (1, 64, 64, 3) and tiled.kept.shape == (0,)
    caption = _caption(tokenizer, "What is it?")
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.image_token_id] * 19 + caption])
    with torch.no_grad():
        ours = model(ids, views=torch.from_numpy(tiled.views), kept=torch.zeros(1, 0, dtype=torch.bool)).logits
    ref = release_logits(release, tokenizer.bos_token_id, caption, torch.from_numpy(tiled.views))
    assert (ours[..., :release.n_words] - ref).abs().max() < TOL


@pytest.mark.parametrize("llama_type, toy", [("llama_ens_light", "debug-sphinx-tiny"),
                                             ("llama_ens5_light", "debug-sphinx-tiny-1k")])
def test_image_logits_match_the_release_with_its_resampling(tmp_path, llama_type, toy):
    """The toy run as the release runs it (``resample: release``: models.tiling's canvas, then
    models.release_pixels) against the release's forward from its own input image (release_image: PadToSquare,
    PIL bicubic) through encode_image's fp16 resize-then-crop (release_image_tokens)."""
    release = make_toy_release(tmp_path / "src", llama_type=llama_type, mp=1, seed=11)
    convert_accessory(release.directory, tmp_path / "m", flavour=from_name(toy, resample="release"))
    model, tokenizer = load_model_dir(tmp_path / "m")
    f = model.flavour
    assert f.resample == "release"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 100, 3), dtype=np.uint8))
    tiled = tile_image(image, TileSpec.from_flavour(f))
    n_image = release.views * (f.tokens_per_view + 2)
    caption = _caption(tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.image_token_id] * n_image + caption])
    with torch.no_grad():
        ours = model(ids, views=torch.from_numpy(tiled.views),
                     kept=torch.from_numpy(tiled.kept)[None]).logits[..., :release.n_words]
    ref = release_logits(release, tokenizer.bos_token_id, caption, None,
                         image=release_image(image, f.grid * f.tile_size))
    assert ours.shape == ref.shape == (1, 1 + n_image + len(caption), release.n_words)
    assert (ours - ref).abs().max() < TOL  # measured 6.3e-6 / 5.7e-6; with resample "project": 3.5 / 3.1


def test_rope_scaling_and_theta(tmp_path):
    """Accessory multiplies positions by rope_scaling; transformers' linear rope divides by its factor."""
    release = make_toy_release(tmp_path / "src", mp=1, seed=5, args_extra={"rope_scaling": 0.25, "rope_theta": 500.0})
    convert_accessory(release.directory, tmp_path / "m", flavour=TOY)
    model, tokenizer = load_model_dir(tmp_path / "m")
    caption = _caption(tokenizer) * 3
    with torch.no_grad():
        ours = model(torch.tensor([[tokenizer.bos_token_id] + caption])).logits[..., :release.n_words]
    assert (ours - release_logits(release, tokenizer.bos_token_id, caption, None)).abs().max() < TOL


def test_the_directory_records_what_was_read(release, converted):
    out, report = converted
    source, found = report["source"], report["model_dir"]
    assert source["llama_type"] == "llama_ens5_light" and len(source["files"]) == 2
    assert source["tokenizer_words"] == release.n_words and source["tokenizer_size"] == release.n_words + 1
    assert found["token_ids"]["vocab_size"] == release.n_words + 1
    assert found["token_ids"]["image_token_id"] == release.n_words and found["dtype"] == "float32"
    # PadToSquare's colour: int(mean·255), truncated
    assert found["geometry"] == {"grid": 2, "tile_size": 64, "canvas": 128, "mean_u8": [122, 116, 104],
                                 "pad": "centre", "skip_tokens": False, "tokens_per_view": 17,
                                 "max_image_tokens": 5 * 19}
    n_release = sum(v.numel() for v in release.state.values())
    # + the <image> rows of embed_tokens and lm_head + the (unused) skip token - DINOv2's positions
    # resampled from the hub's 6×6 grid to the flavour's 4×4
    resampled = (DINO["grid"] ** 2 - 4 * 4) * DINO["dim"]
    assert found["params"]["total"] == n_release + 2 * ARGS["dim"] + ARGS["dim"] - resampled
    assert json.loads((out / "config.json").read_text())["source"]["from"] == "accessory"


def test_tokenizer_encodes_as_sentencepiece(release, converted):
    out, _ = converted
    sp = spm.SentencePieceProcessor(model_file=str(release.directory / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(out / "llm"), local_files_only=True)
    assert len(tok) == release.n_words + 1 and tok.convert_tokens_to_ids(IMAGE) == release.n_words
    for text in TEXTS + [" Human: hi", "  two  spaces", "\n###", "émoji ☃ 42"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok("hi")["input_ids"] == [sp.bos_id()] + sp.encode("hi")


def test_converted_model_loads_and_generates(converted):
    out, _ = converted
    model, tokenizer = load_model_dir(out)
    prompt = [tokenizer.bos_token_id] + _caption(tokenizer)
    first = model.generate([prompt], max_new_tokens=6)
    assert len(first[0]) == 6 and first == model.generate([prompt], max_new_tokens=6, use_cache=False)
    assert model.image_token_id not in first[0]


def test_bf16_conversion(release, tmp_path):
    report = convert_accessory(release.directory, tmp_path / "m", flavour=TOY, dtype=torch.bfloat16)
    assert report["model_dir"]["dtype"] == "bfloat16"
    assert {d for part in report["model_dir"]["parts"].values() for d in part["dtypes"]} == {"bfloat16"}
    model, _ = load_model_dir(tmp_path / "m")
    assert model.llm.lm_head.weight.dtype == torch.bfloat16


def _copy(release, dst, **changes):
    import shutil

    shutil.copytree(release.directory, dst)
    return dst


def test_bad_checkpoints_name_the_file_and_the_key(release, tmp_path):
    src = _copy(release, tmp_path / "missing-shard")
    (src / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(AccessoryError, match=r"missing shard\(s\) consolidated.01-of-02.model.pth"):
        read_accessory(src)

    src = _copy(release, tmp_path / "extra-key")
    shard = src / "consolidated.00-of-02.model.pth"
    for rank in (0, 1):
        f = src / f"consolidated.{rank:02d}-of-02.model.pth"
        state = torch.load(f, weights_only=True)
        state["model"]["llma.qformer.weight"] = torch.zeros(2)
        torch.save(state, f)
    with pytest.raises(AccessoryError, match=rf"{shard}: weights llama_ens5_light does not have: llma.qformer.weight"):
        convert_accessory(src, tmp_path / "out", flavour=TOY)

    src = _copy(release, tmp_path / "one-sided")
    state = torch.load(shard := src / "consolidated.01-of-02.model.pth", weights_only=True)
    state["model"].pop("llma.norm.weight")
    torch.save(state, shard)
    with pytest.raises(AccessoryError, match=r"consolidated.01-of-02.model.pth and .*consolidated.00-of-02.model.pth "
                                             r"hold different keys: llma.norm.weight"):
        read_accessory(src)

    src = _copy(release, tmp_path / "narrow")
    (src / "config.json").write_text(json.dumps({**ARGS, "multiple_of": 64}))
    with pytest.raises(AccessoryError, match=r"llma.layers.0.feed_forward.w1.weight is \[352, 128\], .*config.json "
                                             r"gives \[384, 128\]"):
        convert_accessory(src, tmp_path / "out", flavour=TOY)

    src = _copy(release, tmp_path / "encoder")
    with pytest.raises(UserError, match=r"openclip_convnext_xxl.*shape mismatches"):
        convert_accessory(src, tmp_path / "out", flavour=from_name("debug-sphinx-tiny-1k", convnext={
            "hidden_sizes": [32, 64, 128]}))

    src = _copy(release, tmp_path / "type")
    (src / "meta.json").write_text(json.dumps({"llama_type": "llama_qformerv2"}))
    with pytest.raises(AccessoryError, match=r"llama_type 'llama_qformerv2' is not supported; supported: "
                                             r"llama_ens_light \(SPHINX-Tiny\); .*mixtral_sparse_ens5 \(SPHINX-MoE-1k\)"):
        read_accessory(src)
    (src / "meta.json").write_text(json.dumps({"llama_type": "llama_ens_light"}))
    (src / "config.json").write_text(json.dumps({**ARGS, "n_expert": 8}))
    with pytest.raises(AccessoryError, match=r"config.json: unknown model argument\(s\) n_expert"):
        read_accessory(src)


def test_release_models_refuse_skipped_tiles(converted):
    """Without skip tokens a model never learnt one: a mask with a skipped tile is an error."""
    out, _ = converted
    model, _ = load_model_dir(out)
    views = torch.zeros(4, 64, 64, 3, dtype=torch.uint8)
    with pytest.raises(UserError, match="has no skip tokens: every tile is kept"):
        model.vision(views, torch.tensor([[True, True, True, False]]))
