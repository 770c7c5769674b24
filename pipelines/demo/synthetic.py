"""The demo's synthetic multimodal dataset: rendered scenes, rendered words, text-only chat.

No dataset can be downloaded here, so the demo trains on scenes it draws itself (PIL),
in the LLaVA / SPHINX conversation format (docs/interfaces.md "models.conversation"). Everything is seeded: the same
``(n_train, n_heldout, seed)`` gives byte-identical files.

Samples (one image each, or none):

- **scene**: 1–4 shapes of ONE kind (circle, square, triangle, diamond) and ONE colour
  (red, green, blue, yellow, purple, orange) at random, non-overlapping positions on a
  light background. Questions: ``colour``, ``shape``, ``count``.
- **word**: one word of a closed vocabulary (:data:`WORDS`) rendered in dark ink at a
  random size near the centre, on square or wide images (a word in a 1:3 strip is a few pixels
  tall on the debug flavour's 64 px canvas). Question: ``text`` (OCR-style).
- **chat**: text only, "Repeat the word: X" -> "X" (the paper mixes text-only data into
  its one training stage; these keep the LLM's text path exercised).
- **where** (with ``regions=True``): a scene of ONE shape is also asked where it is, in
  SPHINX's referring form ("Please provide the bounding box coordinate of the region this
  sentence describes: the red square.") and answered with its box (see "Region samples").

Images come in a spread of aspect ratios (:data:`ASPECTS`: square, 3:2, 2:1, 4:1
panoramas, 1:2 and 1:3 tall images) so that skip tokens matter: a 4:1 panorama keeps only
the top row of a 2x2 grid.

Answers are ONE canonical word (``red``, ``circle``, ``3``, ``sun``), so accuracy is an
exact match. The held-out split is drawn from a different random stream: its *scenes*
are new (no image of the held-out split occurs in training), but the answer vocabulary is
closed and shared — the tiny demo model cannot learn to read words it never saw in
minutes, so the text task is recognising a closed set of words in unseen renderings, not
open-vocabulary OCR. Text-only ``chat`` prompts repeat words of the same closed list.

Training rows carry every question about their image as a multi-turn conversation (the
image is encoded once for several answers); held-out rows carry one question each, plus
``type`` and ``answer`` for scoring::

    train.jsonl   {"id": "train-00007", "image": "images/train-00007.png",
                   "conversations": [{"from": "human", "value": "<image>\\nWhat colour are the shapes?"},
                                     {"from": "gpt", "value": "red"}, ...]}
    heldout.jsonl {"id": "heldout-00003-count", "image": "images/heldout-00003.png",
                   "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"}],
                   "type": "count", "answer": "3"}
    stats.json    per question type: training answer counts, majority answer, baseline accuracy

Region samples (``regions=True``) follow the region layouts' convention (``actors.data.layouts.base``):
the answer is the slot ``<box:0>`` and the row carries ``boxes`` ``[[image, x1, y1, x2, y2]]`` in
pixels of its image; preprocess writes the slot as SPHINX's ``[x1,y1,x2,y2]`` in the flavour's
canvas frame (``actors.data.regions``, ``models.boxes``), so one file trains either padding.
The ``llava`` reader carries a record's ``boxes`` (``actors.data.rows.record_boxes``: a slot without
a box, a malformed box or one of a missing image is quarantined ``bad_box``), so these rows train
as written::

    train.jsonl   {..., "conversations": [..., {"from": "human", "value": "Please provide the bounding box
                   coordinate of the region this sentence describes: the red square."},
                   {"from": "gpt", "value": "<box:0>"}], "boxes": [[0, 40.5, 12.25, 98.0, 69.75]]}
    heldout.jsonl {"id": "heldout-00004-where", ..., "type": "where", "answer": "[40.5, 12.25, 98.0, 69.75]",
                   "boxes": [[0, 40.5, 12.25, 98.0, 69.75]]}

A held-out ``where`` answer is the pixel box (``actors.eval.grounding`` scores a predicted box by
IoU >= 0.5 against it); its baseline in ``stats.json`` is the Acc@IoU>=0.5 of one fixed guess,
the mean training box (in fractions of the image) placed on each held-out image.

Written to a local directory or to storage (``cluster.storage.Storage``) by :func:`write`.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageDraw, ImageFont

from models.errors import UserError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (235, 200, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNTS = (1, 2, 3, 4)
# visually distinct at the debug flavour's resolution: lengths 2-8 and different
# ascender / descender patterns (no near-twins such as "cat" / "car")
WORDS = ("ox", "sun", "dog", "fish", "tree", "zebra", "apple", "kangaroo")
WORD_JITTER = 0.1  # a word's place: the centre ± 5 % of the free space (see render_word)
# (width, height) in pixels of the original image; the long side is 192 px at most
ASPECTS: tuple[tuple[int, int], ...] = (
    (128, 128), (192, 128), (192, 96), (192, 48), (96, 192), (64, 192),
)
QUESTION_TYPES = ("colour", "shape", "count", "text", "chat")
REGION_TYPE = "where"  # with regions=True: a one-shape scene's box
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour are the shapes?", "Which colour do the shapes have?"),
    "shape": ("What shape is shown?", "Which kind of shape is in the picture?"),
    "count": ("How many shapes are there?", "Count the shapes."),
    "text": ("What word is written?", "Read the word in the image."),
    "chat": ("Repeat the word: {w}", "Say the word {w}."),
    # SPHINX's referring prompt (LLaMA2-Accessory accessory/eval_mm/annotations/annotation_config.json, refcoco)
    REGION_TYPE: ("Please provide the bounding box coordinate of the region this sentence describes: the {c} {s}.",
                  "Where is the {c} {s}?"),
}
ANSWER_HINT = " Answer with one word."
BOX_SLOT = "<box:0>"  # actors.data.regions.slot(0): the answer of a region question


def _hint(qtype: str) -> str:
    return "" if qtype == REGION_TYPE else ANSWER_HINT


@dataclass
class Sample:
    """One generated row; ``image`` is PNG bytes or None for text-only samples."""

    id: str
    kind: str  # scene | word | chat
    qa: list[tuple[str, str, str]]  # (type, question, answer)
    image: bytes | None = None
    size: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    boxes: list[list[float]] = field(default_factory=list)  # [image, x1, y1, x2, y2] pixels, for region questions

    @property
    def image_path(self) -> str | None:
        return f"images/{self.id}.png" if self.image is not None else None


@dataclass
class Dataset:
    train: list[Sample]
    heldout: list[Sample]
    seed: int

    def train_rows(self) -> list[dict]:
        """LLaVA rows, every question about an image as one multi-turn conversation."""
        rows = []
        for s in self.train:
            conv = []
            for i, (qtype, q, a) in enumerate(s.qa):
                prefix = "<image>\n" if (i == 0 and s.image is not None) else ""
                conv += [{"from": "human", "value": prefix + q + _hint(qtype)}, {"from": "gpt", "value": a}]
            row = {"id": s.id, "conversations": conv}
            if s.image is not None:
                row["image"] = s.image_path
            if s.boxes:
                row["boxes"] = s.boxes
            rows.append(row)
        return rows

    def heldout_rows(self) -> list[dict]:
        """One row per held-out question, with ``type`` and ``answer`` for scoring."""
        rows = []
        for s in self.heldout:
            for qtype, q, a in s.qa:
                prefix = "<image>\n" if s.image is not None else ""
                row = {"id": f"{s.id}-{qtype}",
                       "conversations": [{"from": "human", "value": prefix + q + _hint(qtype)}],
                       "type": qtype, "answer": a}
                if s.image is not None:
                    row["image"] = s.image_path
                if qtype == REGION_TYPE:  # the pixel box to score against (IoU), not the slot
                    row["answer"], row["boxes"] = json.dumps(s.boxes[0][1:]), s.boxes
                rows.append(row)
        return rows

    def stats(self) -> dict:
        """Answer counts per type in training, the majority answer, and the majority baseline
        (its accuracy on the held-out split; also on training for reference)."""
        train = _answers(self.train)
        held = _answers(self.heldout)
        out: dict[str, Any] = {"seed": self.seed, "train_samples": len(self.train),
                               "heldout_questions": sum(len(v) for v in held.values()),
                               "aspects": dict(Counter(f"{w}x{h}" for s in self.train + self.heldout
                                                       if s.size for w, h in [s.size])),
                               "types": {}}
        for qtype in QUESTION_TYPES:
            counts = Counter(train.get(qtype, []))
            if not counts:
                continue
            majority, n = counts.most_common(1)[0]
            h = held.get(qtype, [])
            out["types"][qtype] = {
                "train_answers": dict(sorted(counts.items())),
                "majority": majority,
                "baseline_train": n / sum(counts.values()),
                "baseline": (sum(a == majority for a in h) / len(h)) if h else None,
                "heldout": len(h),
            }
        if any(s.boxes for s in self.train):
            out["types"][REGION_TYPE] = self._region_stats()
        return out

    def _region_stats(self) -> dict:
        """The fixed-guess baseline of ``where``: the mean training box, in fractions of each
        image, scored on the held-out boxes at IoU >= 0.5."""
        from actors.eval.grounding import IOU_THRESHOLD, box_iou

        def fractions(s: Sample) -> list[float]:
            w, h = s.size
            return [v / d for v, d in zip(s.boxes[0][1:], (w, h, w, h))]

        train = [fractions(s) for s in self.train if s.boxes]
        mean = [round(sum(c) / len(train), 4) for c in zip(*train)]
        held = [s for s in self.heldout if s.boxes]
        hits = sum(box_iou(mean, fractions(s)) >= IOU_THRESHOLD for s in held)
        return {"train_answers": len(train), "majority": mean, "baseline_train": None,
                "baseline": hits / len(held) if held else None, "heldout": len(held)}


def _answers(samples: list[Sample]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in samples:
        for qtype, _, a in s.qa:
            out.setdefault(qtype, []).append(a)
    return out


# ---------------------------------------------------------------- drawing


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    base = rng.randint(215, 250)
    tint = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))
    return Image.new("RGB", size, tint)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)


def render_scene(rng: random.Random, size: tuple[int, int], kind: str, colour: str, count: int) -> tuple[Image.Image, list]:
    """Draw ``count`` non-overlapping shapes, one per cell of a grid laid along the long side.

    Shapes are large (about 70-90 % of a cell) so they survive the 2x2 tiling of the debug
    flavour (canvas 96 px, global view 48 px). Returns the image and the shapes' boxes
    ``(x1, y1, x2, y2)`` in pixels.
    """
    w, h = size
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    # cells: 1 row across panoramas (ratio >= 2.5), else 2; at least 4 cells in all
    short, long = min(w, h), max(w, h)
    across = 1 if long / short >= 2.5 else 2
    along = int(long // min(short / across, long / -(-4 // across)))
    cols, rows = (along, across) if w >= h else (across, along)
    cw, ch = w / cols, h / rows
    cells = rng.sample([(c, r) for r in range(rows) for c in range(cols)], count)
    boxes = []
    for c, r in cells:
        side = min(cw, ch) * rng.uniform(0.7, 0.9)
        x0 = c * cw + rng.uniform(0, cw - side)
        y0 = r * ch + rng.uniform(0, ch - side)
        box = (x0, y0, x0 + side, y0 + side)
        _draw_shape(draw, kind, box, COLOURS[colour])
        boxes.append(box)
    return img, boxes


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(px: int) -> ImageFont.FreeTypeFont:
    if px not in _FONT_CACHE:
        _FONT_CACHE[px] = ImageFont.load_default(size=px)
    return _FONT_CACHE[px]


def render_word(rng: random.Random, size: tuple[int, int], word: str) -> Image.Image:
    """Draw ``word`` in dark ink, as large as fits 50-90 % of the width, near the centre.

    The place jitters by ``WORD_JITTER`` of the free space around the centre. The demo's
    encoders are random (nothing can be downloaded): a linear probe on their features reads
    a centred word in unseen renderings (size, ink, background, aspect ratio) perfectly, but
    only 0.39 of words placed anywhere (0.73 at a jitter of 0.3) — so words stay near the
    centre, while the scenes' shapes go anywhere.
    """
    w, h = size
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    target = w * rng.uniform(0.5, 0.9)
    px = max(8, int(min(h * 0.8, target / max(1, len(word)) * 1.7)))
    while px > 8:
        l, t, r, b = draw.textbbox((0, 0), word, font=_font(px))
        if r - l <= target and b - t <= h * 0.9:
            break
        px -= 2
    l, t, r, b = draw.textbbox((0, 0), word, font=_font(px))
    free_x, free_y = max(0.0, w - (r - l)), max(0.0, h - (b - t))
    x = free_x * (0.5 + WORD_JITTER * rng.uniform(-0.5, 0.5)) - l
    y = free_y * (0.5 + WORD_JITTER * rng.uniform(-0.5, 0.5)) - t
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    draw.text((x, y), word, fill=ink, font=_font(px))
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------- sampling


def _make_sample(rng: random.Random, sid: str, kind: str, all_questions: bool, regions: bool = False) -> Sample:
    """One sample; training samples ask every question, held-out ones too (split later). With
    ``regions``, a scene of one shape is also asked where it is (its answer the slot ``<box:0>``)."""
    def q(qtype: str, **kw: str) -> str:
        return rng.choice(QUESTIONS[qtype]).format(**kw)

    if kind == "chat":
        word = rng.choice(WORDS + tuple(COLOURS) + SHAPES)
        return Sample(sid, kind, [("chat", q("chat", w=word), word)])
    if kind == "word":
        size = rng.choice([a for a in ASPECTS if a[0] >= a[1]])
        word = rng.choice(WORDS)
        img = render_word(rng, size, word)
        return Sample(sid, kind, [("text", q("text"), word)], _png(img), size, {"word": word})
    size = rng.choice(ASPECTS)
    shape, colour, count = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(COUNTS)
    img, boxes = render_scene(rng, size, shape, colour, count)
    qa = [("colour", q("colour"), colour), ("shape", q("shape"), shape), ("count", q("count"), str(count))]
    rng.shuffle(qa)
    where = []
    if regions and count == 1:  # its own random stream: the images and other questions stay as without regions
        own = random.Random(f"{sid}:{REGION_TYPE}:{boxes[0]}")
        qa.insert(own.randint(0, len(qa)), (REGION_TYPE, own.choice(QUESTIONS[REGION_TYPE]).format(c=colour, s=shape),
                                            BOX_SLOT))
        where = [[0] + [round(v, 2) for v in boxes[0]]]
    meta = {"shape": shape, "colour": colour, "count": count,
            "boxes": [[round(v / s, 3) for v, s in zip(b, (*size, *size))] for b in boxes]}
    return Sample(sid, kind, qa, _png(img), size, meta, where)


def _kinds(rng: random.Random, n: int, mix: tuple[float, float, float]) -> list[str]:
    """Exactly proportional kinds (scene, word, chat), shuffled."""
    n_word = round(n * mix[1])
    n_chat = round(n * mix[2])
    kinds = ["word"] * n_word + ["chat"] * n_chat + ["scene"] * (n - n_word - n_chat)
    rng.shuffle(kinds)
    return kinds


def generate(n_train: int, n_heldout: int, seed: int = 0,
             mix: tuple[float, float, float] = (0.6, 0.3, 0.1), *, regions: bool = False) -> Dataset:
    """Draw ``n_train`` training samples and ``n_heldout`` held-out samples.

    ``mix`` is the share of (scene, word, chat) samples; ``regions`` adds the ``where`` question
    to every one-shape scene (without it the files are exactly those of earlier versions). The two splits use independent
    random streams; any held-out image that happens to equal a training image is redrawn,
    so no held-out image was seen in training.
    """
    if n_train < 1 or n_heldout < 0:
        raise UserError(f"synthetic: need n_train >= 1 and n_heldout >= 0, got {n_train}, {n_heldout}")
    if abs(sum(mix) - 1) > 1e-6 or min(mix) < 0:
        raise UserError(f"synthetic: mix must be three non-negative shares summing to 1, got {mix}")
    rng = random.Random(f"sphinx-x-synthetic:{seed}:train")
    train = [_make_sample(rng, f"train-{i:05d}", k, True, regions) for i, k in enumerate(_kinds(rng, n_train, mix))]
    seen = {s.image for s in train if s.image is not None}
    rng = random.Random(f"sphinx-x-synthetic:{seed}:heldout")
    heldout = []
    for i, k in enumerate(_kinds(rng, n_heldout, mix)):
        s = _make_sample(rng, f"heldout-{i:05d}", k, True, regions)
        while s.image is not None and s.image in seen:  # vanishingly rare; redraw
            s = _make_sample(rng, s.id, k, True, regions)
        heldout.append(s)
    return Dataset(train, heldout, seed)


# ---------------------------------------------------------------- writing


class _Writable(Protocol):
    def write_bytes(self, path: str, data: bytes) -> Any: ...


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def files(ds: Dataset) -> dict[str, bytes]:
    """Every file of the dataset, relative path -> bytes (images, jsonl, stats)."""
    out = {s.image_path: s.image for s in ds.train + ds.heldout if s.image is not None}
    out["train.jsonl"] = _jsonl(ds.train_rows())
    out["heldout.jsonl"] = _jsonl(ds.heldout_rows())
    out["stats.json"] = json.dumps(ds.stats(), indent=1, sort_keys=True).encode()
    return out


def write(ds: Dataset, target: str | Path, storage: Any = None, *, threads: int = 8) -> dict[str, str]:
    """Write the dataset under ``target``: a local directory, or, with ``storage`` (a
    ``cluster.storage.Storage``), a path inside it (``storage.path(target)`` joins it).

    Returns the locations of ``train.jsonl``, ``heldout.jsonl``, ``stats.json`` and the
    image root, as local paths or ``s3://`` URIs.
    """
    blobs = files(ds)
    if storage is None:
        root = Path(target)
        for rel, data in blobs.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        where = lambda rel: str(root / rel)  # noqa: E731
    else:
        from concurrent.futures import ThreadPoolExecutor

        prefix = str(target).strip("/")
        # images first, the jsonl files and stats last: a reader that sees them sees all images
        order = sorted(blobs, key=lambda r: (not r.startswith("images/"), r))
        images = [r for r in order if r.startswith("images/")]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: storage.write_bytes(storage.path(prefix, r), blobs[r]), images))
        for rel in order[len(images):]:
            storage.write_bytes(storage.path(prefix, rel), blobs[rel])
        where = lambda rel: storage.uri_for(prefix, rel)  # noqa: E731
    return {"train": where("train.jsonl"), "heldout": where("heldout.jsonl"),
            "stats": where("stats.json"), "image_root": where("").rstrip("/")}


def load_heldout(data: bytes) -> list[dict]:
    """Parse ``heldout.jsonl`` bytes; every row must have ``type`` and ``answer``."""
    rows = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"heldout.jsonl line {n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "type" not in row or "answer" not in row:
            raise UserError(f"heldout.jsonl line {n}: a held-out row needs 'type' and 'answer'")
        rows.append(row)
    return rows


def normalise_answer(text: str) -> str:
    """The exact-match key: lowercase first word, punctuation stripped ("Red." -> "red"); the eval
    harness's ``first_word`` metric, which scores the demo."""
    from actors.eval.open_answer import first_word

    return first_word(text)
