"""How a shard stores an image: the scaled image, losslessly compressed, plus its tiling plan.

A canvas is the scaled image (w'×h') pasted at an offset on a C×C field of the padding colour,
and the views are cut from the canvas (``models.tiling``). So storing the scaled image and
where it sits stores every view: :func:`views` pastes it back and cuts the same views with the
same code (``models.tiling.cut_views``). The codec is lossless, so the views are bit for bit
what serving cuts from the same source bytes (``models.tiling.load_and_tile``).

    >>> stored = store(jpeg_bytes, spec, max_pixels=64_000_000)  # preprocess
    >>> stored.data[:4], stored.plan                             # WebP, [w', h', x0, y0]
    (b'RIFF', [448, 224, 0, 0])
    >>> views(stored.data, stored.plan, stored.kept, spec).shape              # training: [1 + kept, S, S, 3]
    (3, 224, 224, 3)

Codecs (``data.image_codec``), measured on ``benchmarks/preprocess.py``'s JPEGs (448 px canvas):
``webp`` (lossless, method 0: 0.64× the source JPEG bytes, ~13 ms to encode, ~3 ms to decode)
and ``png`` (level 1: 0.76×, ~13 ms / ~6 ms). The raw views they replace took ~3.5×.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.tiling import (DEFAULT_MAX_PIXELS, ImageError, ImageInput, TilePlan, TileSpec, cut_views, draft_canvas,
                           load_image, scale_image)

CODECS = ("webp", "png")
_SAVE = {"webp": dict(format="WEBP", lossless=True, method=0, quality=0, exact=True),
         "png": dict(format="PNG", compress_level=1)}


@dataclass(frozen=True)
class StoredImage:
    """One image as a shard holds it.

    data: the scaled w'×h' RGB image, encoded with the codec. plan: ``[w', h', x0, y0]``.
    kept: bool [G*G] (the plan's tile mask). original_size: (W, H) after EXIF transpose.
    """

    data: bytes
    plan: list[int]
    kept: np.ndarray
    original_size: tuple[int, int]

    @property
    def n_views(self) -> int:
        return 1 + int(self.kept.sum())


def store(data: ImageInput, spec: TileSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
          codec: str = "webp") -> StoredImage:
    """Image bytes -> the stored form (decode as serving does, scale, compress losslessly)."""
    if codec not in CODECS:
        raise ValueError(f"image codec must be one of {CODECS}, got {codec!r}")
    scaled, layout, original = scale_image(
        load_image(data, max_pixels=max_pixels, mean_u8=spec.mean_u8, canvas=draft_canvas(spec)), spec)
    buf = io.BytesIO()
    scaled.save(buf, **_SAVE[codec])
    (w, h), (x0, y0) = layout.scaled_size, layout.offset
    return StoredImage(data=buf.getvalue(), plan=[w, h, x0, y0], kept=layout.kept, original_size=original)


def views(data: bytes, plan: list[int], kept: np.ndarray, spec: TileSpec) -> np.ndarray:
    """Stored bytes + ``[w', h', x0, y0]`` + the kept mask -> views uint8 [1 + kept, S, S, 3]."""
    w, h, x0, y0 = (int(v) for v in plan)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            scaled = im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("corrupt_image", f"stored image does not decode: {err}") from None
    return cut_views(scaled, TilePlan(scaled_size=(w, h), offset=(x0, y0), kept=np.asarray(kept, bool)), spec)


def row_views(images: list[bytes], plans: list[int], kept: list[bool], spec: TileSpec) -> bytes:
    """A shard row's ``images`` / ``plans`` (4 per image) / ``kept`` (G·G per image) -> the raw
    views of all its images, concatenated (uint8 [Σ(1 + kept), S, S, 3] as bytes)."""
    per = spec.grid * spec.grid if spec.grid > 1 else 0
    if len(plans) != 4 * len(images) or len(kept) != per * len(images):
        raise ImageError("corrupt_image", f"{len(images)} stored images but {len(plans)} plan values and "
                                          f"{len(kept)} kept flags (expected {4 * len(images)} and "
                                          f"{per * len(images)})")
    out = [views(data, plans[4 * i:4 * i + 4], np.asarray(kept[per * i:per * (i + 1)], bool), spec)
           for i, data in enumerate(images)]
    return np.concatenate(out).tobytes() if out else b""
