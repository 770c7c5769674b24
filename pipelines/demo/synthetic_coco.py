"""The demo's synthetic scenes as a COCO instances set: the input `sphinx-x curate som` reads.

Each scene holds 2–5 shapes of mixed kinds (``synthetic.SHAPES``: circle, square, triangle,
diamond) and colours, drawn as the demo draws them (``synthetic._draw_shape``), one per grid cell
so they never overlap. Every shape is one annotation: its box and its outline as a polygon
(a circle as a 32-gon), category = its kind. Seeded: the same ``(n, seed)`` gives the same bytes.

    >>> files = coco_scenes(20)
    >>> sorted(files)[:2]
    ['images/scene-00000.png', 'images/scene-00001.png']
    >>> json.loads(files["instances.json"])["categories"][0]
    {'id': 1, 'name': 'circle'}
"""

from __future__ import annotations

import io
import json
import math
import random

from PIL import ImageDraw

from pipelines.demo.synthetic import COLOURS, SHAPES, _background, _draw_shape

SIZES = ((256, 192), (192, 256), (256, 256), (320, 160))


def _outline(kind: str, box: tuple[float, float, float, float]) -> list[float]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        r = (x1 - x0) / 2
        pts = [(cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32)) for k in range(32)]
    elif kind == "square":
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif kind == "triangle":
        pts = [(cx, y0), (x1, y1), (x0, y1)]
    else:  # diamond
        pts = [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    return [round(v, 2) for p in pts for v in p]


def coco_scenes(n: int, seed: int = 0) -> dict[str, bytes]:
    """``{"instances.json": ..., "images/scene-00000.png": ..., ...}`` (write them under one folder)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    images, anns = [], []
    cats = {kind: k + 1 for k, kind in enumerate(SHAPES)}
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = _background(rng, (w, h))
        draw = ImageDraw.Draw(img)
        cols, rows = (3, 2) if w >= h else (2, 3)
        cw, ch = w / cols, h / rows
        for c, r in rng.sample([(c, r) for r in range(rows) for c in range(cols)], rng.randint(2, 5)):
            kind, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
            side = min(cw, ch) * rng.uniform(0.6, 0.85)
            x0, y0 = c * cw + rng.uniform(0, cw - side), r * ch + rng.uniform(0, ch - side)
            box = (x0, y0, x0 + side, y0 + side)
            _draw_shape(draw, kind, box, COLOURS[colour])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats[kind], "iscrowd": 0,
                         "bbox": [round(x0, 2), round(y0, 2), round(side, 2), round(side, 2)],
                         "segmentation": [_outline(kind, box)], "colour": colour})
        name = f"scene-{i:05d}.png"
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files[f"images/{name}"] = buf.getvalue()
        images.append({"id": i, "file_name": name, "width": w, "height": h})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": k, "name": kind} for kind, k in cats.items()]}
    files["instances.json"] = json.dumps(coco).encode()
    return files
