"""The mixture of visual experts (docs/architecture.md "The model"): ConvNeXt + DINOv2 → projector → LLM tokens.

Every view (the global view, then the kept tiles of each image) is seen by both encoders:

    views  uint8 [V, S, S, 3]          V = Σ over images of (1 + kept)
      ├─ CLIP-normalise: (x - mean_u8) / (std·255)  → the mean-colour padding is exactly 0
      │  resize to convnext_input → ConvNextModel → its final LayerNorm at every position
      │     (open_clip's trunk with global_pool = Identity, as SPHINX uses it) → map [V, Cc, h, w]
      │     → resize to g×g → tokens [V, g·g, Cc], pseudo-CLS = their mean → [V, N, Cc]  (N = 1 + g·g)
      ├─ ImageNet-normalise the same pixels: (x/255 - dino_mean) / dino_std
      │  resize to dino_input    → Dinov2Model   → CLS + patches [V, N, Cd]
      └─ concat channels [V, N, Cc + Cd] → Linear → LayerNorm → [V, N, d_llm]

The four-branch releases (``flavour.clip`` / ``flavour.qformer`` set; LLaMA2-Accessory llama_ens.py:377-449)
add two more on the CLIP-normalised view:

      ├─ resize to clip_input → CLIPVisionModel → post_layernorm at every token → [V, N, Ck]; it joins the
      │  concat first: [V, N, Ck + Cc + Cd] → Linear → LayerNorm  (5632 = 1024 + 3072 + 1536 at full size)
      └─ resize to qformer_input → QFormerBranch (models.qformer) → [V, Q, 768] → Linear → LayerNorm
         → the Q query tokens lead the view: [V, Q + N, d_llm]  (N counts them: flavour.tokens_per_view)

and their ConvNeXt sees the view nearest-resized in fp16 (``convnext_resize``; 224 → 256 gives an 8×8
map, repeated 2×2 onto the 16×16 grid, llama_ens.py:399-407).

Each image then becomes one sequence of LLM embeddings, laid out as

    [start, N view tokens, end]               the global view
    then tiles row-major (r, c):
      kept    → [start, N view tokens, end]
      skipped → [skip]                        one learnable token, never encoded

so its length is ``(1 + kept)·(N + 2) + skipped`` (models.tiling.image_token_count).
Start, end and skip are single learnable vectors shared by all views. The encoders are
built from transformers configs (random init; weights come from models.weights.model_dir) and are
frozen by default (``flavour.freeze_vision``): no grads, always in eval mode.

Every call runs every submodule and uses every parameter, also for a text-only batch (no
images: one padding view, or under ``resample: release`` one padding image's 1 + G² views, is
encoded and dropped) or one without skipped tiles (zero-row slices of start/end/skip join the
output). So all ranks of a data-parallel run execute the same modules in the same order (ZeRO-3
gathers a module's parameters in that module's own forward) and every trainable parameter gets a
gradient (zero when unused), which gradient reduction across ranks relies on.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, Dinov2Config, Dinov2Model
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

from models.errors import UserError
from models.flavours import Flavour
from models.qformer import QFormerBranch
from models.release_pixels import release_inputs


def build_convnext(flavour: Flavour) -> ConvNextModel:
    """ConvNextModel from ``flavour.convnext``; its ``norm_eps`` (when given) sets the eps of the
    stem, downsampling and block LayerNorms, which transformers fixes at 1e-6 (open_clip's
    convnext_xxlarge uses 1e-5). ``layer_norm_eps`` is transformers' own: the final norm."""
    model = ConvNextModel(ConvNextConfig(**{**flavour.convnext, "image_size": flavour.convnext_input}))
    if flavour.convnext.get("norm_eps") is not None:
        for module in model.modules():
            if isinstance(module, ConvNextLayerNorm):
                module.eps = float(flavour.convnext["norm_eps"])
    return model


def convnext_feature_map(convnext: ConvNextModel, pixel_values: torch.Tensor, *, final_norm: bool = True) -> torch.Tensor:
    """pixel_values [V, 3, H, W] → the tower's map [V, Cc, H/32, W/32]: the last stage with the final
    LayerNorm applied at every position (open_clip's trunk with ``head.global_pool = Identity``),
    or without it (``final_norm=False``: the flavour's ``convnext_final_norm``)."""
    fmap = convnext(pixel_values=pixel_values).last_hidden_state  # [V, Cc, h, w]
    if not final_norm:
        return fmap
    return convnext.layernorm(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build_dino(flavour: Flavour) -> Dinov2Model:
    return Dinov2Model(Dinov2Config(**{**flavour.dino, "image_size": flavour.dino_input}))


def build_clip(flavour: Flavour) -> Optional[CLIPVisionModel]:
    if flavour.clip is None:
        return None
    return CLIPVisionModel(CLIPVisionConfig(**{**flavour.clip, "image_size": flavour.clip_input}))


def clip_tokens(clip: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [V, 3, H, W] → every token through the final LayerNorm [V, 1 + patches, Ck] (the release's
    ``clip_encode_image``: ``ln_post`` on all tokens, no projection)."""
    hidden = clip(pixel_values=pixel_values).last_hidden_state  # before post_layernorm
    return clip.post_layernorm(hidden)


class MixtureOfVisualExperts(nn.Module):
    """uint8 views + kept masks → the images' embedding sequences, concatenated (see module docstring)."""

    def __init__(self, flavour: Flavour, d_llm: int):
        super().__init__()
        self.flavour = flavour
        self.grid = flavour.grid
        self.tokens_per_view = flavour.tokens_per_view  # N
        self.patch_grid = flavour.dino_input // flavour.dino["patch_size"]  # g, N = 1 + g·g
        self.convnext = build_convnext(flavour)
        self.dino = build_dino(flavour)
        self.clip = build_clip(flavour)
        self.qformer = QFormerBranch(flavour.qformer, flavour.qformer_input) if flavour.qformer else None
        c_conv = self.convnext.config.hidden_sizes[-1]
        c_dino = self.dino.config.hidden_size
        c_clip = self.clip.config.hidden_size if self.clip is not None else 0
        self.projector = nn.Sequential(nn.Linear(c_clip + c_conv + c_dino, d_llm), nn.LayerNorm(d_llm))
        if self.qformer is not None:
            self.qformer_proj = nn.Sequential(nn.Linear(self.qformer.hidden_size, d_llm), nn.LayerNorm(d_llm))
        # small random init, as in SPHINX (torch.rand · 0.02 keeps them near the text scale)
        self.start = nn.Parameter(torch.randn(d_llm) * 0.02)
        self.end = nn.Parameter(torch.randn(d_llm) * 0.02)
        self.skip = nn.Parameter(torch.randn(d_llm) * 0.02)
        # uint8 normalisation: subtract exactly the padding colour so padding becomes 0 (flavour.pixel_mean
        # "exact": the mean itself, as the official release does)
        self.register_buffer("mean_u8", torch.tensor(flavour.normalise_mean_u8, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std_u8", torch.tensor(flavour.std, dtype=torch.float32).view(1, 3, 1, 1) * 255,
                             persistent=False)
        # DINOv2's own (ImageNet) statistics, in uint8 units
        self.register_buffer("dino_mean_u8", torch.tensor(flavour.dino_mean, dtype=torch.float32).view(1, 3, 1, 1)
                             * 255, persistent=False)
        self.register_buffer("dino_std_u8", torch.tensor(flavour.dino_std, dtype=torch.float32).view(1, 3, 1, 1)
                             * 255, persistent=False)
        self.set_encoders_trainable(not flavour.freeze_vision)

    # ------------------------------------------------------------------ freezing

    def set_encoders_trainable(self, trainable: bool) -> None:
        """Frozen encoders have requires_grad False and stay in eval mode through .train()."""
        self.encoders_trainable = trainable
        for enc in self.encoders():
            enc.requires_grad_(trainable)
            enc.train(self.training and trainable)

    def encoders(self) -> list[nn.Module]:
        """The frozen-by-default towers: ConvNeXt, DINOv2, and CLIP / the Q-Former where the flavour has them."""
        return [m for m in (self.convnext, self.dino, self.clip, self.qformer) if m is not None]

    def train(self, mode: bool = True) -> "MixtureOfVisualExperts":
        super().train(mode)
        if not getattr(self, "encoders_trainable", True):
            for enc in self.encoders():
                enc.eval()
        return self

    # ------------------------------------------------------------------ encoding

    def normalise(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [V, S, S, 3] → the ConvNeXt's float input [V, 3, S, S], (x - mean_u8) / (std·255)."""
        return (self._pixels(views) - self.mean_u8) / self.std_u8

    def normalise_dino(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [V, S, S, 3] → DINOv2's float input [V, 3, S, S], (x/255 - dino_mean) / dino_std."""
        return (self._pixels(views) - self.dino_mean_u8) / self.dino_std_u8

    @staticmethod
    def _pixels(views: torch.Tensor) -> torch.Tensor:
        if views.dtype != torch.uint8 or views.dim() != 4 or views.shape[-1] != 3:
            raise UserError(f"views must be uint8 [V, S, S, 3], got {views.dtype} {list(views.shape)}")
        return views.permute(0, 3, 1, 2).float()

    def encoder_inputs(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [V, S, S, 3] → {encoder: float input [V, 3, side, side]}: each view normalised and resized
        to the encoder's side (``convnext_resize`` / ``encoder_resize``), or, with ``flavour.resample ==
        "release"``, the release's own resize-then-crop from the whole canvas (models.release_pixels)."""
        f = self.flavour
        if f.resample == "release":
            return release_inputs(views, f)
        x = self.normalise(views)
        out = {"convnext": _resize(x, f.convnext_input, f.convnext_resize)}
        if self.clip is not None:
            out["clip"] = _resize(x, f.clip_input, f.encoder_resize)
        if self.qformer is not None:
            out["qformer"] = _resize(x, f.qformer_input, f.encoder_resize)
        if f.encoder_resize == "bicubic_fp16":  # the release re-normalises its resized CLIP input
            # (mixtral_sparse_ens.py:692-694), so the fp16 rounding happens before the re-normalisation
            x224 = _resize(x, f.dino_input, f.encoder_resize)
            out["dino"] = (x224 * self.std_u8 + self.mean_u8 - self.dino_mean_u8) / self.dino_std_u8
        else:
            out["dino"] = _resize(self.normalise_dino(views), f.dino_input, f.encoder_resize)
        return out

    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [V, S, S, 3] → projected view tokens [V, N, d_llm]."""
        dtype = self.projector[0].weight.dtype
        f = self.flavour
        inputs = self.encoder_inputs(views)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoders_trainable):
            conv_in = inputs["convnext"].to(self.convnext.embeddings.patch_embeddings.weight.dtype)
            fmap = convnext_feature_map(self.convnext, conv_in, final_norm=f.convnext_final_norm)
            g = self.patch_grid
            if fmap.shape[-1] != g or fmap.shape[-2] != g:
                if fmap.shape[-1] % g == 0 and fmap.shape[-2] % g == 0:
                    fmap = F.adaptive_avg_pool2d(fmap, g)
                elif g % fmap.shape[-1] == 0 and g % fmap.shape[-2] == 0:  # the release's repeat_interleave
                    fmap = fmap.repeat_interleave(g // fmap.shape[-2], dim=-2).repeat_interleave(g // fmap.shape[-1], -1)
                else:
                    fmap = F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False)
            conv_tokens = fmap.flatten(2).transpose(1, 2)  # [V, g·g, Cc]
            branches = [torch.cat([conv_tokens.mean(1, keepdim=True), conv_tokens], dim=1)]  # [V, 1 + g·g, Cc]
            if self.clip is not None:
                clip_in = inputs["clip"].to(self.clip.embeddings.patch_embedding.weight.dtype)
                branches.insert(0, clip_tokens(self.clip, clip_in))  # [V, 1 + g·g, Ck], first in the concat
            if self.qformer is not None:
                queries = self.qformer(inputs["qformer"].to(self.qformer.query_tokens.dtype))  # [V, Q, 768]
            dino_in = inputs["dino"].to(self.dino.embeddings.patch_embeddings.projection.weight.dtype)
            branches.append(self.dino(pixel_values=dino_in).last_hidden_state)  # [V, 1 + g·g, Cd]
        tokens = self.projector(torch.cat([b.to(dtype) for b in branches], dim=-1))  # [V, 1 + g·g, d]
        if self.qformer is None:
            return tokens
        return torch.cat([self.qformer_proj(queries.to(dtype)), tokens], dim=1)  # [V, N = Q + 1 + g·g, d]

    def token_counts(self, kept: torch.Tensor) -> list[int]:
        """kept bool [I, G·G] → each image's sequence length, (1 + kept)·(N + 2) + skipped."""
        n_kept = kept.bool().sum(1)
        return ((1 + n_kept) * (self.tokens_per_view + 2) + (kept.shape[1] - n_kept)).tolist()

    def forward(self, views: Optional[torch.Tensor] = None, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """views uint8 [V, S, S, 3], kept bool [I, G·G] ([I, 0] when G = 1), or None for no images
        → the I images' sequences concatenated in order: [Σ (1+k)(N+2) + skipped, d_llm]
        (split with ``.split(self.token_counts(kept))``; [0, d_llm] without images)."""
        gg = self.grid * self.grid if self.grid > 1 else 0  # G = 1: global view only, empty masks
        s = self.flavour.tile_size
        if views is None or kept is None:
            views = self.mean_u8.new_zeros((0, s, s, 3), dtype=torch.uint8)
            kept = torch.zeros((0, gg), dtype=torch.bool, device=views.device)
        kept = kept.bool()
        if kept.dim() != 2 or kept.shape[1] != gg:
            raise UserError(f"kept must be bool [images, {gg}] for grid {self.grid}, got {list(kept.shape)}")
        if not self.flavour.skip_tokens and not bool(kept.all()):  # its skip token was never trained
            raise UserError(f"flavour {self.flavour.name!r} has no skip tokens: every tile is kept (tile with "
                            "models.tiling.TileSpec.from_flavour)")
        n_views = int((1 + kept.sum(1)).sum())
        if views.shape[0] != n_views:
            raise UserError(f"views hold {views.shape[0]} views but kept masks need {n_views} "
                            f"(1 global + kept tiles per image)")
        if views.shape[1] != s or views.shape[2] != s:
            raise UserError(f"views must be {s}×{s} (flavour {self.flavour.name!r}), "
                            f"got {views.shape[1]}×{views.shape[2]}")
        if n_views:
            tokens = self.encode_views(views)  # [V, N, d]
        else:  # no images: encode one padding view (all modules run, see the module docstring), keep none;
            # the release's resampling rebuilds whole canvases, so it gets a whole padding image's views
            n_pad = 1 + gg if self.flavour.resample == "release" else 1
            pad = self.mean_u8.to(torch.uint8).view(1, 1, 1, 3).expand(n_pad, s, s, 3)
            tokens = self.encode_views(pad)[:0]
        start, end = self.start.to(tokens.dtype)[None], self.end.to(tokens.dtype)[None]
        skip = self.skip.to(tokens.dtype)[None]
        # zero-row slices: every parameter reaches the output even when unused (no images, no skips)
        parts, v = [tokens[:0].flatten(0, 1), start[:0], end[:0], skip[:0]], 0
        for mask in kept.tolist():
            parts += [start, tokens[v], end]
            v += 1
            for is_kept in mask:
                if is_kept:
                    parts += [start, tokens[v], end]
                    v += 1
                else:
                    parts.append(skip)
        return torch.cat(parts, dim=0)


def _resize(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """[V, 3, S, S] → [V, 3, size, size]. ``bicubic``: antialiased when shrinking, untouched at the same size;
    the release's ``nearest_fp16`` / ``bicubic_fp16`` (F.interpolate on x.half(), then back) always run, as
    the release runs them whatever the sizes (the fp16 round trip is part of its pixels)."""
    if mode == "nearest_fp16":
        return F.interpolate(x.half(), size=(size, size)).to(x.dtype)
    if mode == "bicubic_fp16":
        return F.interpolate(x.half(), size=(size, size), mode="bicubic").to(x.dtype)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=x.shape[-1] > size)
