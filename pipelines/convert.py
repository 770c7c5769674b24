"""`sphinx-x convert --from accessory SRC -o OUT` and `sphinx-x info --weights DIR`: weights in and out.

``convert`` reads an official LLaMA2-Accessory SPHINX release (models.weights.accessory: SPHINX, -1k,
-v2-1k, -MoE, -MoE-1k, -Tiny, -Tiny-1k) and writes one sphinx-x model directory (models.weights.model_dir),
then reads that directory back the way serving and training will and prints both: what the source held
and what was written.

    $ sphinx-x convert --from accessory SPHINX-Tiny-1k/ -o models/sphinx-tiny-1k
    source  SPHINX-Tiny-1k/ (llama_ens5_light, 2 model-parallel shard(s), bfloat16, 1152 tensors)
      SPHINX-Tiny-1k/consolidated.00-of-02.model.pth
      SPHINX-Tiny-1k/consolidated.01-of-02.model.pth
      tokenizer.model: 32000 words -> 32001 tokens with <image>
    model directory models/sphinx-tiny-1k (flavour sphinx-tiny-1k, bfloat16)
      llm               1.100 B  bfloat16  1 file(s)  keys: all 201 placed, none missing or unexpected
      convnext ...
      geometry      grid 2x2 of 512 px (canvas 1024), pad centre, skip tokens off, 257 tokens per view, ...

``info --weights DIR`` prints the model directory's parts, dtypes, parameter counts, tokenizer
and geometry from config.json and the safetensors headers (no tensor is read unless a part's
layout is not the one this version writes). Any missing, unexpected or mis-shaped key fails
with an error naming the file and the key (exit 1). ``--json``: one JSON object.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _human(n: int) -> str:  # as pipelines.info's (which imports this module: no import back)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def render_model_dir(report: dict[str, Any]) -> str:
    """models.weights.model_dir.inspect_model_dir's report as text."""
    g, ids, tok = report["geometry"], report["token_ids"], report["tokenizer"]
    kind = f"release {report['release']}, " if report.get("release") else ""
    lines = [f"model directory {report['path']} (flavour {report['flavour']}, {kind}{report['dtype']}; "
             f"{len(report.get('encoders', []))} visual towers: {', '.join(report.get('encoders', []))})"]
    for name, part in report["parts"].items():
        lines.append(f"  {name:<13} {_human(part['params']):>11}  {','.join(part['dtypes']):<9} "
                     f"{len(part['files'])} file(s)  keys: all {part['tensors']} placed, none missing or unexpected")
    p = report["params"]
    lines.append(f"  total         {_human(p['total']):>11}  (llm {_human(p['llm'])}, vision {_human(p['vision'])}, "
                 f"projector {_human(p['projector'])})")
    if tok:
        lines.append(f"  tokenizer     {tok['size']} tokens ({tok['class']}); vocab_size {ids['vocab_size']}, "
                     f"<image> {ids['image_token_id']}, bos {ids['bos_token_id']}, eos {ids['eos_token_id']}, "
                     f"pad {ids['pad_token_id']}")
    else:
        lines.append("  tokenizer     none in llm/")
    lines.append(f"  geometry      grid {g['grid']}x{g['grid']} of {g['tile_size']} px (canvas {g['canvas']}), "
                 f"pad {g['pad']}, skip tokens {'on' if g['skip_tokens'] else 'off'}, "
                 f"{'the release' if g.get('resample') == 'release' else 'this project'}'s resampling, "
                 f"{g['tokens_per_view']} tokens per view, up to {g['max_image_tokens']} per image")
    return "\n".join(lines)


def render_source(source: dict[str, Any]) -> str:
    lines = [f"source  {source['path']} ({source['llama_type']}, {source['mp_size']} model-parallel shard(s), "
             f"{source['dtype']}, {source['tensors']} tensors)"]
    lines += [f"  {f}" for f in source["files"]]
    lines.append(f"  tokenizer.model: {source['tokenizer_words']} words -> {source['tokenizer_size']} tokens "
                 "with <image>")
    for name, enc in source.get("encoders", {}).items():
        for note in enc["notes"]:
            lines.append(f"  {name}: {note}")
        if enc["ignored"]:
            lines.append(f"  {name}: ignored {', '.join(enc['ignored'])}")
    for key, diff in sorted(source["replica_max_diff"].items()):
        lines.append(f"  warning: replicas of {key} differ across shards by up to {diff:.3g} (shard 0's is used)")
    return "\n".join(lines)


def convert_command(args: argparse.Namespace) -> int:
    import torch

    from models.weights.accessory import convert_accessory

    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = convert_accessory(args.src, args.output, flavour=args.flavour, dtype=dtype)
    if args.json:
        print(json.dumps(report))
    else:
        print(render_source(report["source"]))
        print(render_model_dir(report["model_dir"]))
    return 0


def weights_command(args: argparse.Namespace) -> int:
    """`sphinx-x info --weights DIR [--json]`."""
    from models.weights.model_dir import inspect_model_dir

    report = inspect_model_dir(args.weights)
    print(json.dumps(report) if args.json else render_model_dir(report))
    return 0


def command(args: argparse.Namespace) -> int:
    return convert_command(args)
