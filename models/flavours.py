"""The SPHINX-X family: one small typed config per member (docs/architecture.md "The model").

    >>> f = from_name("tiny")
    >>> f.grid, f.tile_size, f.is_moe
    (2, 224, False)
    >>> from_name("debug", grid=3).grid          # overrides make new flavours
    3

Real flavours describe the paper's shapes; `debug` / `debug-moe` are the same graph in
miniature so that every path runs on one CPU core in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

# Each encoder gets the normalisation it was trained with. The canvas is padded with the CLIP
# mean colour in uint8 (`mean_u8`) and the ConvNeXt's normalisation subtracts exactly that, so
# its padding becomes 0; DINOv2 sees the same pixels with ImageNet statistics, as the official
# SPHINX release re-normalises them: x_dino = (x_clip·std_clip + mean_clip - mean_in) / std_in.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Flavour:
    name: str
    llm_arch: Literal["llama", "mixtral"]
    # transformers LlamaConfig / MixtralConfig keyword arguments
    llm: dict[str, Any]
    # ConvNextConfig / Dinov2Config keyword arguments and each encoder's input resolution
    convnext: dict[str, Any]
    convnext_input: int
    dino: dict[str, Any]
    dino_input: int
    grid: int = 2
    tile_size: int = 224
    # geometry (models.tiling): where the image sits on its padded square, "top_left" (the paper)
    # or "centre" (the official release, LLaMA2-Accessory's PadToSquare), and whether fully padded
    # tiles become one skip token each (the paper) or are encoded like any tile (False: the release)
    pad: Literal["top_left", "centre"] = "top_left"
    skip_tokens: bool = True
    # where an image's tokens go: "inline" at its <image> placeholder (this project's template) or
    # "after_bos", right after <s> and before the system prompt, placeholders dropped (the official
    # release's MetaModel: h = [bos, image, caption]); models.conversation builds the ids
    image_position: Literal["inline", "after_bos"] = "inline"
    # the padding colour and what the ConvNeXt's normalisation subtracts: "uint8" pads with
    # round(mean·255) and subtracts exactly that (padding is 0); "exact" is the release's
    # (PadToSquare pads with int(mean·255), ToTensor + Normalize subtracts mean·255 itself)
    pixel_mean: Literal["uint8", "exact"] = "uint8"
    mean: tuple[float, float, float] = CLIP_MEAN  # the canvas padding colour and the ConvNeXt's input
    std: tuple[float, float, float] = CLIP_STD
    dino_mean: tuple[float, float, float] = IMAGENET_MEAN  # DINOv2's input
    dino_std: tuple[float, float, float] = IMAGENET_STD
    # the ConvNeXt's final LayerNorm at every position of its map (open_clip's trunk, as the
    # release runs it), or the raw last stage (the toys: with random frozen encoders the norm
    # evens out every position's magnitude, which is what tells padding and objects apart —
    # shape 0.92 -> 0.71 held out in benchmarks/learnability.py, BENCHMARKS.md)
    convnext_final_norm: bool = True
    # None: train a BPE tokenizer offline (debug); otherwise an HF tokenizer directory
    tokenizer: str | None = None
    max_seq_len: int = 4096
    # encoders are frozen in the paper's one-stage recipe; False trains them too
    freeze_vision: bool = True
    # "sdpa" or "eager"; both handle left padding on CPU
    attn_implementation: str = "sdpa"
    # the two more branches of the four-branch releases (SPHINX, -1k, -v2-1k, -MoE, -MoE-1k; models.vision):
    # CLIP ViT-L/14 (CLIPVisionConfig kwargs; its N tokens join the channel concat, first) and BLIP-2's
    # Q-Former ({"vision": Blip2VisionConfig kwargs, "qformer": Blip2QFormerConfig kwargs, "queries": 32};
    # its query tokens lead each view through their own Linear → LayerNorm). None: no such branch
    clip: dict[str, Any] | None = None
    clip_input: int = 224
    qformer: dict[str, Any] | None = None
    qformer_input: int = 224
    # how a view reaches the ConvNeXt's side: "bicubic" (antialiased when shrinking) or "nearest_fp16", the
    # release's F.interpolate(x.half(), size) (nearest) in llama_ens*.py / mixtral_sparse_ens.py
    convnext_resize: Literal["bicubic", "nearest_fp16"] = "bicubic"
    # how a view reaches DINOv2, CLIP and the Q-Former: "bicubic" (antialiased when shrinking, untouched at
    # the same size) or "bicubic_fp16", the release's F.interpolate(x.half(), size, mode="bicubic") then back,
    # always (mixtral_sparse_ens.py:669)
    encoder_resize: Literal["bicubic", "bicubic_fp16"] = "bicubic"
    # "project": each view is resized per encoder as above; "release": the canvas is made as the release
    # makes it (PadToSquare at the image's size, then one PIL bicubic resize: models.tiling) and every
    # encoder's views come from it by the release's own fp16 resize-then-crop (models.release_pixels);
    # needs ``release`` and every tile kept
    resample: Literal["project", "release"] = "project"
    # the LLaMA2-Accessory llama_type this flavour loads (models.weights.accessory), None for the paper's
    # flavours; models.geometry cites that release's code for the flavour's figures
    release: str | None = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (checkpoint config.json stores the full flavour)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Flavour":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KeyError(f"unknown flavour field(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        for key in ("mean", "std", "dino_mean", "dino_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def is_moe(self) -> bool:
        return self.llm_arch == "mixtral"

    @property
    def mean_u8(self) -> tuple[int, int, int]:
        """The canvas padding colour (see ``pixel_mean``)."""
        if self.pixel_mean == "exact":
            return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]

    @property
    def normalise_mean_u8(self) -> tuple[float, float, float]:
        """What the ConvNeXt's CLIP normalisation subtracts from uint8 pixels (see ``pixel_mean``)."""
        if self.pixel_mean == "exact":
            return tuple(m * 255 for m in self.mean)  # type: ignore[return-value]
        return tuple(float(v) for v in self.mean_u8)  # type: ignore[return-value]

    @property
    def tokens_per_view(self) -> int:
        """N: patch tokens + 1 CLS of the DINOv2 branch (the grid the channel-mixed branches share), plus
        the Q-Former's query tokens when the flavour has one."""
        side = self.dino_input // self.dino["patch_size"]
        return side * side + 1 + (int(self.qformer["queries"]) if self.qformer else 0)


# open_clip's convnext_xxlarge (a timm trunk) uses LayerNorm eps 1e-5 everywhere; transformers
# hard-codes 1e-6 inside the tower, so `norm_eps` (read by models.vision.build_convnext) sets it
_CONVNEXT_XXL = dict(hidden_sizes=[384, 768, 1536, 3072], depths=[3, 4, 30, 3], norm_eps=1e-5, layer_norm_eps=1e-5)
_DINOV2_G = dict(
    hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
    use_swiglu_ffn=True, patch_size=14, image_size=224,
)
_LLAMA2_13B = dict(
    hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)


def _real(name: str, arch: str, llm: dict[str, Any], **kw: Any) -> Flavour:
    return Flavour(
        name=name, llm_arch=arch, llm=llm, convnext=_CONVNEXT_XXL, convnext_input=512,
        dino=_DINOV2_G, dino_input=224, **kw,
    )


# debug: the same graph in miniature. 48 px tiles (a 96 px canvas at G = 2) leave enough
# pixels to learn colour, shape, counting and short rendered words in a few CPU minutes;
# both encoders land on a 4×4 grid, so N = 17 tokens per view (19 LLM tokens with start/end).
_DEBUG_LLM = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=352, vocab_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-5,
)
_DEBUG_VISION = dict(
    # 3 stages: stem /4, then /2, /2 -> stride 16; a 64 px input gives a 4×4×96 map
    convnext=dict(num_stages=3, hidden_sizes=[32, 64, 96], depths=[1, 1, 1]),
    convnext_input=64,
    dino=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        use_swiglu_ffn=True, patch_size=12, image_size=48,
    ),
    dino_input=48,  # 4×4 patches of 12 px + CLS = 17 tokens per view
)

_TINYLLAMA = dict(
    hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
)
# The official SPHINX-Tiny release (LLaMA2-Accessory `llama_ens_light` / `llama_ens5_light`, read
# by `sphinx-x convert --from accessory`): the same two encoders and 257 + 2 tokens per view, the
# image centred on its padded square, no skip tokens, the image right after <s>, its pixel statistics.
#   sphinx-tiny     one 512 px view (G = 1): 259 image tokens
#   sphinx-tiny-1k  a 1024 canvas: the global view, then 2×2 tiles of 512 (the ConvNeXt sees each at
#                   512, DINOv2 at 224, i.e. the release's 448 resize cut into 2×2): 5 · 259 = 1295
_RELEASE = dict(pad="centre", skip_tokens=False, image_position="after_bos", pixel_mean="exact")
# Their toys (the converter's tests): the debug encoders on 64 px views, which both take as they are
# (DINOv2 with 16 px patches): 4×4 maps, N = 17
_TOY_RELEASE_VISION = dict(_DEBUG_VISION, dino=dict(_DEBUG_VISION["dino"], patch_size=16, image_size=64), dino_input=64)

# The four-branch releases (LLaMA2-Accessory llama_ens / llama_ens5 / mixtral_sparse_ens[5]): CLIP ViT-L/14 as
# open_clip builds it without pretrained weights (GELU, as MetaModel.from_pretrained runs the release) and
# BLIP-2 opt-2.7b's Q-Former (accessory/resources/hf/Salesforce/blip2-opt-2.7b/config.json: 32 queries)
_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
_QFORMER = dict(
    vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
    qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu"),
    queries=32,
)
_MIXTRAL = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
    num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
    router_aux_loss_coef=0.01,
)
_FOUR = dict(_RELEASE, clip=_CLIP_L14, qformer=_QFORMER)


def _four(name: str, arch: str, llm: dict[str, Any], release: str, *, grid: int, tile: int, convnext_input: int,
          **kw: Any) -> Flavour:
    """A four-branch release: tokens per view = 32 queries + 257 + start/end = 291."""
    return Flavour(name=name, llm_arch=arch, llm=llm, convnext=_CONVNEXT_XXL, convnext_input=convnext_input,
                   dino=_DINOV2_G, dino_input=224, grid=grid, tile_size=tile, release=release, resample="release",
                   **_FOUR, **kw)


# Their toys: 4 queries, N = 4 + 17. llama_ens*: 56 px views (DINOv2, CLIP and the Q-Former's ViT take them
# as they are, patch 14) and a 4-stage ConvNeXt (stride 32) nearest-resized to 64: a 2x2 map repeated onto
# the 4x4 grid, as the release's 224 -> 256 gives 8x8 onto 16x16. mixtral_sparse_ens*: 64 px views, every
# encoder at 64 (patch 16; the 3-stage ConvNeXt's 4x4 map). As their real members, they resample as the release
# does (models.release_pixels at these sizes: 224 -> the view side, 448 -> the canvas, 512 -> convnext_input)
_TOY_QFORMER = dict(
    vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
    qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu"),
    queries=4,
)
_TOY_CLIP = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                 hidden_act="gelu", layer_norm_eps=1e-5)
_TOY_ENS = dict(
    convnext=dict(num_stages=4, hidden_sizes=[16, 24, 32, 96], depths=[1, 1, 1, 1]), convnext_input=64,
    dino=dict(_DEBUG_VISION["dino"], patch_size=14, image_size=56), dino_input=56,
    clip=_TOY_CLIP, clip_input=56, qformer=_TOY_QFORMER, qformer_input=56, tile_size=56,
    convnext_resize="nearest_fp16", resample="release",
)
_TOY_MOE_ENS = dict(
    _TOY_RELEASE_VISION, clip=dict(_TOY_CLIP, patch_size=16), clip_input=64,
    qformer=dict(_TOY_QFORMER, vision=dict(_TOY_QFORMER["vision"], patch_size=16)), qformer_input=64, tile_size=64,
    resample="release",
)
_TOY_MIXTRAL = dict(_DEBUG_LLM, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)

FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in [
        _real("tiny", "llama", _TINYLLAMA, notes="TinyLlama-1.1B"),
        _real("intern2", "llama", dict(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, vocab_size=92544, max_position_embeddings=32768,
            rms_norm_eps=1e-5, rope_theta=1e6,
        ), notes="InternLM2-7B, bilingual"),
        _real("plus", "llama", _LLAMA2_13B, notes="LLaMA2-13B"),
        _real("plus-3x3", "llama", _LLAMA2_13B, grid=3, notes="LLaMA2-13B, 3x3 tiles of 224 (a 672 px canvas)"),
        _real("moe", "mixtral", dict(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
            num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
            router_aux_loss_coef=0.01,
        ), notes="Mixtral-8x7B, expert parallel"),
        Flavour(name="debug", llm_arch="llama", llm=_DEBUG_LLM, tile_size=48, max_seq_len=1024,
                convnext_final_norm=False, notes="tests and demo", **_DEBUG_VISION),
        Flavour(name="debug-moe", llm_arch="mixtral", llm=dict(
            _DEBUG_LLM, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01,
        ), tile_size=48, max_seq_len=1024, convnext_final_norm=False, notes="tests and demo, MoE",
            **_DEBUG_VISION),
        _real("sphinx-tiny", "llama", _TINYLLAMA, grid=1, tile_size=512, **_RELEASE, release="llama_ens_light",
              resample="release",
              notes="the official SPHINX-Tiny (llama_ens_light): one 512 px view"),
        _real("sphinx-tiny-1k", "llama", _TINYLLAMA, grid=2, tile_size=512, **_RELEASE, release="llama_ens5_light",
              resample="release",
              notes="the official SPHINX-Tiny-1k (llama_ens5_light): global view + 2x2 tiles of 512"),
        _four("sphinx", "llama", _LLAMA2_13B, "llama_ens", grid=1, tile=224, convnext_input=256,
              convnext_resize="nearest_fp16", notes="the official SPHINX (llama_ens): one 224 px view, 291 tokens"),
        _four("sphinx-1k", "llama", _LLAMA2_13B, "llama_ens5", grid=2, tile=224, convnext_input=256,
              convnext_resize="nearest_fp16",
              notes="the official SPHINX-1k (llama_ens5): a 448 canvas, global view + 2x2 tiles of 224, 1455 tokens"),
        _four("sphinx-v2-1k", "llama", _LLAMA2_13B, "llama_ens5", grid=2, tile=224, convnext_input=256,
              convnext_resize="nearest_fp16", notes="the official SPHINX-v2-1k (llama_ens5): as sphinx-1k"),
        _four("sphinx-moe", "mixtral", _MIXTRAL, "mixtral_sparse_ens", grid=1, tile=512, convnext_input=512,
              convnext_resize="nearest_fp16", encoder_resize="bicubic_fp16",
              notes="the official SPHINX-MoE (mixtral_sparse_ens): one 512 px view, 291 tokens"),
        _four("sphinx-moe-1k", "mixtral", _MIXTRAL, "mixtral_sparse_ens5", grid=2, tile=512, convnext_input=512,
              encoder_resize="bicubic_fp16",
              notes="the official SPHINX-MoE-1k (mixtral_sparse_ens5): a 1024 canvas, global + 2x2 tiles of 512, "
                    "1455 tokens"),
        Flavour(name="debug-sphinx", llm_arch="llama", llm=_DEBUG_LLM, grid=1, max_seq_len=1024, **_RELEASE,
                release="llama_ens", notes="sphinx in miniature (tests)", **_TOY_ENS),
        Flavour(name="debug-sphinx-1k", llm_arch="llama", llm=_DEBUG_LLM, grid=2, max_seq_len=1024, **_RELEASE,
                release="llama_ens5", notes="sphinx-1k in miniature (tests)", **_TOY_ENS),
        Flavour(name="debug-sphinx-moe", llm_arch="mixtral", llm=_TOY_MIXTRAL, grid=1, max_seq_len=1024,
                **_RELEASE, release="mixtral_sparse_ens", convnext_resize="nearest_fp16",
                encoder_resize="bicubic_fp16", notes="sphinx-moe in miniature (tests)", **_TOY_MOE_ENS),
        Flavour(name="debug-sphinx-moe-1k", llm_arch="mixtral", llm=_TOY_MIXTRAL, grid=2, max_seq_len=1024,
                **_RELEASE, release="mixtral_sparse_ens5", encoder_resize="bicubic_fp16",
                notes="sphinx-moe-1k in miniature (tests)", **_TOY_MOE_ENS),
        Flavour(name="debug-sphinx-tiny", llm_arch="llama", llm=_DEBUG_LLM, grid=1, tile_size=64,
                max_seq_len=1024, **_RELEASE, release="llama_ens_light", notes="sphinx-tiny in miniature (tests)",
                **_TOY_RELEASE_VISION),
        Flavour(name="debug-sphinx-tiny-1k", llm_arch="llama", llm=_DEBUG_LLM, grid=2, tile_size=64,
                max_seq_len=1024, **_RELEASE, release="llama_ens5_light",
                notes="sphinx-tiny-1k in miniature (tests)", **_TOY_RELEASE_VISION),
    ]
}


# names no longer given out, and why (a clear error instead of a misleading flavour)
RETIRED = {
    "plus-2k": "flavour 'plus-2k' is now 'plus-3x3': its canvas is 3x3 tiles of 224 = 672 px, never 2k "
               "(sphinx-x info --flavour plus-3x3)",
}


def unknown_flavour(name: str) -> str:
    """The one message for a name that is not a flavour (a retired name says what replaced it)."""
    return RETIRED.get(name) or f"unknown flavour {name!r}; known: {', '.join(sorted(FLAVOURS))}"


def from_name(name: str, **overrides: Any) -> Flavour:
    """A flavour by name; overrides replace top-level fields, or LLM keys via ``llm={...}``."""
    if name not in FLAVOURS:
        raise KeyError(unknown_flavour(name))
    base = FLAVOURS[name]
    known = {f.name for f in fields(Flavour)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(f"unknown flavour override(s) {unknown}; known: {sorted(known)}")
    for key in ("llm", "convnext", "dino"):  # dict fields merge rather than replace
        if key in overrides:
            overrides[key] = {**getattr(base, key), **overrides[key]}
    return replace(base, **overrides)
