"""Pretrained visual encoders in their published formats → the towers of models.vision.

Both towers stay transformers modules built from the flavour (models.vision.build_convnext /
build_dino). The loaders here turn each published layout into their state dicts and check them
against the flavour; a mismatch names the file, the key and both shapes:

    >>> conv = load_convnext_weights("CLIP-convnext_xxlarge/open_clip_model.safetensors", flavour)
    >>> dino = load_dino_weights("dinov2-giant/", flavour)         # an HF dir, or a hub .pth file
    >>> conv.layout, dino.layout, conv.ignored[:2]
    ('open_clip', 'hf', ('logit_scale', 'positional_embedding'))
    >>> flavour = with_encoder_overrides(flavour, conv, dino)      # the eps they were trained with
    >>> model = SphinxX(flavour, ...)
    >>> conv.load_into(model.vision.convnext); dino.load_into(model.vision.dino)

ConvNeXt (→ ``ConvNextModel``)
  - an open_clip checkpoint file (.safetensors / .bin / .pt): ``visual.trunk.*`` is a timm ConvNeXt
    trunk (``stem.0`` conv, ``stem.1`` LayerNorm2d, ``stages.N.downsample.{0,1}``,
    ``stages.N.blocks.M.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}``, ``head.norm``); the CLIP
    projection (``visual.head.*``) and the text tower are read and ignored. Bare timm trunk keys
    (``stem.0.weight`` ...) are accepted too. timm itself is not used at run time: it imports
    torchvision, whose PyPI build cannot load beside the CPU torch. The timm layout is one
    renaming away from transformers' ConvNeXt (same modules, same order); only the LayerNorm eps
    differs (timm's convnext_xxlarge uses 1e-5, transformers fixes 1e-6): the flavour's
    ``convnext["norm_eps"]`` carries it (models.vision.build_convnext).
  - a Hugging Face ConvNext directory (config.json + weights; ConvNextModel or
    ConvNextForImageClassification, whose ``convnext.`` prefix is dropped, ``classifier.*`` ignored).
  The tower's output is the last stage with the final LayerNorm at every position
  (models.vision.convnext_feature_map): open_clip's trunk with ``head.global_pool = Identity``,
  which is how SPHINX uses it; ``head.norm`` becomes transformers' ``layernorm``.

DINOv2 (→ ``Dinov2Model``)
  - a Hugging Face Dinov2Model directory as published (image_size 518, so positions
    [1, 1370, C]), with the current key names or the legacy ones that transformers maps only
    inside ``from_pretrained``: ``attention.attention.{query,key,value}``,
    ``attention.output.dense``, ``mlp.weights_in`` (SwiGLU gate and up, packed), ``mlp.weights_out``.
  - the torch.hub ``facebookresearch/dinov2`` state dict: ``cls_token``, ``pos_embed``,
    ``mask_token``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1/fc2 | mlp.w12/w3, ls2.gamma}``, ``norm`` (``blocks.K.N.`` when saved block-chunked).
    The head count is not in the weights: the flavour's is used.
  Positions are resampled ONCE, here, to the flavour's grid ``g = dino_input / patch_size`` with
  the very bicubic call the source's own forward makes at that input (transformers:
  ``size=(g, g)``; the hub: ``scale_factor = (g + 0.1) / M``, its ``interpolate_offset``), so the
  tower run at ``dino_input`` equals the published model run at ``dino_input``; no
  interpolation is left for run time.

Nothing is read until the weights are loaded: the state is {name: models.weights.stream.Recipe}
(renames, splits and the position resampling, checked against the flavour's shapes from the file
headers), and ``load_into`` reads one tensor at a time. Every bad input (missing file, foreign
layout, shape that does not fit the flavour) raises models.errors.UserError naming the file and
the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.flavours import Flavour
from models.vision import build_convnext, build_dino
from models.weights.stream import (LazyTensors, Recipe, RenameTable, as_recipes, check_fits, load_recipes, materialise,
                                   rename, shown, weight_files)

PathLike = Union[str, Path]
HUB_INTERPOLATE_OFFSET = 0.1  # facebookresearch/dinov2's default (DinoVisionTransformer.interpolate_offset)
TRANSFORMERS_CONVNEXT_EPS = 1e-6  # transformers' fixed eps for the LayerNorms inside a ConvNeXt


@dataclass(frozen=True)
class EncoderWeights:
    """One encoder's weights, renamed for the flavour's tower and checked against its shapes."""

    which: Literal["convnext", "dino"]
    layout: str  # "open_clip" | "timm" | "hf" | "hub"
    state: dict[str, Recipe]  # keys of build_convnext(flavour) / build_dino(flavour), unread
    overrides: dict[str, Any]  # flavour.convnext / flavour.dino keys the source was trained with
    source: str
    ignored: tuple[str, ...] = ()  # source keys read and deliberately unused (text tower, heads)
    notes: tuple[str, ...] = ()  # anything filled in that the source lacks

    def load_into(self, module: nn.Module) -> None:
        """Strict load into the tower, one tensor read at a time (a mismatch names the key and
        both shapes)."""
        load_recipes(module, self.state, what=f"{self.which} weights {self.source}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole state dict, read (small towers and tests)."""
        return materialise(self.state)


def with_encoder_overrides(flavour: Flavour, *weights: EncoderWeights) -> Flavour:
    """The flavour with each encoder's settings (eps, activation) as its source has them."""
    changes = {}
    for w in weights:
        key = "convnext" if w.which == "convnext" else "dino"
        changes[key] = {**changes.get(key, getattr(flavour, key)), **w.overrides}
    return replace(flavour, **changes)


# ---------------------------------------------------------------- shared pieces


def _meta_shapes(build: Callable[[Flavour], nn.Module], flavour: Flavour) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = build(flavour)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def _strip_prefix(state: dict[str, Recipe], prefix: str) -> dict[str, Recipe]:
    """Drop a base-model prefix (``convnext.`` beside ``classifier.*``, ``module.`` of DDP)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _split_off(state: dict[str, Recipe], pattern: str) -> tuple[dict[str, Recipe], tuple[str, ...]]:
    drop = re.compile(pattern)
    return ({k: v for k, v in state.items() if not drop.search(k)},
            tuple(sorted(k for k in state if drop.search(k))))


# ---------------------------------------------------------------- ConvNeXt

_TIMM_CONVNEXT: RenameTable = [
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.([01])\.", r"encoder.stages.\1.downsampling_layer.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.stages.\1.layers.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.stages.\1.layers.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
]


def _read(path: Path) -> dict[str, Recipe]:
    """A weights file (or an HF directory's files), unread."""
    return LazyTensors.open(weight_files(path) if path.is_dir() else [path]).recipes()


def convnext_from_timm(trunk: dict[str, Union[torch.Tensor, Recipe]], flavour: Flavour, *, source: str,
                       norm_eps: Optional[float] = None, ignored: Sequence[str] = (),
                       layout: str = "timm") -> EncoderWeights:
    """A timm ConvNeXt trunk state dict (open_clip's ``visual.trunk.*`` without the prefix) →
    ConvNextModel weights. ``norm_eps``: the trunk's LayerNorm eps (not in the weights; default
    the flavour's ``convnext["norm_eps"]``, else timm's 1e-6)."""
    trunk = as_recipes(trunk, source)
    trunk, classifier = _split_off(trunk, r"^head\.fc\.")  # an ImageNet classifier (absent in open_clip)
    state, unmatched = rename(trunk, _TIMM_CONVNEXT, source, keep_unmatched=False)
    check_fits(_meta_shapes(build_convnext, flavour), state, f"ConvNeXt weights {source} (timm layout)",
                  f"flavour {flavour.name!r}", unexpected_extra=unmatched)
    eps = norm_eps if norm_eps is not None else flavour.convnext.get("norm_eps", TRANSFORMERS_CONVNEXT_EPS)
    return EncoderWeights("convnext", layout, state, {"norm_eps": float(eps), "layer_norm_eps": float(eps)},
                          source, tuple(ignored) + classifier)


def _openclip_trunk(state: dict[str, Recipe], source: str) -> tuple[dict[str, Recipe], tuple[str, ...], str]:
    state = _strip_prefix(state, "module.")
    if any(k.startswith("visual.trunk.") for k in state):
        trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
        return trunk, tuple(sorted(k for k in state if not k.startswith("visual.trunk."))), "open_clip"
    if "stem.0.weight" in state:
        return state, (), "timm"
    visual = sorted(k for k in state if k.startswith("visual."))
    if visual:
        raise UserError(f"{source} is an open_clip checkpoint whose image tower is not a timm ConvNeXt trunk "
                        f"(no visual.trunk.* keys; found e.g. {shown(visual, 3)})")
    raise UserError(f"{source} is not a ConvNeXt checkpoint: expected open_clip's visual.trunk.*, timm's "
                    f"stem.0.weight or transformers' embeddings.patch_embeddings.weight; found e.g. "
                    f"{shown(sorted(state), 3)}")


def load_convnext_weights(path: PathLike, flavour: Flavour, *, norm_eps: Optional[float] = None) -> EncoderWeights:
    """ConvNeXt weights from an open_clip / timm checkpoint file or a Hugging Face ConvNext
    directory (or a file of ConvNextModel keys, optionally prefixed ``convnext.``)."""
    src = Path(path)
    if src.is_dir():
        return _convnext_from_hf_dir(src, flavour)
    state = _read(src)
    hf_keys = _strip_prefix(state, "convnext.")
    if "embeddings.patch_embeddings.weight" in hf_keys:
        return _convnext_hf_state(hf_keys, flavour, str(src), {})
    trunk, ignored, layout = _openclip_trunk(state, str(src))
    return convnext_from_timm(trunk, flavour, source=str(src), norm_eps=norm_eps, ignored=ignored, layout=layout)


def _convnext_from_hf_dir(src: Path, flavour: Flavour) -> EncoderWeights:
    if not (src / "config.json").is_file():
        raise UserError(f"not a Hugging Face ConvNext directory (no config.json): {src}")
    config = _read_config(src)
    if config.get("model_type") != "convnext":
        raise UserError(f"{src / 'config.json'}: model_type {config.get('model_type')!r}, expected 'convnext'")
    state = _strip_prefix(_read(src), "convnext.")
    overrides = {"norm_eps": TRANSFORMERS_CONVNEXT_EPS, "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
                 "hidden_act": config.get("hidden_act", "gelu")}
    return _convnext_hf_state(state, flavour, str(src), overrides)


def _convnext_hf_state(state: dict[str, Recipe], flavour: Flavour, source: str,
                       overrides: dict[str, Any]) -> EncoderWeights:
    state, ignored = _split_off(state, r"^classifier\.")
    check_fits(_meta_shapes(build_convnext, flavour), state, f"ConvNeXt weights {source}",
                  f"flavour {flavour.name!r}")
    return EncoderWeights("convnext", "hf", state, overrides, source, ignored)


# ---------------------------------------------------------------- DINOv2

_HUB_DINO: RenameTable = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^norm\.", "layernorm."),
    (r"^blocks\.(\d+)\.norm([12])\.", r"encoder.layer.\1.norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", tuple(rf"encoder.layer.\1.attention.{p}_proj." for p in "qkv")),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layer.\1.mlp.fc\2."),
    (r"^blocks\.(\d+)\.mlp\.w12\.", (r"encoder.layer.\1.mlp.gate_proj.", r"encoder.layer.\1.mlp.up_proj.")),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"encoder.layer.\1.mlp.down_proj."),
]

# legacy Hugging Face names (transformers maps them inside from_pretrained only)
_HF_DINO_LEGACY: RenameTable = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.weights_in\.", (".mlp.gate_proj.", ".mlp.up_proj.")),
    (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
]


def resample_positions(pos: torch.Tensor, grid: int, *, source: str,
                       hub_offset: Optional[float] = None) -> torch.Tensor:
    """Position embeddings [1, 1 + M·M, C] → [1, 1 + grid·grid, C] (fp32 when resampled), bicubic as the source's
    forward does at grid·patch px: transformers ``size=(grid, grid)``, or the hub's
    ``scale_factor=(grid + hub_offset) / M``. The CLS position is kept as is."""
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise UserError(f"{source}: position embeddings must be [1, 1 + M·M, C], got {list(pos.shape)}")
    m = int(round((pos.shape[1] - 1) ** 0.5))
    if m * m != pos.shape[1] - 1:
        raise UserError(f"{source}: {pos.shape[1] - 1} patch positions are not a square grid")
    if m == grid:  # nothing to resample: as stored
        return pos
    pos = pos.float()
    patches = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if hub_offset:
        scale = (grid + hub_offset) / m
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    if tuple(patches.shape[-2:]) != (grid, grid):
        raise UserError(f"{source}: resampling {m}×{m} positions gave {tuple(patches.shape[-2:])}, not {grid}×{grid}")
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _dino_grid(flavour: Flavour) -> int:
    return flavour.dino_input // int(flavour.dino["patch_size"])


def dino_from_hub(state: dict[str, Union[torch.Tensor, Recipe]], flavour: Flavour, *, source: str,
                  interpolate_offset: float = HUB_INTERPOLATE_OFFSET) -> EncoderWeights:
    """A torch.hub ``facebookresearch/dinov2`` state dict (no prefix) → Dinov2Model weights at the
    flavour's input size (positions resampled as the hub model would at that size)."""
    state = as_recipes(state, source)
    if "register_tokens" in state:
        raise UserError(f"{source}: register_tokens found: DINOv2 with registers is not supported "
                        "(use a model without registers, e.g. dinov2_vitg14)")
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}  # block chunks
    renamed, unmatched = rename(state, _HUB_DINO, source, keep_unmatched=False)
    notes = []
    if "embeddings.mask_token" not in renamed and "embeddings.cls_token" in renamed:
        # only used with bool_masked_pos (masked pre-training), never here
        renamed["embeddings.mask_token"] = Recipe.constant(torch.zeros(1, renamed["embeddings.cls_token"].shape[-1]))
        notes.append("mask_token absent: zeros (unused without masking)")
    return _dino_finish(renamed, flavour, source, "hub", {"layer_norm_eps": 1e-6, "hidden_act": "gelu"},
                        interpolate_offset, unmatched=unmatched, notes=tuple(notes))


def load_dino_weights(path: PathLike, flavour: Flavour) -> EncoderWeights:
    """DINOv2 weights from a Hugging Face Dinov2Model directory, a file of Dinov2Model keys
    (optionally prefixed ``dinov2.``), or a torch.hub state-dict file."""
    src = Path(path)
    if src.is_dir():
        return _dino_from_hf_dir(src, flavour)
    state = _read(src)
    hf_keys = _strip_prefix(state, "dinov2.")
    if "embeddings.cls_token" in hf_keys:
        return _dino_hf_state(hf_keys, flavour, str(src), {})
    if "cls_token" in state and "pos_embed" in state:
        return dino_from_hub(state, flavour, source=str(src))
    raise UserError(f"{src} is not a DINOv2 checkpoint: expected the torch.hub layout (cls_token, pos_embed, "
                    f"blocks.N...) or transformers' (embeddings.cls_token, ...); found e.g. {shown(sorted(state), 3)}")


def _dino_from_hf_dir(src: Path, flavour: Flavour) -> EncoderWeights:
    if not (src / "config.json").is_file():
        raise UserError(f"not a Hugging Face Dinov2 directory (no config.json): {src}")
    config = _read_config(src)
    where = src / "config.json"
    if config.get("model_type") != "dinov2":
        raise UserError(f"{where}: model_type {config.get('model_type')!r}, expected 'dinov2' "
                        "(DINOv2 with registers is not supported)")
    for key in ("num_attention_heads",):  # shapes cannot show it; the rest is checked on the weights
        if key in config and key in flavour.dino and int(config[key]) != int(flavour.dino[key]):
            raise UserError(f"{where}: {key} {config[key]} != {flavour.dino[key]} of flavour {flavour.name!r}")
    state = _strip_prefix(_read(src), "dinov2.")
    overrides = {"layer_norm_eps": float(config.get("layer_norm_eps", 1e-6)), "hidden_act": config.get("hidden_act", "gelu")}
    return _dino_hf_state(state, flavour, str(src), overrides)


def _dino_hf_state(state: dict[str, Recipe], flavour: Flavour, source: str,
                   overrides: dict[str, Any]) -> EncoderWeights:
    state, ignored = _split_off(state, r"^classifier\.")
    renamed, _ = rename(state, _HF_DINO_LEGACY, source, keep_unmatched=True)
    return _dino_finish(renamed, flavour, source, "hf", overrides, None, ignored=ignored)


def _dino_finish(state: dict[str, Recipe], flavour: Flavour, source: str, layout: str,
                 overrides: dict[str, Any], hub_offset: Optional[float], *, unmatched: Sequence[str] = (),
                 ignored: Sequence[str] = (), notes: tuple[str, ...] = ()) -> EncoderWeights:
    key = "embeddings.position_embeddings"
    if key in state:
        grid, where = _dino_grid(flavour), f"{source} ({key})"
        state[key] = state[key].then(lambda pos: resample_positions(pos, grid, source=where, hub_offset=hub_offset))
        state[key].shape  # its checks (square grid, the result's size) run now, on the header's shape
    check_fits(_meta_shapes(build_dino, flavour), state, f"DINOv2 weights {source} ({layout} layout)",
                  f"flavour {flavour.name!r} (dino_input {flavour.dino_input})", unexpected_extra=unmatched)
    return EncoderWeights("dino", layout, state, overrides, source, tuple(ignored), notes)
