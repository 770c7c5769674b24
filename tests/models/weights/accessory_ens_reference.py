"""Toy four-branch SPHINX releases (llama_ens, llama_ens5, mixtral_sparse_ens, mixtral_sparse_ens5) and their
forward written from the release code (LLaMA2-Accessory accessory/model/LLM/*.py at 3777c43).

Nothing here imports models.weights: the checkpoint is written in the release's key layout (``llma.`` prefix,
open_clip's ``clip.visual.*`` with the text tower's leftovers, ``Blip2Model``'s ``qformer.*`` as transformers
4.27 saved it: ``self_attn.q_bias`` / ``v_bias``, the Q-Former layers' text feed-forward), split into
model-parallel shards by this file's own rules (fairscale's for the dense layers, ``_sparse_expert_split`` for
the experts). The forward is functional torch: open_clip's ViT, BLIP-2's ViT and Q-Former (BERT layers with
cross-attention every ``cross_attention_frequency``), timm's ConvNeXt and the hub DINOv2 (from
accessory_reference), Meta's Llama and the release's MoE (softmax, top-k, renormalise, per-expert SwiGLU),
composed as each ``encode_image`` / ``forward`` does: ``[bos, (start, Q queries, N tokens, end) per view, caption]``,
from the release's own input image (accessory_reference.release_image) through encode_image's fp16
resize-then-crop (encoder_inputs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from accessory_reference import (ARGS, CLIP_MEAN, CLIP_STD, FFN, IMAGENET_MEAN, IMAGENET_STD, _rand, hub_dino,
                                 meta_llama, timm_convnext, train_sentencepiece)

MOE_TYPES = ("mixtral_sparse_ens", "mixtral_sparse_ens5")
MOE_ARGS = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96, "norm_eps": 1e-5,
            "rope_theta": 1e6, "moe": {"num_experts": 4, "num_experts_per_tok": 2}}
# per llama_type: the view side, the ConvNeXt (dims, depths, its input side), the ViTs' patch
TOYS = {
    "llama_ens": dict(side=56, conv_dims=[16, 24, 32, 96], conv_depths=[1, 1, 1, 1], conv_input=64, patch=14, views=1),
    "llama_ens5": dict(side=56, conv_dims=[16, 24, 32, 96], conv_depths=[1, 1, 1, 1], conv_input=64, patch=14, views=5),
    "mixtral_sparse_ens": dict(side=64, conv_dims=[32, 64, 96], conv_depths=[1, 1, 1], conv_input=64, patch=16, views=1),
    "mixtral_sparse_ens5": dict(side=64, conv_dims=[32, 64, 96], conv_depths=[1, 1, 1], conv_input=64, patch=16,
                                views=5),
}
FLAVOURS = {"llama_ens": "debug-sphinx", "llama_ens5": "debug-sphinx-1k", "mixtral_sparse_ens": "debug-sphinx-moe",
            "mixtral_sparse_ens5": "debug-sphinx-moe-1k"}
CLIP = dict(width=40, layers=2, heads=4, mlp=80)
BLIP_VIT = dict(width=48, layers=2, heads=4, mlp=96)
QFORMER = dict(width=32, layers=2, heads=4, mlp=64, cross_every=2, queries=4)
DINO = dict(dim=64, layers=2, heads=4, hidden=88, grid=6)


@dataclass
class ToyEnsRelease:
    directory: Path
    llama_type: str
    state: dict[str, torch.Tensor]  # the full model, no "llma." prefix
    n_words: int
    args: dict

    @property
    def toy(self) -> dict:
        return TOYS[self.llama_type]

    @property
    def canvas(self) -> int:
        """The side of the release's input image (the real 224, 224 · 2, 512, 512 · 2)."""
        return self.toy["side"] * (2 if self.toy["views"] > 1 else 1)


def _llm_state(g: torch.Generator, n_words: int, moe: bool) -> dict[str, torch.Tensor]:
    args = MOE_ARGS if moe else ARGS
    d, hd = args["dim"], args["dim"] // args["n_heads"]
    kv = args["n_kv_heads"] * hd
    s = {"tok_embeddings.weight": _rand(g, n_words, d, scale=0.5), "norm.weight": _rand(g, d, offset=1.0),
         "output.weight": _rand(g, n_words, d, scale=0.1)}
    for i in range(args["n_layers"]):
        p = f"layers.{i}."
        s[p + "attention.wq.weight"] = _rand(g, d, d, scale=0.15)
        s[p + "attention.wk.weight"] = _rand(g, kv, d, scale=0.15)
        s[p + "attention.wv.weight"] = _rand(g, kv, d, scale=0.1)
        s[p + "attention.wo.weight"] = _rand(g, d, d, scale=0.1)
        if moe:
            e, f = args["moe"]["num_experts"], args["hidden_dim"]
            s[p + "feed_forward.gate.weight"] = _rand(g, e, d, scale=0.3)
            for w in ("w1", "w2", "w3"):  # nn.Parameter [E·f, d], no ".weight"
                s[p + f"feed_forward.{w}"] = _rand(g, e * f, d, scale=0.1)
        else:
            s[p + "feed_forward.w1.weight"] = _rand(g, FFN, d, scale=0.1)
            s[p + "feed_forward.w3.weight"] = _rand(g, FFN, d, scale=0.1)
            s[p + "feed_forward.w2.weight"] = _rand(g, d, FFN, scale=0.1)
        s[p + "attention_norm.weight"] = _rand(g, d, offset=1.0)
        s[p + "ffn_norm.weight"] = _rand(g, d, offset=1.0)
    return s


def _convnext_state(g: torch.Generator, dims: list[int], depths: list[int]) -> dict[str, torch.Tensor]:
    c, s = "openclip_convnext_xxl.", {}
    s[c + "stem.0.weight"], s[c + "stem.0.bias"] = _rand(g, dims[0], 3, 4, 4, scale=0.2), _rand(g, dims[0])
    s[c + "stem.1.weight"], s[c + "stem.1.bias"] = _rand(g, dims[0], offset=1.0), _rand(g, dims[0])
    for st, (dim, depth) in enumerate(zip(dims, depths)):
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
    return s


def _dino_state(g: torch.Generator, patch: int) -> dict[str, torch.Tensor]:
    v, dd, hid, s = "dinov2_vitg14.", DINO["dim"], DINO["hidden"], {}
    s[v + "cls_token"], s[v + "mask_token"] = _rand(g, 1, 1, dd, scale=0.5), torch.zeros(1, dd)
    s[v + "pos_embed"] = _rand(g, 1, 1 + DINO["grid"] ** 2, dd, scale=0.5)
    s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"] = _rand(g, dd, 3, patch, patch), _rand(g, dd)
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
    return s


def _clip_state(g: torch.Generator, patch: int, side: int) -> dict[str, torch.Tensor]:
    """open_clip's CLIP with transformer = None: the visual tower plus the text side's leftovers."""
    w, m, n = CLIP["width"], CLIP["mlp"], (side // patch) ** 2 + 1
    c, s = "clip.visual.", {}
    s[c + "conv1.weight"] = _rand(g, w, 3, patch, patch, scale=0.05)
    s[c + "class_embedding"], s[c + "positional_embedding"] = _rand(g, w, scale=0.5), _rand(g, n, w, scale=0.3)
    s[c + "ln_pre.weight"], s[c + "ln_pre.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
    for i in range(CLIP["layers"]):
        q = f"{c}transformer.resblocks.{i}."
        s[q + "ln_1.weight"], s[q + "ln_1.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
        s[q + "attn.in_proj_weight"], s[q + "attn.in_proj_bias"] = _rand(g, 3 * w, w, scale=0.15), _rand(g, 3 * w)
        s[q + "attn.out_proj.weight"], s[q + "attn.out_proj.bias"] = _rand(g, w, w, scale=0.1), _rand(g, w)
        s[q + "ln_2.weight"], s[q + "ln_2.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
        s[q + "mlp.c_fc.weight"], s[q + "mlp.c_fc.bias"] = _rand(g, m, w, scale=0.1), _rand(g, m)
        s[q + "mlp.c_proj.weight"], s[q + "mlp.c_proj.bias"] = _rand(g, w, m, scale=0.1), _rand(g, w)
    s[c + "ln_post.weight"], s[c + "ln_post.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
    s[c + "proj"] = _rand(g, w, 24)
    s["clip.token_embedding.weight"], s["clip.positional_embedding"] = _rand(g, 50, 24), _rand(g, 7, 24)
    s["clip.ln_final.weight"], s["clip.ln_final.bias"] = _rand(g, 24, offset=1.0), _rand(g, 24)
    s["clip.text_projection"], s["clip.logit_scale"] = _rand(g, 24, 24), torch.tensor(4.6)
    return s


def _qformer_state(g: torch.Generator, patch: int, side: int) -> dict[str, torch.Tensor]:
    """Blip2Model without language_projection / language_model, as transformers 4.27 named it."""
    w, m, n = BLIP_VIT["width"], BLIP_VIT["mlp"], (side // patch) ** 2 + 1
    v, s = "qformer.vision_model.", {}
    s[v + "embeddings.class_embedding"] = _rand(g, 1, 1, w, scale=0.5)
    s[v + "embeddings.position_embedding"] = _rand(g, 1, n, w, scale=0.3)
    s[v + "embeddings.patch_embedding.weight"] = _rand(g, w, 3, patch, patch, scale=0.05)
    s[v + "embeddings.patch_embedding.bias"] = _rand(g, w)
    for i in range(BLIP_VIT["layers"]):
        q = f"{v}encoder.layers.{i}."
        s[q + "self_attn.qkv.weight"] = _rand(g, 3 * w, w, scale=0.15)
        s[q + "self_attn.q_bias"], s[q + "self_attn.v_bias"] = _rand(g, w), _rand(g, w)
        s[q + "self_attn.projection.weight"], s[q + "self_attn.projection.bias"] = _rand(g, w, w, scale=0.1), _rand(g, w)
        s[q + "layer_norm1.weight"], s[q + "layer_norm1.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
        s[q + "mlp.fc1.weight"], s[q + "mlp.fc1.bias"] = _rand(g, m, w, scale=0.1), _rand(g, m)
        s[q + "mlp.fc2.weight"], s[q + "mlp.fc2.bias"] = _rand(g, w, m, scale=0.1), _rand(g, w)
        s[q + "layer_norm2.weight"], s[q + "layer_norm2.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
    s[v + "post_layernorm.weight"], s[v + "post_layernorm.bias"] = _rand(g, w, offset=1.0), _rand(g, w)
    h, hm, q0 = QFORMER["width"], QFORMER["mlp"], "qformer.qformer."
    s["qformer.query_tokens"] = _rand(g, 1, QFORMER["queries"], h, scale=0.5)
    s[q0 + "layernorm.weight"], s[q0 + "layernorm.bias"] = _rand(g, h, offset=1.0), _rand(g, h)

    def attention(prefix: str, kv_width: int) -> None:
        for name, width in (("query", h), ("key", kv_width), ("value", kv_width)):
            s[f"{prefix}attention.{name}.weight"] = _rand(g, h, width, scale=0.15)
            s[f"{prefix}attention.{name}.bias"] = _rand(g, h)
        s[prefix + "output.dense.weight"], s[prefix + "output.dense.bias"] = _rand(g, h, h, scale=0.1), _rand(g, h)
        s[prefix + "output.LayerNorm.weight"], s[prefix + "output.LayerNorm.bias"] = _rand(g, h, offset=1.0), _rand(g, h)

    for i in range(QFORMER["layers"]):
        q = f"{q0}encoder.layer.{i}."
        attention(q + "attention.", h)
        if i % QFORMER["cross_every"] == 0:
            attention(q + "crossattention.", w)
        for ffn in ("", "_query"):  # the text feed-forward (unused by queries), then the queries'
            s[q + f"intermediate{ffn}.dense.weight"] = _rand(g, hm, h, scale=0.1)
            s[q + f"intermediate{ffn}.dense.bias"] = _rand(g, hm)
            s[q + f"output{ffn}.dense.weight"], s[q + f"output{ffn}.dense.bias"] = _rand(g, h, hm, scale=0.1), _rand(g, h)
            s[q + f"output{ffn}.LayerNorm.weight"] = _rand(g, h, offset=1.0)
            s[q + f"output{ffn}.LayerNorm.bias"] = _rand(g, h)
    return s


def toy_state(llama_type: str, n_words: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toy, moe = TOYS[llama_type], llama_type in MOE_TYPES
    d = (MOE_ARGS if moe else ARGS)["dim"]
    s = _llm_state(g, n_words, moe)
    s.update(_convnext_state(g, toy["conv_dims"], toy["conv_depths"]))
    s.update(_dino_state(g, toy["patch"]))
    s.update(_clip_state(g, toy["patch"], toy["side"]))
    s.update(_qformer_state(g, toy["patch"], toy["side"]))
    s["visual_proj.0.weight"] = _rand(g, d, CLIP["width"] + toy["conv_dims"][-1] + DINO["dim"], scale=0.1)
    s["visual_proj.0.bias"] = _rand(g, d)
    s["visual_proj.1.weight"], s["visual_proj.1.bias"] = _rand(g, d, offset=1.0), _rand(g, d)
    s["qformer_proj.0.weight"], s["qformer_proj.0.bias"] = _rand(g, d, QFORMER["width"], scale=0.1), _rand(g, d)
    s["qformer_proj.1.weight"], s["qformer_proj.1.bias"] = _rand(g, d, offset=1.0), _rand(g, d)
    s["start_img"], s["end_img"] = torch.rand(1, 1, d, generator=g), torch.rand(1, 1, d, generator=g)
    return s


_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
           "feed_forward.w3.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def shard(state: dict[str, torch.Tensor], mp: int, experts: int = 0) -> list[dict[str, torch.Tensor]]:
    """fairscale's splits for the dense layers; the release's _sparse_expert_split for the experts
    (view [E, f, d], chunk dim 1); everything else replicated."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, value in state.items():
        local = key.split(".", 2)[-1] if key.startswith("layers.") else key
        if experts and local in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            parts = [p.reshape(-1, value.shape[-1]) for p in value.view(experts, -1, value.shape[-1]).chunk(mp, dim=1)]
        elif local in _COLUMN or key == "output.weight":
            parts = value.chunk(mp, dim=0)
        elif local in _ROW or key == "tok_embeddings.weight":
            parts = value.chunk(mp, dim=1)
        else:
            parts = [value] * mp
        for rank in range(mp):
            out[rank]["llma." + key] = parts[rank].clone()
    return out


def make_toy_ens_release(directory: Path, llama_type: str, *, mp: int = 2, seed: int = 0) -> ToyEnsRelease:
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model_file = train_sentencepiece(directory)
    n_words = spm.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
    state = toy_state(llama_type, n_words, seed)
    moe = llama_type in MOE_TYPES
    args = dict(MOE_ARGS if moe else ARGS)
    for rank, part in enumerate(shard(state, mp, args["moe"]["num_experts"] if moe else 0)):
        torch.save({"model": part}, directory / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
    (directory / "config.json").write_text(json.dumps(args))
    (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    return ToyEnsRelease(directory, llama_type, state, n_words, args)


# ----------------------------------------------------------------------------- reference forward


def _mha(x: torch.Tensor, kv: torch.Tensor, q_w, q_b, k_w, k_b, v_w, v_b, heads: int) -> torch.Tensor:
    B, L, _ = x.shape
    q, k, v = F.linear(x, q_w, q_b), F.linear(kv, k_w, k_b), F.linear(kv, v_w, v_b)
    hd = q.shape[-1] // heads
    split = lambda t: t.view(B, t.shape[1], heads, hd).transpose(1, 2)  # noqa: E731
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / hd ** 0.5, dim=-1) @ split(v)
    return att.transpose(1, 2).reshape(B, L, -1)


def open_clip_vit(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The release's clip_encode_image (llama_ens.py:352-375): every token through ln_post."""
    c, w = "clip.visual.", CLIP["width"]
    x = F.conv2d(x, s[c + "conv1.weight"], stride=s[c + "conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s[c + "class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + s[c + "positional_embedding"]
    x = F.layer_norm(x, (w,), s[c + "ln_pre.weight"], s[c + "ln_pre.bias"])
    for i in range(CLIP["layers"]):
        q = f"{c}transformer.resblocks.{i}."
        y = F.layer_norm(x, (w,), s[q + "ln_1.weight"], s[q + "ln_1.bias"])
        qw, kw, vw = s[q + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = s[q + "attn.in_proj_bias"].chunk(3)
        x = x + F.linear(_mha(y, y, qw, qb, kw, kb, vw, vb, CLIP["heads"]), s[q + "attn.out_proj.weight"],
                         s[q + "attn.out_proj.bias"])
        y = F.layer_norm(x, (w,), s[q + "ln_2.weight"], s[q + "ln_2.bias"])
        y = F.linear(F.gelu(F.linear(y, s[q + "mlp.c_fc.weight"], s[q + "mlp.c_fc.bias"])), s[q + "mlp.c_proj.weight"],
                     s[q + "mlp.c_proj.bias"])
        x = x + y
    return F.layer_norm(x, (w,), s[c + "ln_post.weight"], s[c + "ln_post.bias"])


def blip2_qformer(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Blip2Model.get_qformer_features(x).last_hidden_state: BLIP-2's ViT, then the queries reading it."""
    v, w = "qformer.vision_model.", BLIP_VIT["width"]
    e = s[v + "embeddings.patch_embedding.weight"]
    x = F.conv2d(x, e, s[v + "embeddings.patch_embedding.bias"], stride=e.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "embeddings.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + s[v + "embeddings.position_embedding"]
    for i in range(BLIP_VIT["layers"]):
        q = f"{v}encoder.layers.{i}."
        y = F.layer_norm(x, (w,), s[q + "layer_norm1.weight"], s[q + "layer_norm1.bias"], 1e-6)
        bias = torch.cat([s[q + "self_attn.q_bias"], torch.zeros(w), s[q + "self_attn.v_bias"]])
        qw, kw, vw = s[q + "self_attn.qkv.weight"].chunk(3)
        qb, kb, vb = bias.chunk(3)
        att = _mha(y, y, qw, qb, kw, kb, vw, vb, BLIP_VIT["heads"])
        x = x + F.linear(att, s[q + "self_attn.projection.weight"], s[q + "self_attn.projection.bias"])
        y = F.layer_norm(x, (w,), s[q + "layer_norm2.weight"], s[q + "layer_norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(y, s[q + "mlp.fc1.weight"], s[q + "mlp.fc1.bias"])), s[q + "mlp.fc2.weight"],
                         s[q + "mlp.fc2.bias"])
    image = F.layer_norm(x, (w,), s[v + "post_layernorm.weight"], s[v + "post_layernorm.bias"], 1e-6)
    h, q0 = QFORMER["width"], "qformer.qformer."
    ln = lambda t, p: F.layer_norm(t, (h,), s[p + ".weight"], s[p + ".bias"], 1e-12)  # noqa: E731
    x = ln(s["qformer.query_tokens"].expand(image.shape[0], -1, -1), q0 + "layernorm")

    def attention(p: str, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        a = _mha(x, kv, *(s[f"{p}attention.{n}.{t}"] for n in ("query", "key", "value") for t in ("weight", "bias")),
                 QFORMER["heads"])
        return ln(F.linear(a, s[p + "output.dense.weight"], s[p + "output.dense.bias"]) + x, p + "output.LayerNorm")

    for i in range(QFORMER["layers"]):
        p = f"{q0}encoder.layer.{i}."
        x = attention(p + "attention.", x, x)
        if i % QFORMER["cross_every"] == 0:
            x = attention(p + "crossattention.", x, image)
        y = F.gelu(F.linear(x, s[p + "intermediate_query.dense.weight"], s[p + "intermediate_query.dense.bias"]))
        x = ln(F.linear(y, s[p + "output_query.dense.weight"], s[p + "output_query.dense.bias"]) + x,
               p + "output_query.LayerNorm")
    return x


def meta_mixtral(s: dict[str, torch.Tensor], h: torch.Tensor, args: dict = MOE_ARGS) -> torch.Tensor:
    """Embeddings [1, T, d] → logits: Meta's attention (as meta_llama) and the release's MoE feed-forward
    (mixtral_sparse_ens.py:409-493: softmax in float, top-k, renormalised, SwiGLU experts, x @ w2[e])."""
    d, e, k, f = args["dim"], args["moe"]["num_experts"], args["moe"]["num_experts_per_tok"], args["hidden_dim"]
    ffn = {}

    def moe_ffn(i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"layers.{i}.feed_forward."
        flat = x.reshape(-1, d)
        probs = torch.softmax(F.linear(flat, s[p + "gate.weight"]), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(probs, k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        w1, w2, w3 = (s[p + w].view(e, f, d) for w in ("w1", "w2", "w3"))
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(k):
                ex = int(chosen[t, j])
                out[t] += weights[t, j] * ((F.silu(w1[ex] @ flat[t]) * (w3[ex] @ flat[t])) @ w2[ex])
        return out.view_as(x)

    for i in range(args["n_layers"]):
        ffn[i] = lambda x, i=i: moe_ffn(i, x)
    return meta_llama(s, h, args, ffn=ffn)


def _parts(x: torch.Tensor) -> list[torch.Tensor]:
    """[B, 3, H, H] → its four quarters, as the release lists them: [:h, :h], [:h, h:], [h:, :h], [h:, h:]."""
    h = x.shape[-1] // 2
    return [x[..., :h, :h], x[..., :h, h:], x[..., h:, :h], x[..., h:, h:]]


def _half(x: torch.Tensor, size: int, **kw) -> torch.Tensor:
    """The release's ``F.interpolate(x.half(), size=(size, size), ...).to(x)`` (nearest unless a mode is given)."""
    return F.interpolate(x.half(), size=(size, size), **kw).to(x)


def encoder_inputs(release: ToyEnsRelease, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's input [1, 3, C, C] (release_image) → (what the Q-Former, CLIP and DINOv2 see, what the
    ConvNeXt sees), each [V, 3, ·, ·], global view first: each encode_image's own resize-then-crop in fp16, at
    the toy's sizes (the real 224 is the toy's ``side``, 448 its 2·side, 512 / 256 its ``conv_input``)."""
    lt, side, conv = release.llama_type, release.toy["side"], release.toy["conv_input"]
    if lt == "llama_ens":  # llama_ens.py:377-401: the 224 image as it is; the ConvNeXt's nearest fp16 -> 256
        return image, _half(image, conv)
    if lt == "llama_ens5":  # llama_ens5.py:383-385, then :407 as llama_ens
        x = torch.cat([_half(image, side, mode="bicubic")] + _parts(image), dim=0)
        return x, _half(x, conv)
    if lt == "mixtral_sparse_ens":  # mixtral_sparse_ens.py:669 bicubic fp16 -> 224; :677 nearest fp16 -> 512
        return _half(image, side, mode="bicubic"), _half(image, conv)
    # mixtral_sparse_ens5.py:682-696: the 224 encoders get bicubic fp16 -> 224 and the quarters of bicubic fp16
    # -> 448; the ConvNeXt bicubic fp16 -> 512 and the quarters of the image itself
    x224 = torch.cat([_half(image, side, mode="bicubic")] + _parts(_half(image, 2 * side, mode="bicubic")), dim=0)
    return x224, torch.cat([_half(image, conv, mode="bicubic")] + _parts(image), dim=0)


def image_tokens(release: ToyEnsRelease, image: torch.Tensor) -> torch.Tensor:
    """The release's input [1, 3, C, C] of ONE image (release_image at ``release.canvas``) → [V·(Q + N + 2), d],
    as the release's encode_image and forward lay it out."""
    s, toy = release.state, release.toy
    x224, conv_in = encoder_inputs(release, image)
    fmap = timm_convnext(s, conv_in, eps=1e-6, depths=toy["conv_depths"])
    grid = toy["side"] // toy["patch"]
    if fmap.shape[-1] != grid:  # llama_ens: repeat_interleave onto the grid (:403-407)
        r = grid // fmap.shape[-1]
        fmap = fmap.repeat_interleave(r, dim=-1).repeat_interleave(r, dim=-2)
    conv = fmap.flatten(-2).permute(0, 2, 1)
    conv = torch.cat([conv.mean(dim=1, keepdim=True), conv], dim=1)
    clip_mean, clip_std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    dino_mean, dino_std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    dino = hub_dino(s, (x224 * clip_std + clip_mean - dino_mean) / dino_std, patch=toy["patch"])
    feats = torch.cat([open_clip_vit(s, x224), conv, dino], dim=2)
    d = s["visual_proj.1.weight"].shape[0]
    proj = F.layer_norm(F.linear(feats, s["visual_proj.0.weight"], s["visual_proj.0.bias"]), (d,),
                        s["visual_proj.1.weight"], s["visual_proj.1.bias"])
    queries = F.layer_norm(F.linear(blip2_qformer(s, x224), s["qformer_proj.0.weight"], s["qformer_proj.0.bias"]),
                           (d,), s["qformer_proj.1.weight"], s["qformer_proj.1.bias"])
    start, end = s["start_img"][0], s["end_img"][0]
    return torch.cat([torch.cat([start, q, v, end]) for q, v in zip(queries, proj)])


def release_logits(release: ToyEnsRelease, bos: int, caption: list[int], image: torch.Tensor | None) -> torch.Tensor:
    """Logits [1, T, V] of ``[bos, image (if any), caption]`` as the release's forward lays it out
    (``image``: the release's input [1, 3, C, C], release_image)."""
    s = release.state
    h = s["tok_embeddings.weight"][torch.tensor([bos] + caption)][None]
    if image is not None:
        h = torch.cat([h[:, :1], image_tokens(release, image)[None], h[:, 1:]], dim=1)
    if release.llama_type in MOE_TYPES:
        return meta_mixtral(s, h, release.args)
    return meta_llama(s, h, release.args)


