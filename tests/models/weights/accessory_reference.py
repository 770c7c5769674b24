"""A toy LLaMA2-Accessory SPHINX-Tiny release, and the reference forward written from the official code.

Nothing here imports models.weights.accessory: the checkpoint is split into model-parallel shards by
this file's own table, the LLM runs in Meta's layout (complex rotary on interleaved pairs,
accessory/model/LLM/llama.py), the ConvNeXt as timm's trunk and DINOv2 as the torch.hub model
(positions interpolated at run time with its 0.1 offset), composed as llama_ens*_light's
``encode_image`` / ``forward`` do: ``[bos, (start, 257 tokens, end) per view, caption]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXTS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "### Human: What colour is the square?\n### Assistant: It is red.\n###",
    "How many circles are there? Three blue circles on a white mat.",
    "Read the word: apple banana cherry. Numbers 12345 and 67890.",
]

# The toy's shapes (flavours debug-sphinx-tiny[-1k]): the debug LLM in Meta's ModelArgs, both encoders
# on 64 px views as they are (no resize anywhere)
ARGS = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "ffn_dim_multiplier": None,
        "norm_eps": 1e-5, "rope_theta": 10000.0}
FFN = 352  # int(2·4·128/3) = 341 → rounded up to a multiple of 32
CONVNEXT = dict(dims=[32, 64, 96], depths=[1, 1, 1], patch=4)
DINO = dict(dim=64, layers=2, heads=4, patch=16, hidden=88, grid=6)  # hub positions for a 96 px input

# fairscale layers of llama_ens*_light (the test's own table): weight name → split dim
_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROW = ("attention.wo", "feed_forward.w2")


def train_sentencepiece(directory: Path, vocab_size: int = 400) -> Path:
    """A Llama-style BPE sentencepiece model (byte fallback, dummy prefix, no normalisation)."""
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory / "tokenizer.model"


@dataclass
class ToyRelease:
    directory: Path
    state: dict[str, torch.Tensor]  # the full model, Meta layout, no "llma." prefix
    n_words: int
    views: int  # per image: 1 (llama_ens_light) or 5 (llama_ens5_light)
    args: dict  # config.json


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.05, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale + offset


def toy_state(n_words: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hd = ARGS["dim"], ARGS["dim"] // ARGS["n_heads"]
    kv = ARGS["n_kv_heads"] * hd
    s = {"tok_embeddings.weight": _rand(g, n_words, d, scale=0.5), "norm.weight": _rand(g, d, offset=1.0),
         "output.weight": _rand(g, n_words, d, scale=0.1)}
    for i in range(ARGS["n_layers"]):
        p = f"layers.{i}."
        s[p + "attention.wq.weight"] = _rand(g, d, d, scale=0.15)
        s[p + "attention.wk.weight"] = _rand(g, kv, d, scale=0.15)
        s[p + "attention.wv.weight"] = _rand(g, kv, d, scale=0.1)
        s[p + "attention.wo.weight"] = _rand(g, d, d, scale=0.1)
        s[p + "feed_forward.w1.weight"] = _rand(g, FFN, d, scale=0.1)
        s[p + "feed_forward.w3.weight"] = _rand(g, FFN, d, scale=0.1)
        s[p + "feed_forward.w2.weight"] = _rand(g, d, FFN, scale=0.1)
        s[p + "attention_norm.weight"] = _rand(g, d, offset=1.0)
        s[p + "ffn_norm.weight"] = _rand(g, d, offset=1.0)
    # open_clip's timm ConvNeXt trunk
    c = "openclip_convnext_xxl."
    dims = CONVNEXT["dims"]
    s[c + "stem.0.weight"], s[c + "stem.0.bias"] = _rand(g, dims[0], 3, 4, 4, scale=0.2), _rand(g, dims[0])
    s[c + "stem.1.weight"], s[c + "stem.1.bias"] = _rand(g, dims[0], offset=1.0), _rand(g, dims[0])
    for st, (dim, depth) in enumerate(zip(dims, CONVNEXT["depths"])):
        if st:
            q = f"{c}stages.{st}.downsample."
            s[q + "0.weight"], s[q + "0.bias"] = _rand(g, dims[st - 1], offset=1.0), _rand(g, dims[st - 1])
            s[q + "1.weight"], s[q + "1.bias"] = _rand(g, dim, dims[st - 1], 2, 2, scale=0.1), _rand(g, dim)
        for b in range(depth):
            q = f"{c}stages.{st}.blocks.{b}."
            s[q + "conv_dw.weight"], s[q + "conv_dw.bias"] = _rand(g, dim, 1, 7, 7, scale=0.1), _rand(g, dim)
            s[q + "norm.weight"], s[q + "norm.bias"] = _rand(g, dim, offset=1.0), _rand(g, dim)
            s[q + "mlp.fc1.weight"], s[q + "mlp.fc1.bias"] = _rand(g, 4 * dim, dim, scale=0.1), _rand(g, 4 * dim)
            s[q + "mlp.fc2.weight"], s[q + "mlp.fc2.bias"] = _rand(g, dim, 4 * dim, scale=0.1), _rand(g, dim)
            s[q + "gamma"] = _rand(g, dim, scale=0.3, offset=0.5)
    s[c + "head.norm.weight"], s[c + "head.norm.bias"] = _rand(g, dims[-1], offset=1.0), _rand(g, dims[-1])
    # torch.hub DINOv2 (SwiGLUFFNFused: mlp.w12, mlp.w3; LayerScale ls1 / ls2)
    v = "dinov2_vitg14."
    dd, hid = DINO["dim"], DINO["hidden"]
    s[v + "cls_token"], s[v + "mask_token"] = _rand(g, 1, 1, dd, scale=0.5), torch.zeros(1, dd)
    s[v + "pos_embed"] = _rand(g, 1, 1 + DINO["grid"] ** 2, dd, scale=0.5)
    s[v + "patch_embed.proj.weight"] = _rand(g, dd, 3, DINO["patch"], DINO["patch"], scale=0.05)
    s[v + "patch_embed.proj.bias"] = _rand(g, dd)
    for i in range(DINO["layers"]):
        q = f"{v}blocks.{i}."
        s[q + "norm1.weight"], s[q + "norm1.bias"] = _rand(g, dd, offset=1.0), _rand(g, dd)
        s[q + "attn.qkv.weight"], s[q + "attn.qkv.bias"] = _rand(g, 3 * dd, dd, scale=0.15), _rand(g, 3 * dd)
        s[q + "attn.proj.weight"], s[q + "attn.proj.bias"] = _rand(g, dd, dd, scale=0.1), _rand(g, dd)
        s[q + "ls1.gamma"], s[q + "ls2.gamma"] = _rand(g, dd, scale=0.3, offset=0.5), _rand(g, dd, scale=0.3, offset=0.5)
        s[q + "norm2.weight"], s[q + "norm2.bias"] = _rand(g, dd, offset=1.0), _rand(g, dd)
        s[q + "mlp.w12.weight"], s[q + "mlp.w12.bias"] = _rand(g, 2 * hid, dd, scale=0.1), _rand(g, 2 * hid)
        s[q + "mlp.w3.weight"], s[q + "mlp.w3.bias"] = _rand(g, dd, hid, scale=0.1), _rand(g, dd)
    s[v + "norm.weight"], s[v + "norm.bias"] = _rand(g, dd, offset=1.0), _rand(g, dd)
    s["visual_proj.0.weight"] = _rand(g, ARGS["dim"], dims[-1] + dd, scale=0.1)
    s["visual_proj.0.bias"] = _rand(g, ARGS["dim"])
    s["visual_proj.1.weight"], s["visual_proj.1.bias"] = _rand(g, ARGS["dim"], offset=1.0), _rand(g, ARGS["dim"])
    s["start_img"], s["end_img"] = torch.rand(1, 1, ARGS["dim"], generator=g), torch.rand(1, 1, ARGS["dim"], generator=g)
    return s


def shard(state: dict[str, torch.Tensor], mp: int) -> list[dict[str, torch.Tensor]]:
    """Split as fairscale does: column-parallel on dim 0, row-parallel and the embedding on dim 1."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, value in state.items():
        name = key.rsplit(".", 1)[0].split(".", 2)[-1] if key.startswith("layers.") else key.rsplit(".", 1)[0]
        if name in _COLUMN or key == "output.weight":
            parts = value.chunk(mp, dim=0)
        elif name in _ROW or key == "tok_embeddings.weight":
            parts = value.chunk(mp, dim=1)
        else:
            parts = [value] * mp
        for rank in range(mp):
            out[rank]["llma." + key] = parts[rank].clone()
    return out


def make_toy_release(directory: Path, *, llama_type: str = "llama_ens5_light", mp: int = 2, seed: int = 0,
                     dtype: torch.dtype = torch.float32, args_extra: dict | None = None) -> ToyRelease:
    """Write consolidated.NN-of-MM.model.pth, tokenizer.model, config.json, meta.json."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model_file = train_sentencepiece(directory)
    n_words = spm.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
    state = toy_state(n_words, seed)
    for rank, part in enumerate(shard(state, mp)):
        torch.save({"model": {k: v.to(dtype) for k, v in part.items()}},
                   directory / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
    args = {**ARGS, **(args_extra or {})}
    (directory / "config.json").write_text(json.dumps(args))
    (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    return ToyRelease(directory, {k: v.to(dtype).float() for k, v in state.items()}, n_words,
                      views=5 if llama_type == "llama_ens5_light" else 1, args=args)


# ----------------------------------------------------------------------------- reference forward


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def meta_llama(state: dict[str, torch.Tensor], h: torch.Tensor, args: dict = ARGS, ffn: dict | None = None) -> torch.Tensor:
    """Embeddings [B, T, d] → logits [B, T, V]: accessory's Transformer (Meta layout, complex rotary);
    ``ffn``: {layer: its feed-forward} in place of the dense SwiGLU (the MoE releases)."""
    d, H = args["dim"], args["n_heads"]
    K = args.get("n_kv_heads") or H
    hd, eps, (B, T, _) = d // H, args["norm_eps"], h.shape
    freqs = 1.0 / (args["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    t = torch.arange(T).float() * (args.get("rope_scaling") or 1.0)
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(t, freqs))

    def rope(x: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    for i in range(args["n_layers"]):
        p = f"layers.{i}."
        x = _rms(h, state[p + "attention_norm.weight"], eps)
        q = rope((x @ state[p + "attention.wq.weight"].T).view(B, T, H, hd))
        k = rope((x @ state[p + "attention.wk.weight"].T).view(B, T, K, hd))
        v = (x @ state[p + "attention.wv.weight"].T).view(B, T, K, hd)
        k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + att.transpose(1, 2).reshape(B, T, d) @ state[p + "attention.wo.weight"].T
        x = _rms(h, state[p + "ffn_norm.weight"], eps)
        if ffn is not None:
            h = h + ffn[i](x)
            continue
        ff = F.silu(x @ state[p + "feed_forward.w1.weight"].T) * (x @ state[p + "feed_forward.w3.weight"].T)
        h = h + ff @ state[p + "feed_forward.w2.weight"].T
    return _rms(h, state["norm.weight"], eps) @ state["output.weight"].T


def _ln2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def timm_convnext(state: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-6,
                  depths: list[int] | None = None) -> torch.Tensor:
    """open_clip's trunk with head.global_pool / head.flatten = Identity: [V, 3, H, W] → [V, C, H/16, W/16]
    (``depths``: the stages' depths, default the toy's three)."""
    c = "openclip_convnext_xxl."
    x = F.conv2d(x, state[c + "stem.0.weight"], state[c + "stem.0.bias"], stride=CONVNEXT["patch"])
    x = _ln2d(x, state[c + "stem.1.weight"], state[c + "stem.1.bias"], eps)
    for st, depth in enumerate(depths or CONVNEXT["depths"]):
        if st:
            q = f"{c}stages.{st}.downsample."
            x = _ln2d(x, state[q + "0.weight"], state[q + "0.bias"], eps)
            x = F.conv2d(x, state[q + "1.weight"], state[q + "1.bias"], stride=2)
        for b in range(depth):
            q = f"{c}stages.{st}.blocks.{b}."
            r = x
            x = F.conv2d(x, state[q + "conv_dw.weight"], state[q + "conv_dw.bias"], padding=3, groups=x.shape[1])
            x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), state[q + "norm.weight"], state[q + "norm.bias"], eps)
            x = F.linear(F.gelu(F.linear(x, state[q + "mlp.fc1.weight"], state[q + "mlp.fc1.bias"])),
                         state[q + "mlp.fc2.weight"], state[q + "mlp.fc2.bias"])
            x = (x * state[q + "gamma"]).permute(0, 3, 1, 2) + r
    return _ln2d(x, state[c + "head.norm.weight"], state[c + "head.norm.bias"], eps)


def hub_dino(state: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-6, patch: int | None = None) -> torch.Tensor:
    """facebookresearch/dinov2 forward_features: [V, 3, H, W] → norm([CLS, patches]) [V, 1 + n, C]."""
    v = "dinov2_vitg14."
    heads, p = DINO["heads"], patch or DINO["patch"]
    B = x.shape[0]
    w0, h0 = x.shape[-1] // p, x.shape[-2] // p
    x = F.conv2d(x, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=p)
    x = torch.cat([state[v + "cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = state[v + "pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    if w0 * h0 != M * M:  # DinoVisionTransformer.interpolate_pos_encoding (interpolate_offset 0.1)
        patch = F.interpolate(pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                              scale_factor=((w0 + 0.1) / M, (h0 + 0.1) / M))
        pos = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, w0 * h0, -1)], dim=1)
    x = x + pos
    C = x.shape[-1]
    for i in range(DINO["layers"]):
        q = f"{v}blocks.{i}."
        y = F.layer_norm(x, (C,), state[q + "norm1.weight"], state[q + "norm1.bias"], eps)
        qkv = F.linear(y, state[q + "attn.qkv.weight"], state[q + "attn.qkv.bias"])
        qkv = qkv.reshape(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, -1, C)
        x = x + F.linear(att, state[q + "attn.proj.weight"], state[q + "attn.proj.bias"]) * state[q + "ls1.gamma"]
        y = F.layer_norm(x, (C,), state[q + "norm2.weight"], state[q + "norm2.bias"], eps)
        x12 = F.linear(y, state[q + "mlp.w12.weight"], state[q + "mlp.w12.bias"])
        x1, x2 = x12.chunk(2, dim=-1)
        x = x + F.linear(F.silu(x1) * x2, state[q + "mlp.w3.weight"], state[q + "mlp.w3.bias"]) * state[q + "ls2.gamma"]
    return F.layer_norm(x, (C,), state[v + "norm.weight"], state[v + "norm.bias"], eps)


def release_image(image, size: int) -> torch.Tensor:
    """A PIL RGB image → the release's model input [1, 3, size, size]: SPHINX/sphinx.py:32-35's
    get_transform("padded_resize", size), i.e. PadToSquare (a max(w, h) square of int(mean·255), the image
    pasted at ((side - w) // 2, (side - h) // 2)), Resize(size, BICUBIC) of the PIL square, ToTensor,
    Normalize(CLIP) (accessory/data/transform.py:11-34, 57-65)."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    if w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    x = torch.from_numpy(np.array(image.resize((size, size), Image.BICUBIC))).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))[None]


def image_tokens(state: dict[str, torch.Tensor], views: torch.Tensor) -> torch.Tensor:
    """uint8 views [V, S, S, 3] of ONE image (global view first), each encoder taking them as they are
    → [V·(N + 2), d]: llama_ens*_light's encode_image (mean of the conv tokens as CLS, channel concat,
    visual_proj) and the start/end per view.

    The pixels are ToTensor'd and CLIP-normalised (the ConvNeXt's input); DINOv2's input is the
    release's re-normalisation of those: x·(clip_std/dino_std) + (clip_mean - dino_mean)/dino_std."""
    x = views.permute(0, 3, 1, 2).float()
    clip_mean, clip_std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    dino_mean, dino_std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    clip_in = (x / 255 - clip_mean) / clip_std
    return _view_tokens(state, clip_in, clip_in * (clip_std / dino_std) + (clip_mean - dino_mean) / dino_std)


def release_image_tokens(release: ToyRelease, image: torch.Tensor) -> torch.Tensor:
    """The release's input [1, 3, C, C] (release_image; C = 64, or 128 for the 1k toy) → [V·(N + 2), d], each
    encoder's views made by encode_image's own fp16 resize-then-crop at the toy's sizes (its 224 and 512
    are the toy's 64, its 448 the toy's 128):
    llama_ens_light.py:370-373: DINOv2 bicubic fp16 -> 224, the ConvNeXt nearest fp16 -> 512;
    llama_ens5_light.py:370-384: DINOv2 bicubic fp16 -> 224 and the quarters of bicubic fp16 -> 448, the
    ConvNeXt bicubic fp16 -> 512 and the quarters of the image itself."""
    half = lambda x, size, **kw: F.interpolate(x.half(), size=(size, size), **kw).to(x)  # noqa: E731
    side = DINO["patch"] * 4  # the toy's "224" and "512": 64

    def quarters(x: torch.Tensor) -> list[torch.Tensor]:
        h = x.shape[-1] // 2
        return [x[..., :h, :h], x[..., :h, h:], x[..., h:, :h], x[..., h:, h:]]

    if release.views == 1:
        x224, conv_in = half(image, side, mode="bicubic"), half(image, side)
    else:
        x224 = torch.cat([half(image, side, mode="bicubic")] + quarters(half(image, 2 * side, mode="bicubic")))
        conv_in = torch.cat([half(image, side, mode="bicubic")] + quarters(image))
    clip_mean, clip_std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    dino_mean, dino_std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return _view_tokens(release.state, conv_in, (x224 * clip_std + clip_mean - dino_mean) / dino_std)


def _view_tokens(state: dict[str, torch.Tensor], conv_in: torch.Tensor, dino_in: torch.Tensor) -> torch.Tensor:
    """Each encoder's input [V, 3, ·, ·] → [V·(N + 2), d] (llama_ens*_light's encode_image and forward)."""
    conv = timm_convnext(state, conv_in).flatten(-2).permute(0, 2, 1)
    conv = torch.cat([conv.mean(dim=1, keepdim=True), conv], dim=1)
    feats = torch.cat([conv, hub_dino(state, dino_in)], dim=2)
    proj = F.layer_norm(F.linear(feats, state["visual_proj.0.weight"], state["visual_proj.0.bias"]),
                        (state["visual_proj.1.weight"].shape[0],),
                        state["visual_proj.1.weight"], state["visual_proj.1.bias"], 1e-5)
    start, end = state["start_img"][0], state["end_img"][0]
    return torch.cat([torch.cat([start, view, end]) for view in proj])


def release_logits(release: ToyRelease, bos: int, caption: list[int], views: torch.Tensor | None,
                   image: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [1, T, V] of ``[bos, image (if any), caption]`` as the release's forward lays it out; the image as
    uint8 ``views`` the encoders take as they are (image_tokens), or as the release's input ``image``
    [1, 3, C, C] (release_image_tokens)."""
    s = release.state
    h = s["tok_embeddings.weight"][torch.tensor([bos] + caption)][None]
    if views is not None or image is not None:
        img = image_tokens(s, views) if image is None else release_image_tokens(release, image)
        h = torch.cat([h[:, :1], img[None], h[:, 1:]], dim=1)
    return meta_llama(s, h, release.args)
