"""What each encoder sees under ``flavour.resample == "release"``: the official release's own resampling.

The release pads the image to a square at its own size (``PadToSquare``), resizes that square to the
canvas C with PIL's bicubic (SPHINX/sphinx.py:33-34, accessory/data/transform.py:57-65; done by
models.tiling for a ``resample="release"`` TileSpec), normalises it (ToTensor, CLIP Normalize) and then,
inside the model, builds every encoder's views from the whole canvas with ``F.interpolate`` on
``x.half()`` (no antialiasing) and crops — resize-then-crop, in fp16. The views a model receives from
models.tiling are the canvas's G×G tiles (every tile is kept in the releases), so the canvas is put back
together from them here and each encoder's input is made as the release makes it:

    llama_type (file:lines)                 global view                        tiles
    llama_ens_light (:370-374)              DINOv2: bicubic fp16 C -> 224;     (none)
                                            ConvNeXt: nearest fp16 C -> 512
    llama_ens5_light (:370-385)             DINOv2: bicubic fp16 C -> 224      crops of bicubic fp16 C -> 448
                                            ConvNeXt: bicubic fp16 C -> 512    crops of the canvas itself
    llama_ens (:393-424)                    every encoder: the 224 canvas; the ConvNeXt's then nearest fp16 -> 256
    llama_ens5 (:383-385)                   bicubic fp16 C -> 224              crops of the canvas (224)
                                            then each view as llama_ens
    mixtral_sparse_ens (:669-694)           Q-Former, CLIP, DINOv2: bicubic fp16 C -> 224;
                                            ConvNeXt: nearest fp16 C -> 512
    mixtral_sparse_ens5 (:682-721)          as llama_ens5_light; the Q-Former and CLIP as DINOv2

DINOv2's input is the release's re-normalisation of the CLIP-normalised view:
``(x·clip_std + clip_mean - dino_mean) / dino_std``. Sizes come from the flavour (``dino_input``,
``tile_size``, ``convnext_input``), so the same code runs the real shapes and any other.

    >>> inputs = release_inputs(views, flavour)        # views uint8 [I·(1 + G²), S, S, 3]
    >>> inputs["dino"].shape                            # [I·(1 + G²), 3, 224, 224], global view first
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.errors import UserError
from models.flavours import IMAGENET_MEAN, IMAGENET_STD, Flavour


def _bicubic16(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x.half(), size=(size, size), mode="bicubic").to(x.dtype)


def _nearest16(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x.half(), size=(size, size)).to(x.dtype)


def _crops(x: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """[I, 3, H, H] → its grid × grid tiles, row-major (the release's [:s, :s], [:s, s:], [s:, :s], [s:, s:])."""
    s = x.shape[-1] // grid
    return [x[..., r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(grid) for c in range(grid)]


def _views(parts: list[torch.Tensor]) -> torch.Tensor:
    """[global, tile, tile, ...] each [I, 3, s, s] → [I·(1 + G²), 3, s, s], image by image."""
    return torch.stack(parts, dim=1).flatten(0, 1)


def canvas(views: torch.Tensor, grid: int) -> torch.Tensor:
    """uint8 views [I·(1 + G²), S, S, 3] (global first, then every tile) → the canvases uint8 [I, 3, C, C]."""
    per = 1 + (grid * grid if grid > 1 else 0)
    if views.shape[0] % per:
        raise UserError(f"{views.shape[0]} views are not whole images of {per} views each")
    x = views.view(-1, per, *views.shape[1:]).permute(0, 1, 4, 2, 3)  # [I, per, 3, S, S]
    if grid == 1:
        return x[:, 0]
    rows = [torch.cat([x[:, 1 + r * grid + c] for c in range(grid)], dim=-1) for r in range(grid)]
    return torch.cat(rows, dim=-2)


def release_inputs(views: torch.Tensor, flavour: Flavour) -> dict[str, torch.Tensor]:
    """uint8 views → {encoder: float input [V, 3, side, side]} as the flavour's release builds them
    (module docstring); keys ``convnext``, ``dino`` and, for the four-branch releases, ``clip``, ``qformer``."""
    if flavour.release not in _RELEASES:
        raise UserError(f"flavour {flavour.name!r}: resample 'release' needs a release (llama_type), got "
                        f"{flavour.release!r}; known: {', '.join(_RELEASES)}")
    g = flavour.grid

    def stat(values) -> torch.Tensor:  # on the views' device (a GPU replica's)
        return torch.tensor(values, device=views.device).view(1, 3, 1, 1)

    mean, std = stat(flavour.mean), stat(flavour.std)
    x = (canvas(views, g).float().div(255) - mean) / std  # ToTensor, then Normalize (its order)
    out = _RELEASES[flavour.release](x, flavour)
    out["dino"] = (out.pop("vit") * std + mean - stat(IMAGENET_MEAN)) / stat(IMAGENET_STD)
    return out


def _light(x: torch.Tensor, f: Flavour) -> dict[str, torch.Tensor]:
    if f.grid == 1:  # llama_ens_light
        return {"vit": _bicubic16(x, f.dino_input), "convnext": _nearest16(x, f.convnext_input)}
    vit = _views([_bicubic16(x, f.dino_input)] + _crops(_bicubic16(x, f.grid * f.dino_input), f.grid))
    conv = _views([_bicubic16(x, f.convnext_input)] + _crops(x, f.grid))
    return {"vit": vit, "convnext": conv}


def _ens(x: torch.Tensor, f: Flavour) -> dict[str, torch.Tensor]:
    if f.grid > 1:  # llama_ens5: the 224 views of the canvas, then each as llama_ens
        x = _views([_bicubic16(x, f.tile_size)] + _crops(x, f.grid))
    return {"vit": x, "clip": x, "qformer": x, "convnext": _nearest16(x, f.convnext_input)}


def _moe(x: torch.Tensor, f: Flavour) -> dict[str, torch.Tensor]:
    if f.grid == 1:  # mixtral_sparse_ens
        x224 = _bicubic16(x, f.dino_input)
        return {"vit": x224, "clip": x224, "qformer": x224, "convnext": _nearest16(x, f.convnext_input)}
    out = _light(x, f)  # mixtral_sparse_ens5: as llama_ens5_light
    return {**out, "clip": out["vit"], "qformer": out["vit"]}


_RELEASES = {"llama_ens_light": _light, "llama_ens5_light": _light, "llama_ens": _ens, "llama_ens5": _ens,
             "mixtral_sparse_ens": _moe, "mixtral_sparse_ens5": _moe}
