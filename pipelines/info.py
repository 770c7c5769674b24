"""`sphinx-x info --flavour F [--json]`: parameter counts and the token budget of a flavour.

The model is built on the meta device (no memory, no init), so even `moe` answers in a second.

    $ sphinx-x info --flavour plus --json
    {"flavour": "plus", "llm_arch": "llama", "is_moe": false,
     "params": {"llm": 13015864320, "vision": 1978169216,
                "vision_encoders": {"convnext": 843398016, "dino": 1134771200},
                "projector": 23608320, "total": ..., "trainable": ...},
     "tokens": {"tokens_per_view": 257, "view_tokens": 259, "grid": [2, 2], "tile_size": 224,
                "canvas": 448, "max_image_tokens": 1295,
                "examples": [{"size": [896, 448], "aspect": "2:1", "kept": 2, "skipped": 2,
                              "image_tokens": 779, "tokens_saved": 516}, ...]}}

``projector`` counts the Linear → LayerNorm projector plus the start/end/skip vectors;
``trainable`` is what one-stage training updates (everything but frozen encoders).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from models.flavours import FLAVOURS, Flavour, from_name, unknown_flavour
from models.errors import UserError
from models.tiling import TileSpec, image_token_count, kept_mask, tokens_saved

# (aspect label, W, H) in units of the canvas: a square, wide and tall images, a panorama
_EXAMPLES = [("1:1", 1, 1), ("2:1", 2, 1), ("1:2", 1, 2), ("4:1", 4, 1)]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(flavour: Flavour) -> dict[str, Any]:
    """Parameter counts of the whole model, built on the meta device."""
    from models.sphinx import SphinxX

    vocab = int(flavour.llm["vocab_size"])
    with torch.device("meta"):
        model = SphinxX(flavour, vocab_size=vocab, image_token_id=vocab - 1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    v = model.vision
    encoders = {"convnext": _count(v.convnext), "dino": _count(v.dino)}
    projector = _count(v.projector) + v.start.numel() + v.end.numel() + v.skip.numel()
    if v.clip is not None:  # the four-branch releases
        encoders["clip"] = _count(v.clip)
    if v.qformer is not None:
        encoders["qformer"] = _count(v.qformer)
        projector += _count(v.qformer_proj)
    total = _count(model)
    return {
        "llm": _count(model.llm),
        "vision": sum(encoders.values()),
        "vision_encoders": encoders,
        "projector": projector,
        "total": total,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def token_budget(flavour: Flavour) -> dict[str, Any]:
    """Tokens per view and per image (square, and a few aspect ratios with their skip savings)."""
    spec = TileSpec.from_flavour(flavour)
    n = flavour.tokens_per_view
    c = spec.canvas
    examples = []
    for label, w, h in _EXAMPLES:
        mask = kept_mask(w * c, h * c, spec)
        examples.append({"size": [w * c, h * c], "aspect": label, "kept": int(mask.sum()),
                         "skipped": int(len(mask) - mask.sum()),
                         "image_tokens": image_token_count(w * c, h * c, spec, n),
                         "tokens_saved": tokens_saved(mask, n)})
    return {
        "tokens_per_view": n,
        "view_tokens": n + 2,
        "grid": [spec.grid, spec.grid],
        "tile_size": spec.tile_size,
        "canvas": c,
        "max_image_tokens": image_token_count(c, c, spec, n),
        "examples": examples,
    }


def info(flavour: Flavour) -> dict[str, Any]:
    from models.geometry import describe, to_json

    return {
        "flavour": flavour.name,
        "llm_arch": flavour.llm_arch,
        "is_moe": flavour.is_moe,
        "notes": flavour.notes,
        "params": param_counts(flavour),
        "tokens": token_budget(flavour),
        "geometry": to_json(describe(flavour)),
    }


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def render(report: dict[str, Any]) -> str:
    p, t = report["params"], report["tokens"]
    lines = [
        f"flavour {report['flavour']} ({report['llm_arch']}{', MoE' if report['is_moe'] else ''})"
        + (f" — {report['notes']}" if report["notes"] else ""),
        "parameters (meta device):",
        f"  llm        {_human(p['llm']):>12}",
        f"  vision     {_human(p['vision']):>12}  ("
        + ", ".join(f"{k} {_human(n)}" for k, n in p["vision_encoders"].items()) + ")",
        f"  projector  {_human(p['projector']):>12}  (incl. start/end/skip)",
        f"  total      {_human(p['total']):>12}  (trainable {_human(p['trainable'])})",
        "token budget:",
        f"  {t['tokens_per_view']} tokens per view, {t['view_tokens']} with start/end; "
        f"grid {t['grid'][0]}x{t['grid'][1]} of {t['tile_size']} px (canvas {t['canvas']} px)",
        f"  max per image (square): {t['max_image_tokens']} tokens",
    ]
    for ex in t["examples"][1:]:
        lines.append(f"  {ex['aspect']:>4} {ex['size'][0]}x{ex['size'][1]}: {ex['kept']} kept, {ex['skipped']} skipped "
                     f"-> {ex['image_tokens']} tokens ({ex['tokens_saved']} saved)")
    g = report["geometry"]
    lines.append("geometry (value, then where it comes from):")
    rows = [("canvas", g["canvas"], "px"), ("tile", g["tile_size"], "px")]
    rows += [(f"{name} input", fig, "px") for name, fig in g["encoders"].items()]
    rows += [("per view", g["tokens_per_view"], "tokens"), ("per image", g["tokens_per_image"], "tokens")]
    for label, fig, unit in rows:
        lines.append(f"  {label:<15} {fig['value']:>5} {unit:<6}  {fig['source']}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    if args.weights:
        from pipelines.convert import weights_command

        return weights_command(args)
    if args.flavour not in FLAVOURS:
        raise UserError(unknown_flavour(args.flavour))
    report = info(from_name(args.flavour))
    print(json.dumps(report) if args.json else render(report))
    return 0
