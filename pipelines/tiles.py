"""`sphinx-x tiles IMAGE --flavour F [--json] [--png OUT]`: how one image is tiled.

Runs the same :func:`models.tiling.load_and_tile` that preprocess and serving use, then
reports the grid, the kept and skipped sub-images and the LLM token count.

    $ sphinx-x tiles cat.jpg --flavour tiny --json
    {"image": "cat.jpg", "flavour": "tiny", "grid": [2, 2], "tile_size": 224, "canvas": 448,
     "original_size": [1000, 500], "scaled_size": [448, 224], "kept": [[0, 0], [0, 1]],
     "skipped": [[1, 0], [1, 1]], "views": 3, "tokens_per_view": 257, "image_tokens": 779,
     "tokens_saved": 516}

``--png OUT`` draws the canvas (kept tiles outlined and labelled, skipped tiles hatched, the
scaled image's extent dashed) next to the global view.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from models.errors import UserError
from models.flavours import FLAVOURS, from_name, unknown_flavour
from models.tiling import DEFAULT_MAX_PIXELS, TiledImage, TileSpec, image_token_count, load_and_tile, tokens_saved

_PANEL = 480  # display side of the canvas and of the global view in the PNG
_KEPT = (0, 170, 90)
_SKIPPED = (90, 90, 90)
_EXTENT = (220, 40, 40)


def describe(tiled: TiledImage, spec: TileSpec, tokens_per_view: int) -> dict[str, Any]:
    """The JSON summary of one tiled image (every number from the one rule)."""
    w, h = tiled.original_size
    return {
        "grid": [spec.grid, spec.grid],
        "tile_size": spec.tile_size,
        "canvas": spec.canvas,
        "original_size": list(tiled.original_size),
        "scaled_size": list(tiled.scaled_size),
        "kept": [list(rc) for rc in tiled.tiles(kept=True)],
        "skipped": [list(rc) for rc in tiled.tiles(kept=False)],
        "views": int(tiled.views.shape[0]),
        "tokens_per_view": tokens_per_view,
        "image_tokens": image_token_count(w, h, spec, tokens_per_view),
        "tokens_saved": tokens_saved(tiled.kept, tokens_per_view),
    }


def _summary(info: dict[str, Any]) -> str:
    g, s = info["grid"][0], info["tile_size"]
    (W, H), (w, h) = info["original_size"], info["scaled_size"]
    lines = [f"{info['image']}: {W}x{H} -> {w}x{h} on a {info['canvas']}x{info['canvas']} canvas "
             f"(flavour {info['flavour']}, grid {g}x{g}, tiles {s} px)"]
    if g == 1:
        lines.append("grid 1: global view only")
    else:
        fmt = lambda tiles: " ".join(f"({r},{c})" for r, c in tiles) or "none"  # noqa: E731
        lines.append(f"kept {len(info['kept'])}: {fmt(info['kept'])}   skipped {len(info['skipped'])}: "
                     f"{fmt(info['skipped'])}")
    n = info["tokens_per_view"]
    lines.append(f"image tokens: {info['views']} views x ({n} + 2) + {len(info['skipped'])} skip = "
                 f"{info['image_tokens']} (skipping saves {info['tokens_saved']})")
    return "\n".join(lines)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _dashed_rect(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill, dash: int = 8) -> None:
    x0, y0, x1, y1 = box
    for x in range(x0, x1, 2 * dash):
        draw.line([(x, y0), (min(x + dash, x1), y0)], fill=fill, width=2)
        draw.line([(x, y1), (min(x + dash, x1), y1)], fill=fill, width=2)
    for y in range(y0, y1, 2 * dash):
        draw.line([(x0, y), (x0, min(y + dash, y1))], fill=fill, width=2)
        draw.line([(x1, y), (x1, min(y + dash, y1))], fill=fill, width=2)


def render_png(tiled: TiledImage, spec: TileSpec, info: dict[str, Any]) -> Image.Image:
    """Canvas with kept/skipped tiles (left) and the global view (right), titled with the counts."""
    g, s, c = spec.grid, spec.tile_size, spec.canvas
    k = _PANEL / c  # display pixels per canvas pixel
    canvas = Image.fromarray(tiled.canvas(spec.mean_u8)).resize((_PANEL, _PANEL), Image.Resampling.NEAREST)
    glob = Image.fromarray(tiled.views[0]).resize((_PANEL, _PANEL), Image.Resampling.NEAREST)
    pad, top = 20, 64
    out = Image.new("RGB", (3 * pad + 2 * _PANEL, top + _PANEL + pad), (255, 255, 255))
    out.paste(canvas, (pad, top))
    out.paste(glob, (2 * pad + _PANEL, top))
    draw = ImageDraw.Draw(out, "RGBA")
    title, small = _font(18), _font(14)
    draw.text((pad, 8), f"{Path(info['image']).name}: {info['flavour']}, grid {g}x{g}, tile {s} px, "
              f"{len(info['kept'])} kept, {len(info['skipped'])} skipped, {info['image_tokens']} image tokens",
              fill=(0, 0, 0), font=title)
    draw.text((pad, 36), f"canvas {c}x{c} (image {info['scaled_size'][0]}x{info['scaled_size'][1]}, dashed)",
              fill=(60, 60, 60), font=small)
    draw.text((2 * pad + _PANEL, 36), f"global view: canvas -> {s}x{s} (first view)", fill=(60, 60, 60), font=small)
    kept = set(map(tuple, info["kept"]))
    for r in range(g):
        for col in range(g):
            x0, y0 = pad + round(col * s * k), top + round(r * s * k)
            x1, y1 = pad + round((col + 1) * s * k) - 1, top + round((r + 1) * s * k) - 1
            if g == 1:
                draw.rectangle((x0, y0, x1, y1), outline=_KEPT, width=3)
                continue
            if (r, col) in kept:
                draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=_KEPT, width=3)
                label, colour = f"({r},{col}) kept", _KEPT
            else:
                draw.rectangle((x0, y0, x1, y1), fill=(*_SKIPPED, 110))
                for d in range(-(y1 - y0), x1 - x0, 14):  # hatching, clipped to the tile
                    a = (x0 + max(d, 0), y0 + max(-d, 0))
                    b = (x0 + min(d + y1 - y0, x1 - x0), y0 + min(x1 - x0 - d, y1 - y0))
                    draw.line([a, b], fill=(255, 255, 255, 140), width=1)
                label, colour = f"({r},{col}) skipped: 1 token", _SKIPPED
            box = draw.textbbox((x0 + 6, y0 + 6), label, font=small)
            draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(255, 255, 255, 220))
            draw.text((x0 + 6, y0 + 6), label, fill=colour, font=small)
    w, h = info["scaled_size"]
    _dashed_rect(draw, (pad, top, pad + max(1, round(w * k)) - 1, top + max(1, round(h * k)) - 1), _EXTENT)
    draw.rectangle((2 * pad + _PANEL, top, 2 * pad + 2 * _PANEL - 1, top + _PANEL - 1), outline=(0, 0, 0), width=1)
    return out


def command(args: argparse.Namespace) -> int:
    if args.flavour not in FLAVOURS:
        raise UserError(unknown_flavour(args.flavour))
    flavour = from_name(args.flavour)
    spec = TileSpec.from_flavour(flavour)
    path = Path(args.image)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror or err}") from None
    try:
        tiled = load_and_tile(data, spec, max_pixels=DEFAULT_MAX_PIXELS)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    info = {"image": str(path), "flavour": flavour.name, **describe(tiled, spec, flavour.tokens_per_view)}
    if args.png:
        out = Path(args.png)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            render_png(tiled, spec, info).save(out, "PNG")
        except OSError as err:
            raise UserError(f"cannot write {out}: {err.strerror or err}") from None
        info["png"] = str(out)
    if args.json:
        print(json.dumps(info))
    else:
        print(_summary(info) + (f"\nwrote {info['png']}" if args.png else ""))
    return 0
