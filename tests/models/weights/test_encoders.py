"""Pretrained encoders in their published layouts, each against its reference forward (fp32).

DINOv2: a toy transformers Dinov2Model with the published geometry (positions for a 37×37 grid,
like image_size 518 / patch 14) saved as a current and as a legacy-named HF directory, and a
torch.hub-layout state dict run through a ViT forward written here from the hub layout. ConvNeXt:
an open_clip checkpoint (timm trunk under ``visual.trunk.``, CLIP head, text tower) run through a
ConvNeXt forward written here from the timm layout, and an HF ConvNext directory.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextModel, Dinov2Config, Dinov2Model

from models.errors import UserError
from models.flavours import from_name
from models.weights.encoders import (
    dino_from_hub, convnext_from_timm, load_convnext_weights, load_dino_weights, with_encoder_overrides,
)
from models.vision import build_convnext, build_dino, convnext_feature_map

TOL = 1e-5  # fp32; measured max |diff| is printed by each test (pytest -s)
C, DEPTH, HEADS, PATCH, M = 32, 2, 2, 4, 37  # M: the published 37×37 position grid (518 / 14)
G = 16  # the flavour's grid (224 / 14)


def _dino_flavour(swiglu=True):
    return from_name("debug", dino=dict(hidden_size=C, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                        mlp_ratio=4, use_swiglu_ffn=swiglu, patch_size=PATCH, image_size=G * PATCH),
                     dino_input=G * PATCH)


def _report(name, diff):
    print(f"{name}: max |diff| = {diff:.2e}")
    assert diff < TOL, f"{name}: {diff}"


def _randomise(module):
    """Random values everywhere (layer scales, norms, positions too), so every weight matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


# ---------------------------------------------------------------- DINOv2, Hugging Face directories


def _legacy_names(state):
    """Current transformers Dinov2 keys → the legacy names published HF checkpoints carry."""
    out = {}
    for k, v in state.items():
        k2 = (k.replace("attention.q_proj", "attention.attention.query")
               .replace("attention.k_proj", "attention.attention.key")
               .replace("attention.v_proj", "attention.attention.value")
               .replace("attention.o_proj", "attention.output.dense")
               .replace("mlp.down_proj", "mlp.weights_out"))
        if "mlp.gate_proj" in k2:
            out[k2.replace("mlp.gate_proj", "mlp.weights_in")] = torch.cat([v, state[k.replace("gate_proj", "up_proj")]])
        elif "mlp.up_proj" not in k2:
            out[k2] = v
    return out


@pytest.fixture(scope="module")
def published_dino():
    """A toy DINOv2 as published: image_size 37·patch (positions [1, 1 + 37², C])."""
    config = Dinov2Config(hidden_size=C, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
                          use_swiglu_ffn=True, patch_size=PATCH, image_size=M * PATCH)
    return _randomise(Dinov2Model(config))


@pytest.mark.parametrize("names", ["current", "legacy"])
def test_dino_hf_directory_matches_transformers_at_the_flavour_input(tmp_path, published_dino, names):
    ref = published_dino
    assert ref.embeddings.position_embeddings.shape == (1, 1 + M * M, C)
    src = tmp_path / "dinov2"
    if names == "current":
        ref.save_pretrained(str(src))
    else:  # the legacy layout, as facebook/dinov2-* are stored, under a `dinov2.` prefix
        src.mkdir()
        ref.config.to_json_file(str(src / "config.json"))
        save_file({f"dinov2.{k}": v.contiguous() for k, v in _legacy_names(ref.state_dict()).items()},
                  str(src / "model.safetensors"))
        assert any("attention.attention.query" in k for k in _legacy_names(ref.state_dict()))
    flavour = _dino_flavour()
    weights = load_dino_weights(src, flavour)
    assert weights.layout == "hf" and weights.state["embeddings.position_embeddings"].shape == (1, 1 + G * G, C)
    tower = build_dino(with_encoder_overrides(flavour, weights))
    weights.load_into(tower)
    x = torch.randn(2, 3, G * PATCH, G * PATCH)
    with torch.no_grad():
        ours = tower.eval()(pixel_values=x).last_hidden_state
        theirs = ref(pixel_values=x).last_hidden_state  # interpolates its 37×37 positions at run time
        # transformers' own loader (its legacy-name mapping) on the same directory agrees too
        library = Dinov2Model.from_pretrained(str(src), local_files_only=True).eval()(pixel_values=x).last_hidden_state
    assert ours.shape == (2, 1 + G * G, C)
    _report(f"dinov2 hf {names} vs transformers", (ours - theirs).abs().max().item())
    _report(f"dinov2 hf {names} vs from_pretrained", (ours - library).abs().max().item())


def test_dino_hf_directory_with_other_heads_is_refused(tmp_path, published_dino):
    published_dino.save_pretrained(str(tmp_path / "d"))
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["num_attention_heads"] = 4
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: num_attention_heads 4 != 2"):
        load_dino_weights(tmp_path / "d", _dino_flavour())


# ---------------------------------------------------------------- DINOv2, torch.hub layout


def _hub_state(swiglu, chunked=False):
    g = torch.Generator().manual_seed(1)

    def r(*shape, base=0.0):
        return base + 0.2 * torch.randn(shape, generator=g)

    hidden = C * 4
    if swiglu:
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    s = {"cls_token": r(1, 1, C), "pos_embed": r(1, 1 + M * M, C), "mask_token": torch.zeros(1, C),
         "patch_embed.proj.weight": r(C, 3, PATCH, PATCH), "patch_embed.proj.bias": r(C),
         "norm.weight": r(C, base=1.0), "norm.bias": r(C)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        s.update({p + "norm1.weight": r(C, base=1.0), p + "norm1.bias": r(C), p + "attn.qkv.weight": r(3 * C, C),
                  p + "attn.qkv.bias": r(3 * C), p + "attn.proj.weight": r(C, C), p + "attn.proj.bias": r(C),
                  p + "ls1.gamma": r(C, base=0.5), p + "norm2.weight": r(C, base=1.0), p + "norm2.bias": r(C),
                  p + "ls2.gamma": r(C, base=0.5)})
        if swiglu:
            s.update({p + "mlp.w12.weight": r(2 * hidden, C), p + "mlp.w12.bias": r(2 * hidden),
                      p + "mlp.w3.weight": r(C, hidden), p + "mlp.w3.bias": r(C)})
        else:
            s.update({p + "mlp.fc1.weight": r(hidden, C), p + "mlp.fc1.bias": r(hidden),
                      p + "mlp.fc2.weight": r(C, hidden), p + "mlp.fc2.bias": r(C)})
    if chunked:  # BlockChunk: blocks.<chunk>.<global index>. (one chunk per block here)
        s = {(f"blocks.{k.split('.')[1]}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
             for k, v in s.items()}
    return s


def _hub_forward(s, x, swiglu, offset=0.1):
    """DinoVisionTransformer.forward_features(x)['x_norm_*'] from the hub layout (prepare_tokens,
    interpolate_pos_encoding with its offset, pre-norm blocks with layer scale, final norm)."""
    b = x.shape[0]
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(b, -1, -1), t], dim=1)
    pos, w0 = s["pos_embed"].float(), x.shape[-2] // PATCH
    n = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, n, n, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((w0 + offset) / n,) * 2, mode="bicubic", antialias=False)
    t = t + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, C)], dim=1)
    for i in range(DEPTH):
        def p(name):
            return s[f"blocks.{i}.{name}"]
        h = F.layer_norm(t, (C,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, -1, 3, HEADS, C // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (C // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(b, -1, C)
        t = t + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(t, (C,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        if swiglu:
            x1, x2 = F.linear(h, p("mlp.w12.weight"), p("mlp.w12.bias")).chunk(2, dim=-1)
            m = F.linear(F.silu(x1) * x2, p("mlp.w3.weight"), p("mlp.w3.bias"))
        else:
            m = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * m
    return F.layer_norm(t, (C,), s["norm.weight"], s["norm.bias"], eps=1e-6)


@pytest.mark.parametrize("swiglu,chunked", [(True, False), (False, False), (True, True)])
def test_dino_hub_layout_matches_the_hub_forward(tmp_path, swiglu, chunked):
    state = _hub_state(swiglu, chunked)
    torch.save(state, tmp_path / "dinov2_vitg14_pretrain.pth")
    flavour = _dino_flavour(swiglu)
    weights = load_dino_weights(tmp_path / "dinov2_vitg14_pretrain.pth", flavour)
    assert weights.layout == "hub"
    tower = build_dino(with_encoder_overrides(flavour, weights))
    weights.load_into(tower)
    x = torch.randn(2, 3, G * PATCH, G * PATCH)
    plain = {k: v for k, v in _hub_state(swiglu).items()}
    with torch.no_grad():
        ours = tower.eval()(pixel_values=x).last_hidden_state
        ref = _hub_forward(plain, x, swiglu)
    _report(f"dinov2 hub swiglu={swiglu} chunked={chunked}", (ours - ref).abs().max().item())
    # the hub's interpolation offset is not transformers' plain resize: using the wrong one shows
    assert (_hub_forward(plain, x, swiglu, offset=0.0) - ref).abs().max() > 1e-4


def test_published_vitg14_shapes_fit_the_real_flavours():
    """dinov2_vitg14 as published (meta tensors: shapes only) → the paper flavours' 224 px tower."""
    c, hidden = 1536, 4096
    with torch.device("meta"):
        s = {"cls_token": torch.empty(1, 1, c), "pos_embed": torch.empty(1, 1 + 37 * 37, c),
             "mask_token": torch.empty(1, c), "patch_embed.proj.weight": torch.empty(c, 3, 14, 14),
             "patch_embed.proj.bias": torch.empty(c), "norm.weight": torch.empty(c), "norm.bias": torch.empty(c)}
        for i in range(40):
            for name, shape in [("norm1.weight", [c]), ("norm1.bias", [c]), ("norm2.weight", [c]), ("norm2.bias", [c]),
                                ("attn.qkv.weight", [3 * c, c]), ("attn.qkv.bias", [3 * c]),
                                ("attn.proj.weight", [c, c]), ("attn.proj.bias", [c]), ("ls1.gamma", [c]),
                                ("ls2.gamma", [c]), ("mlp.w12.weight", [2 * hidden, c]), ("mlp.w12.bias", [2 * hidden]),
                                ("mlp.w3.weight", [c, hidden]), ("mlp.w3.bias", [c])]:
                s[f"blocks.{i}.{name}"] = torch.empty(shape)
    for name in ("tiny", "intern2", "plus", "moe"):
        w = dino_from_hub(s, from_name(name), source="dinov2_vitg14")
        assert w.state["embeddings.position_embeddings"].shape == (1, 257, c)


def test_dino_bad_inputs_name_file_and_key(tmp_path):
    flavour = _dino_flavour()
    with pytest.raises(UserError, match="weights file not found"):
        load_dino_weights(tmp_path / "missing.pth", flavour)
    state = _hub_state(True)
    state["register_tokens"] = torch.zeros(1, 4, C)
    with pytest.raises(UserError, match="register_tokens"):
        dino_from_hub(state, flavour, source="reg.pth")
    wide = _hub_state(True)
    wide["blocks.1.attn.proj.weight"] = torch.zeros(C, C + 1)
    with pytest.raises(UserError, match=r"wide\.pth.*encoder\.layer\.1\.attention\.o_proj\.weight \[32, 33\] != \[32, 32\]"):
        dino_from_hub(wide, flavour, source="wide.pth")
    extra = _hub_state(True)
    extra["blocks.0.attn.q_norm.weight"] = torch.zeros(C)
    with pytest.raises(UserError, match=r"unexpected keys \(1\): blocks\.0\.attn\.q_norm\.weight"):
        dino_from_hub(extra, flavour, source="x.pth")
    torch.save({"stem.0.weight": torch.zeros(1)}, tmp_path / "conv.pth")
    with pytest.raises(UserError, match=r"conv\.pth is not a DINOv2 checkpoint"):
        load_dino_weights(tmp_path / "conv.pth", flavour)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_dino_weights(tmp_path / "empty", flavour)


# ---------------------------------------------------------------- ConvNeXt, open_clip / timm layout

DIMS, DEPTHS, EPS = [8, 16, 24], [1, 2, 1], 1e-5


def _conv_flavour():
    return from_name("debug", convnext=dict(hidden_sizes=DIMS, depths=DEPTHS, norm_eps=EPS))


def _timm_trunk():
    g = torch.Generator().manual_seed(2)

    def r(*shape, base=0.0):
        return base + 0.2 * torch.randn(shape, generator=g)

    s = {"stem.0.weight": r(DIMS[0], 3, 4, 4), "stem.0.bias": r(DIMS[0]),
         "stem.1.weight": r(DIMS[0], base=1.0), "stem.1.bias": r(DIMS[0])}
    for i, (dim, depth) in enumerate(zip(DIMS, DEPTHS)):
        if i:
            s.update({f"stages.{i}.downsample.0.weight": r(DIMS[i - 1], base=1.0),
                      f"stages.{i}.downsample.0.bias": r(DIMS[i - 1]),
                      f"stages.{i}.downsample.1.weight": r(dim, DIMS[i - 1], 2, 2),
                      f"stages.{i}.downsample.1.bias": r(dim)})
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            s.update({p + "gamma": r(dim, base=0.5), p + "conv_dw.weight": r(dim, 1, 7, 7), p + "conv_dw.bias": r(dim),
                      p + "norm.weight": r(dim, base=1.0), p + "norm.bias": r(dim),
                      p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                      p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    s.update({"head.norm.weight": r(DIMS[-1], base=1.0), "head.norm.bias": r(DIMS[-1])})
    return s


def _timm_forward(s, x, eps=EPS):
    """timm ConvNeXt.forward with head.global_pool / flatten = Identity (the SPHINX trunk):
    stem, stages (downsample, blocks with layer scale), then head.norm (LayerNorm2d) per position."""
    def ln2d(t, name):
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), s[name + ".weight"], s[name + ".bias"],
                            eps).permute(0, 3, 1, 2)

    t = ln2d(F.conv2d(x, s["stem.0.weight"], s["stem.0.bias"], stride=4), "stem.1")
    for i, depth in enumerate(DEPTHS):
        if f"stages.{i}.downsample.0.weight" in s:
            t = ln2d(t, f"stages.{i}.downsample.0")
            t = F.conv2d(t, s[f"stages.{i}.downsample.1.weight"], s[f"stages.{i}.downsample.1.bias"], stride=2)
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            u = F.conv2d(t, s[p + "conv_dw.weight"], s[p + "conv_dw.bias"], padding=3, groups=t.shape[1])
            u = F.layer_norm(u.permute(0, 2, 3, 1), (t.shape[1],), s[p + "norm.weight"], s[p + "norm.bias"], eps)
            u = F.linear(F.gelu(F.linear(u, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                         s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
            t = t + u.permute(0, 3, 1, 2) * s[p + "gamma"].view(1, -1, 1, 1)
    return ln2d(t, "head.norm")


def _open_clip_checkpoint():
    """The trunk under visual.trunk., open_clip's linear CLIP head, and (a sliver of) the text tower."""
    state = {f"visual.trunk.{k}": v for k, v in _timm_trunk().items()}
    state.update({"visual.head.proj.weight": torch.randn(12, DIMS[-1]), "logit_scale": torch.tensor(4.6),
                  "positional_embedding": torch.randn(7, 12), "token_embedding.weight": torch.randn(50, 12),
                  "text_projection": torch.randn(12, 12), "ln_final.weight": torch.ones(12),
                  "transformer.resblocks.0.attn.in_proj_weight": torch.randn(36, 12)})
    return state


@pytest.mark.parametrize("fmt", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "trunk.pt"])
def test_convnext_open_clip_checkpoint_matches_the_timm_forward(tmp_path, fmt):
    state = _open_clip_checkpoint() if fmt != "trunk.pt" else {"state_dict": {f"module.{k}": v for k, v in
                                                                                _timm_trunk().items()}}
    path = tmp_path / fmt
    save_file(state, str(path)) if fmt.endswith(".safetensors") else torch.save(state, path)
    flavour = _conv_flavour()
    weights = load_convnext_weights(path, flavour)
    assert weights.layout == ("timm" if fmt == "trunk.pt" else "open_clip")
    if fmt != "trunk.pt":
        assert "visual.head.proj.weight" in weights.ignored and "logit_scale" in weights.ignored
    assert weights.overrides == {"norm_eps": EPS, "layer_norm_eps": EPS}
    tower = build_convnext(with_encoder_overrides(flavour, weights))
    weights.load_into(tower)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = convnext_feature_map(tower.eval(), x)
        ref = _timm_forward(_timm_trunk(), x)
    assert ours.shape == ref.shape == (2, DIMS[-1], 4, 4)
    _report(f"convnext {fmt} vs timm-layout forward", (ours - ref).abs().max().item())
    # transformers' own eps (1e-6) inside the tower would not match the trunk's 1e-5 as closely
    loose = build_convnext(from_name("debug", convnext=dict(hidden_sizes=DIMS, depths=DEPTHS)))
    loose.load_state_dict(weights.tensors())
    with torch.no_grad():
        assert (convnext_feature_map(loose.eval(), x) - ref).abs().max() > (ours - ref).abs().max()


def test_published_convnext_xxlarge_shapes_fit_the_real_flavours():
    """open_clip convnext_xxlarge's trunk shapes (meta tensors) → the paper flavours' ConvNeXt."""
    dims, depths = [384, 768, 1536, 3072], [3, 4, 30, 3]
    with torch.device("meta"):
        s = {"stem.0.weight": torch.empty(384, 3, 4, 4), "stem.0.bias": torch.empty(384),
             "stem.1.weight": torch.empty(384), "stem.1.bias": torch.empty(384),
             "head.norm.weight": torch.empty(3072), "head.norm.bias": torch.empty(3072)}
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i:
                s.update({f"stages.{i}.downsample.0.weight": torch.empty(dims[i - 1]),
                          f"stages.{i}.downsample.0.bias": torch.empty(dims[i - 1]),
                          f"stages.{i}.downsample.1.weight": torch.empty(dim, dims[i - 1], 2, 2),
                          f"stages.{i}.downsample.1.bias": torch.empty(dim)})
            for j in range(depth):
                p = f"stages.{i}.blocks.{j}."
                for name, shape in [("gamma", [dim]), ("conv_dw.weight", [dim, 1, 7, 7]), ("conv_dw.bias", [dim]),
                                    ("norm.weight", [dim]), ("norm.bias", [dim]), ("mlp.fc1.weight", [4 * dim, dim]),
                                    ("mlp.fc1.bias", [4 * dim]), ("mlp.fc2.weight", [dim, 4 * dim]),
                                    ("mlp.fc2.bias", [dim])]:
                    s[p + name] = torch.empty(shape)
    for name in ("tiny", "intern2", "plus", "moe"):
        w = convnext_from_timm(s, from_name(name), source="convnext_xxlarge")
        assert w.overrides["norm_eps"] == 1e-5 and len(w.state) == len(s)


# ---------------------------------------------------------------- ConvNeXt, Hugging Face directory


@pytest.mark.parametrize("cls", [ConvNextModel, ConvNextForImageClassification])
def test_convnext_hf_directory_matches_transformers(tmp_path, cls):
    config = ConvNextConfig(num_stages=3, hidden_sizes=DIMS, depths=DEPTHS, num_labels=5)
    ref = _randomise(cls(config))
    ref.save_pretrained(str(tmp_path / "convnext"))
    flavour = _conv_flavour()  # norm_eps 1e-5 in the flavour; the HF directory brings transformers' own
    weights = load_convnext_weights(tmp_path / "convnext", flavour)
    assert weights.overrides["norm_eps"] == 1e-6 and weights.overrides["layer_norm_eps"] == config.layer_norm_eps
    if cls is ConvNextForImageClassification:
        assert weights.ignored == ("classifier.bias", "classifier.weight")
    tower = build_convnext(with_encoder_overrides(flavour, weights))
    weights.load_into(tower)
    base = ref.convnext if cls is ConvNextForImageClassification else ref
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = convnext_feature_map(tower.eval(), x)
        hidden = base(pixel_values=x).last_hidden_state
        theirs = base.layernorm(hidden.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    _report(f"convnext hf {cls.__name__}", (ours - theirs).abs().max().item())


def test_convnext_bad_inputs_name_file_and_key(tmp_path):
    flavour = _conv_flavour()
    with pytest.raises(UserError, match="weights file not found"):
        load_convnext_weights(tmp_path / "nope.safetensors", flavour)
    state = _open_clip_checkpoint()
    state["visual.trunk.stages.1.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 16)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"bad\.safetensors.*encoder\.stages\.1\.layers\.0\.pwconv1\.weight "
                                        r"\[3, 16\] != \[64, 16\]"):
        load_convnext_weights(tmp_path / "bad.safetensors", flavour)
    deeper = _timm_trunk()
    deeper["stages.2.blocks.1.gamma"] = torch.zeros(24)
    with pytest.raises(UserError, match=r"unexpected keys \(1\): encoder\.stages\.2\.layers\.1\.layer_scale_parameter"):
        convnext_from_timm(deeper, flavour, source="deeper.pt")
    vit = {"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "visual.class_embedding": torch.zeros(4)}
    save_file(vit, str(tmp_path / "vit.safetensors"))
    with pytest.raises(UserError, match=r"vit\.safetensors is an open_clip checkpoint whose image tower is not"):
        load_convnext_weights(tmp_path / "vit.safetensors", flavour)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"cannot read weights file .*junk\.bin"):
        load_convnext_weights(tmp_path / "junk.bin", flavour)
