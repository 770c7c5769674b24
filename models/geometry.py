"""Every flavour's image geometry as figures with their sources (``sphinx-x info``, docs/architecture.md "The model").

    >>> g = describe(from_name("sphinx-tiny-1k"))
    >>> g["canvas"]
    Figure(value=1024, source='release: accessory/model/LLM/llama_ens5_light.py:311 (image_size = 1024)')
    >>> g["tokens_per_image"].value, g["encoders"]["dino"].value
    (1295, 224)

A figure's ``source`` says where the number comes from, one of

- ``release: FILE:LINE (...)``: the official LLaMA2-Accessory code (commit ``RELEASE_COMMIT``, the
  path is inside that repository), for the flavours that load a public release;
- ``paper: ...``: the SPHINX-X paper (arXiv 2402.05935) as this project reads it;
- ``project: ...``: this project's own choice where neither fixes the number (the debug
  miniatures, the tile side of the paper flavours);
- ``override: ...``: the flavour was made with ``from_name(name, **overrides)`` and this figure
  differs from the registered ``name``.

Figures (S: the view side, C = G·S, N: tokens per view from the encoders):

    canvas            C, the padded square the image is scaled onto
    tile_size         S, the side of every view (the global view and each tile)
    encoders[name]    the side each encoder sees a view at (it resizes S to it)
    tokens_per_view   N + 2 (start/end); N counts the Q-Former's queries where there is one
    tokens_per_image  the most one image takes: (1 + G²)·(N + 2), or N + 2 when G = 1
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from models.flavours import FLAVOURS, Flavour

RELEASE_COMMIT = "Alpha-VLLM/LLaMA2-Accessory@3777c43"


@dataclass(frozen=True)
class Figure:
    value: int
    source: str


_PAPER = {
    "canvas": "paper: 2x2 sub-images plus the global view, C = 2·S (S: see tile)",
    "tile_size": "project: S = 224, DINOv2's input, so DINOv2 sees each view unresized (the paper fixes the "
                 "encoders' inputs, not the tile side)",
    "convnext": "paper: CLIP-ConvNeXt at 512 (project: each 224 view is upsampled bicubic to it)",
    "dino": "paper: DINOv2 at 224",
    "tokens_per_view": "paper: N = 256 patches + 1 CLS, plus start/end",
    "tokens_per_image": "paper: (1 + kept)·(N + 2) + skipped; a square image keeps all G² tiles",
}
_DEBUG = {
    "canvas": "project: a miniature for tests (G·S)",
    "tile_size": "project: a miniature for tests",
    "convnext": "project: a miniature for tests",
    "dino": "project: a miniature for tests",
    "clip": "project: a miniature for tests",
    "qformer": "project: a miniature for tests",
    "tokens_per_view": "project: the miniature encoders' grid + CLS, plus start/end",
    "tokens_per_image": "project: the paper's rule on the miniature's grid",
}


def _release(file: str, lines: dict[str, str]) -> dict[str, str]:
    return {key: f"release: accessory/model/LLM/{file}:{where}" for key, where in lines.items()}


# file:line in RELEASE_COMMIT; the transform that makes the canvas is SPHINX/sphinx.py:33-34
# (get_transform("padded_resize", image_size): accessory/data/transform.py:57-65, PadToSquare then Resize)
_RELEASES = {
    "llama_ens_light": _release("llama_ens_light.py", {
        "canvas": "311 (image_size = 512)",
        "tile_size": "311 (one view: the whole 512 canvas)",
        "convnext": "372-374 (F.interpolate to 512: the view as it is)",
        "dino": "370 (bicubic fp16 interpolate to 224)",
        "tokens_per_view": "310 (image_words = 257 + 2)",
        "tokens_per_image": "310 (image_words = 257 + 2)",
    }),
    "llama_ens5_light": _release("llama_ens5_light.py", {
        "canvas": "311 (image_size = 1024)",
        "tile_size": "379-385 (global view bicubic to 512, then the 2x2 tiles of 512 of the 1024 canvas)",
        "convnext": "379-387 (the 512 views as they are)",
        "dino": "370-377 (global view bicubic fp16 to 224; tiles cut from a bicubic 448 resize)",
        "tokens_per_view": "310 (image_words = (257 + 2) * 5)",
        "tokens_per_image": "310 (image_words = (257 + 2) * 5)",
    }),
    # the four-branch releases: 32 Q-Former queries + 257 (CLIP | ConvNeXt | DINOv2, channel-mixed) + start/end
    "llama_ens": _release("llama_ens.py", {
        "canvas": "336 (image_size = 224)",
        "tile_size": "336 (one view: the whole 224 canvas)",
        "convnext": "399-407 (F.interpolate(x.half(), 256), nearest: an 8x8 map, repeat_interleave 2 onto 16x16)",
        "dino": "422-424 (the 224 view as it is)",
        "clip": "398 (the 224 view as it is)",
        "qformer": "393 (the 224 view as it is)",
        "tokens_per_view": "335 (image_words = 32 + 257 + 2)",
        "tokens_per_image": "335 (image_words = 32 + 257 + 2)",
    }),
    "llama_ens5": _release("llama_ens5.py", {
        "canvas": "336 (image_size = 448)",
        "tile_size": "383-385 (global view bicubic fp16 to 224, then the 2x2 tiles of 224 of the 448 canvas)",
        "convnext": "406-414 (each 224 view nearest fp16 to 256: 8x8 repeated onto 16x16)",
        "dino": "429-431 (the 224 views as they are)",
        "clip": "405 (the 224 views as they are)",
        "qformer": "400 (the 224 views as they are)",
        "tokens_per_view": "335 (image_words = (32 + 257 + 2) * 5)",
        "tokens_per_image": "335 (image_words = (32 + 257 + 2) * 5)",
    }),
    "mixtral_sparse_ens": _release("mixtral_sparse_ens.py", {
        "canvas": "612 (image_size = 512)",
        "tile_size": "612 (one view: the whole 512 canvas)",
        "convnext": "676-678 (F.interpolate(x.half(), 512), nearest: the view, fp16-rounded)",
        "dino": "669, 692-694 (bicubic fp16 interpolate to 224)",
        "clip": "669, 675 (bicubic fp16 interpolate to 224)",
        "qformer": "669-670 (bicubic fp16 interpolate to 224)",
        "tokens_per_view": "611 (image_words = 32 + 257 + 2)",
        "tokens_per_image": "611 (image_words = 32 + 257 + 2)",
    }),
    "mixtral_sparse_ens5": _release("mixtral_sparse_ens5.py", {
        "canvas": "614 (image_size = 1024)",
        "tile_size": "691-697 (global view bicubic fp16 to 512, then the 2x2 tiles of 512 of the 1024 canvas)",
        "convnext": "705 (the 512 views as they are)",
        "dino": "682-689, 719-721 (global view bicubic fp16 to 224; tiles cut from a bicubic 448 resize)",
        "clip": "682-689, 704 (as DINOv2)",
        "qformer": "682-689, 699 (as DINOv2)",
        "tokens_per_view": "613 (image_words = (32 + 257 + 2) * 5)",
        "tokens_per_image": "613 (image_words = (32 + 257 + 2) * 5)",
    }),
}


def describe(flavour: Flavour) -> dict[str, Any]:
    """The flavour's figures: ``{"canvas", "tile_size", "tokens_per_view", "tokens_per_image": Figure,
    "encoders": {name: Figure}}`` (see the module docstring)."""
    g, s, n = flavour.grid, flavour.tile_size, flavour.tokens_per_view
    values = {
        "canvas": g * s,
        "tile_size": s,
        "convnext": flavour.convnext_input,
        "dino": flavour.dino_input,
        **({"clip": flavour.clip_input} if flavour.clip else {}),
        **({"qformer": flavour.qformer_input} if flavour.qformer else {}),
        "tokens_per_view": n + 2,
        "tokens_per_image": (1 + (g * g if g > 1 else 0)) * (n + 2),
    }
    sources = _sources(flavour)
    changed = _overridden(flavour)
    figures = {}
    for key, value in values.items():
        source = sources[key]
        if key in changed:
            source = f"override: {', '.join(sorted(changed[key]))} differ from the registered {flavour.name!r}"
        figures[key] = Figure(int(value), source)
    return {
        "canvas": figures["canvas"], "tile_size": figures["tile_size"],
        "encoders": {k: figures[k] for k in ("convnext", "dino", "clip", "qformer") if k in figures},
        "tokens_per_view": figures["tokens_per_view"], "tokens_per_image": figures["tokens_per_image"],
    }


def to_json(geometry: dict[str, Any]) -> dict[str, Any]:
    """:func:`describe`'s figures as ``{"value", "source"}`` objects."""
    def one(f: Figure) -> dict[str, Any]:
        return {"value": f.value, "source": f.source}

    out = {k: one(v) for k, v in geometry.items() if isinstance(v, Figure)}
    out["encoders"] = {k: one(v) for k, v in geometry["encoders"].items()}
    return out


def _sources(flavour: Flavour) -> dict[str, str]:
    if flavour.name.startswith("debug"):
        return _DEBUG
    if flavour.release is not None:
        return _RELEASES[flavour.release]
    if flavour.grid != 2:  # the paper's rule on another grid (plus-3x3)
        g = flavour.grid
        return {**_PAPER, "canvas": f"project: {g}x{g} sub-images plus the global view, C = {g}·S (the paper "
                                    "uses 2x2)",
                "tokens_per_image": f"paper's rule on the project's {g}x{g} grid: (1 + kept)·(N + 2) + skipped"}
    return _PAPER


# which flavour fields each figure is computed from (an override of any of them changes the figure)
_DEPENDS = {
    "canvas": ("grid", "tile_size"),
    "tile_size": ("tile_size",),
    "convnext": ("convnext_input",),
    "dino": ("dino_input",),
    "clip": ("clip_input",),
    "qformer": ("qformer_input",),
    "tokens_per_view": ("dino", "dino_input", "qformer"),
    "tokens_per_image": ("grid", "dino", "dino_input", "qformer"),
}


def _overridden(flavour: Flavour) -> dict[str, set[str]]:
    base = FLAVOURS.get(flavour.name)
    if base is None:
        return {key: {f"every field (no registered flavour {flavour.name!r})"} for key in _DEPENDS}
    differ = {f.name for f in fields(Flavour) if getattr(base, f.name) != getattr(flavour, f.name)}
    return {key: set(deps) & differ for key, deps in _DEPENDS.items() if set(deps) & differ}
