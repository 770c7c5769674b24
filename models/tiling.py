"""The one any-resolution rule (docs/architecture.md "The tiling rule"), shared by preprocess, training and serving.

An image of W×H pixels (after EXIF transpose) is scaled so that its long side is the canvas
side C = G·S, pasted on a C×C canvas filled with the uint8 mean colour, and cut into G×G tiles
of S×S, row-major. The global view (the whole canvas reduced to S×S) comes first, then the
kept tiles. Two settings (carried by the flavour, so a model is always fed the geometry it was
trained with) choose between the paper's rule and the official release's:

- ``pad``: ``"top_left"`` (the paper, the default) pastes the image at (0, 0); ``"centre"``
  (the released SPHINX models, LLaMA2-Accessory's ``PadToSquare``) at
  ``((C - w') // 2, (C - h') // 2)``.
- ``skip_tokens``: True (the paper) keeps a tile iff it holds at least one image pixel; the
  others are skipped (not encoded, one learnable skip token each). False (the release) keeps
  every tile: ``(1 + G²)·(N + 2)`` tokens for every image.
- ``resample``: ``"project"`` (the default) scales the image to w'×h' and pastes it on the canvas;
  ``"release"`` makes the canvas as the released models' transform does (``PadToSquare`` centres the
  image on a square of the padding colour at its own size, then ONE PIL bicubic resize of that square
  to C×C: SPHINX/sphinx.py:33-34, accessory/data/transform.py:57-65), so the padding's edge is
  resampled with the image; needs ``pad="centre"`` and ``skip_tokens=False``. JPEGs are then decoded
  at full size (no DCT-scaled draft), as the release decodes them. The scaled image of
  :func:`scale_image` is then the whole canvas (offset 0).

    >>> spec = TileSpec(grid=2, tile_size=224)
    >>> kept_mask(1000, 500, spec)                 # 2:1 wide -> scaled to 448×224
    array([ True,  True, False, False])
    >>> image_token_count(1000, 500, spec, tokens_per_view=257)
    779
    >>> t = tile_image(load_image(jpeg_bytes, max_pixels=64_000_000), spec)
    >>> t.views.shape, t.views.dtype               # [1 + kept, S, S, 3]: global view first
    ((3, 224, 224, 3), dtype('uint8'))
    >>> release = TileSpec(grid=2, tile_size=512, pad="centre", skip_tokens=False)
    >>> plan(1000, 500, release)                   # scaled 1024×512, centred at y = 256
    TilePlan(scaled_size=(1024, 512), offset=(0, 256), kept=array([ True,  True,  True,  True]))
    >>> image_token_count(1000, 500, release, tokens_per_view=257)   # 5 · 259
    1295

Pure numpy + PIL, deterministic. Rounding is round-half-up in exact integer arithmetic:
``w' = max(1, (2·W·C + M) // (2·M))`` with ``M = max(W, H)``, so no float ever decides a size.
Preprocess and serving should both call :func:`load_and_tile` (or ``load_image`` with the same
``canvas`` argument, then ``tile_image``) so that identical bytes give identical tiles.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
from PIL import Image, ImageOps

from models.errors import UserError

DEFAULT_MEAN_U8 = (123, 117, 104)  # CLIP mean · 255, rounded (models.flavours.Flavour.mean_u8)
DEFAULT_MAX_PIXELS = 64_000_000
PADS = ("top_left", "centre")
Pad = Literal["top_left", "centre"]
_ORIGINAL_SIZE = "sphinx_x_original_size"  # PIL info key: (W, H) before a JPEG draft
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0  # integer box-reduce first, then bicubic over the last <3x: fast, no aliasing

ImageInput = Union[bytes, bytearray, memoryview, Image.Image]


class ImageError(UserError):
    """A bad image; ``reason`` is short and machine-readable (errors datasets, HTTP 400).

    Reasons: ``corrupt_image`` (unreadable, truncated), ``too_many_pixels`` (over the limit or a
    decompression bomb), ``unsupported_mode`` (a pixel format with no sensible RGB meaning),
    ``bad_input`` (not bytes or a PIL image).
    """

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{detail} ({reason})")


@dataclass(frozen=True)
class TileSpec:
    """Grid G (G×G tiles), tile side S in pixels, the uint8 padding colour, where the image sits
    on the canvas (``pad``) and whether empty tiles become skip tokens (``skip_tokens``)."""

    grid: int
    tile_size: int
    mean_u8: tuple[int, int, int] = DEFAULT_MEAN_U8
    pad: Pad = "top_left"
    skip_tokens: bool = True
    resample: Literal["project", "release"] = "project"

    def __post_init__(self) -> None:
        if self.grid < 1 or self.tile_size < 1:
            raise ValueError(f"grid and tile_size must be >= 1, got {self.grid}, {self.tile_size}")
        if len(self.mean_u8) != 3 or not all(0 <= int(v) <= 255 for v in self.mean_u8):
            raise ValueError(f"mean_u8 must be 3 values in [0, 255], got {self.mean_u8}")
        if self.pad not in PADS:
            raise ValueError(f"pad must be one of {PADS}, got {self.pad!r}")
        if not isinstance(self.skip_tokens, bool):
            raise ValueError(f"skip_tokens must be a bool, got {self.skip_tokens!r}")
        if self.resample not in ("project", "release"):
            raise ValueError(f"resample must be 'project' or 'release', got {self.resample!r}")
        if self.resample == "release" and (self.pad != "centre" or self.skip_tokens):
            raise ValueError("resample 'release' needs pad 'centre' and skip_tokens False (the release's geometry)")

    @property
    def canvas(self) -> int:
        """C = G·S, the side of the square canvas."""
        return self.grid * self.tile_size

    @classmethod
    def from_flavour(cls, flavour: Any) -> "TileSpec":
        return cls(grid=flavour.grid, tile_size=flavour.tile_size, mean_u8=tuple(flavour.mean_u8),
                   pad=flavour.pad, skip_tokens=flavour.skip_tokens, resample=getattr(flavour, "resample", "project"))

    @classmethod
    def from_dict(cls, facts: dict[str, Any]) -> "TileSpec":
        """The inverse of :meth:`to_dict` (a manifest's ``tiling``; extra keys are ignored)."""
        return cls(grid=int(facts["grid"]), tile_size=int(facts["tile_size"]),
                   mean_u8=tuple(int(v) for v in facts.get("mean_u8", DEFAULT_MEAN_U8)),
                   pad=facts.get("pad", "top_left"), skip_tokens=bool(facts.get("skip_tokens", True)),
                   resample=facts.get("resample", "project"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a shard manifest or a model directory records of the geometry (``resample``
        only when it is the release's, so earlier records read the same)."""
        out = {"grid": self.grid, "tile_size": self.tile_size, "canvas": self.canvas,
               "mean_u8": [int(v) for v in self.mean_u8], "pad": self.pad, "skip_tokens": self.skip_tokens}
        return {**out, "resample": self.resample} if self.resample != "project" else out


@dataclass(frozen=True)
class TilePlan:
    """Where a W×H image lands on the canvas and which tiles are kept, decided without pixels.

    scaled_size: (w', h'). offset: (x0, y0), the pasted image's top-left corner on the canvas.
    kept: bool [G*G] row-major (empty for G = 1).
    """

    scaled_size: tuple[int, int]
    offset: tuple[int, int]
    kept: np.ndarray

    def __repr__(self) -> str:
        return f"TilePlan(scaled_size={self.scaled_size}, offset={self.offset}, kept={self.kept!r})"


@dataclass(frozen=True)
class TiledImage:
    """The views of one image.

    views: uint8 [1 + n_kept, S, S, 3] — global view, then kept tiles row-major.
    kept: bool [G*G] row-major (empty for G = 1). scaled_size: (w', h') on the canvas. original_size: (W, H).
    offset: (x0, y0) where the scaled image sits on the canvas; pad / skip_tokens: the spec's settings.
    """

    views: np.ndarray
    kept: np.ndarray
    scaled_size: tuple[int, int]
    original_size: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    pad: Pad = "top_left"
    skip_tokens: bool = True

    @property
    def grid(self) -> int:
        return int(round(len(self.kept) ** 0.5)) or 1  # G = 1: no sub-images, empty mask

    @property
    def tile_size(self) -> int:
        return int(self.views.shape[1])

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def n_skipped(self) -> int:
        return len(self.kept) - self.n_kept

    def tiles(self, kept: bool = True) -> list[tuple[int, int]]:
        """(r, c) of the kept (or, with ``kept=False``, the skipped) tiles, row-major."""
        g = self.grid
        return [(i // g, i % g) for i in range(len(self.kept)) if bool(self.kept[i]) == kept]

    def canvas(self, mean_u8: tuple[int, int, int] = DEFAULT_MEAN_U8) -> np.ndarray:
        """The C×C×3 canvas rebuilt from the kept tiles (skipped tiles are all padding)."""
        g, s = self.grid, self.tile_size
        out = np.empty((g * s, g * s, 3), np.uint8)
        out[:] = np.asarray(mean_u8, np.uint8)
        for view, (r, c) in zip(self.views[1:], self.tiles(kept=True)):
            out[r * s:(r + 1) * s, c * s:(c + 1) * s] = view
        return out


# ----------------------------------------------------------------------------- the rule


def scaled_size(width: int, height: int, canvas: int) -> tuple[int, int]:
    """(w', h'): the long side becomes ``canvas``, the short side scales with it (>= 1 px)."""
    if width < 1 or height < 1:
        raise ImageError("corrupt_image", f"image has no pixels ({width}x{height})")
    m = max(width, height)
    return (max(1, (2 * width * canvas + m) // (2 * m)), max(1, (2 * height * canvas + m) // (2 * m)))


def plan(width: int, height: int, spec: TileSpec) -> TilePlan:
    """The rule for a W×H image: its scaled size, its place on the canvas, the kept tiles.

    ``pad="top_left"``: offset (0, 0). ``pad="centre"``: ``((C - w') // 2, (C - h') // 2)``.
    With ``skip_tokens``, tile (r, c) is kept iff it overlaps the pasted image, i.e.
    ``c·S < x0 + w'`` and ``(c+1)·S > x0`` (and the same for rows with y0, h'); for top-left
    padding that is the paper's ``c·S < w'`` and ``r·S < h'``. Without skip tokens every tile
    is kept. G = 1 means the global view only: there are no sub-images and the mask is empty
    (bool [0]), so ``1 + kept.sum()`` views and ``(~kept).sum()`` skip tokens hold for every G.
    """
    c = spec.canvas
    w, h = scaled_size(width, height, c)
    x0, y0 = ((c - w) // 2, (c - h) // 2) if spec.pad == "centre" else (0, 0)
    if spec.grid == 1:
        kept = np.zeros(0, bool)
    elif not spec.skip_tokens:
        kept = np.ones(spec.grid * spec.grid, bool)
    else:
        lo = np.arange(spec.grid) * spec.tile_size
        hi = lo + spec.tile_size
        rows = (lo < y0 + h) & (hi > y0)
        cols = (lo < x0 + w) & (hi > x0)
        kept = (rows[:, None] & cols[None, :]).reshape(-1)
    return TilePlan(scaled_size=(w, h), offset=(x0, y0), kept=kept)


def kept_mask(width: int, height: int, spec: TileSpec) -> np.ndarray:
    """bool [G*G], row-major: which tiles of a W×H image are encoded (see :func:`plan`)."""
    return plan(width, height, spec).kept


def image_token_count(width: int, height: int, spec: TileSpec, tokens_per_view: int) -> int:
    """LLM tokens of one image: (1 + kept)·(N + 2) + skipped (start/end per view, 1 per skip);
    ``(1 + G²)·(N + 2)`` without skip tokens (G > 1), ``N + 2`` for G = 1."""
    mask = kept_mask(width, height, spec)
    kept = int(mask.sum())
    return (1 + kept) * (tokens_per_view + 2) + (len(mask) - kept)


def tokens_saved(kept: np.ndarray, tokens_per_view: int) -> int:
    """Tokens the skip rule saves against encoding every tile: skipped·(N + 1)."""
    kept = np.asarray(kept, bool)
    return int((~kept).sum()) * (tokens_per_view + 1)


# ----------------------------------------------------------------------------- loading


def load_image(
    data: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mean_u8: tuple[int, int, int] = DEFAULT_MEAN_U8,
    canvas: int | None = None,
) -> Image.Image:
    """Bytes or a PIL image -> an RGB PIL image, EXIF-transposed, alpha composited on ``mean_u8``.

    The pixel limit is checked from the header, before decoding. With ``canvas`` (C), a JPEG
    much larger than the canvas is decoded at a reduced DCT scale that still covers the scaled
    size, which is several times faster; its ``info`` keeps the true (W, H) so that
    :func:`tile_image` computes the same grid as for a full decode.
    """
    opened = isinstance(data, (bytes, bytearray, memoryview))
    if opened:
        im = _open(bytes(data), max_pixels)
    elif isinstance(data, Image.Image):
        im = data
        _check_pixels(im.size, max_pixels)
    else:
        raise ImageError("bad_input", f"expected image bytes or a PIL image, got {type(data).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            raw = im.info.get(_ORIGINAL_SIZE, im.size)
            if opened and canvas and im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L", "CMYK"):
                im.draft(im.mode, scaled_size(raw[0], raw[1], canvas))  # DCT-scaled decode, >= w'×h'
            im.load()
            swap = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # 90° orientations swap W and H
            original = (raw[1], raw[0]) if swap else tuple(raw)
            rgb = _to_rgb(ImageOps.exif_transpose(im), mean_u8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_many_pixels", f"decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as err:
        raise ImageError("corrupt_image", f"cannot decode image: {err}") from None
    if rgb is im:
        rgb = im.copy()  # never mutate the caller's image
    rgb.info[_ORIGINAL_SIZE] = original
    return rgb


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("corrupt_image", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_many_pixels", f"decompression bomb: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("corrupt_image", f"not a readable image ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
        raise ImageError("corrupt_image", f"cannot read image header: {err}") from None
    _check_pixels(im.size, max_pixels)
    return im


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError("corrupt_image", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError("too_many_pixels", f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")


def _to_rgb(im: Image.Image, mean_u8: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on the mean colour; 16-bit is rescaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, tuple(int(v) for v in mean_u8))
        out.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return out
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_u8(np.asarray(im), mode), "L").convert("RGB")
    raise ImageError("unsupported_mode", f"unsupported image mode {mode!r}")


def _to_u8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit int or float image -> uint8, scaled (never clipped)."""
    if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = a.astype(np.float64)
    if mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        return np.rint(a * 255).astype(np.uint8)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not np.isfinite([lo, hi]).all():
        raise ImageError("unsupported_mode", f"{mode} image has non-finite values")
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# ----------------------------------------------------------------------------- tiling


def scale_image(image: Image.Image, spec: TileSpec) -> tuple[Image.Image, TilePlan, tuple[int, int]]:
    """An RGB image (from :func:`load_image`) -> (the image resized to w'×h', its plan, (W, H)).

    The scaled image is all a canvas holds besides padding: :func:`cut_views` rebuilds the
    views from it, so storing it (losslessly, ``models.stored_image``) stores the views.
    """
    if image.mode != "RGB":
        raise ImageError("unsupported_mode", f"tiling needs an RGB image (use load_image), got {image.mode!r}")
    original = tuple(image.info.get(_ORIGINAL_SIZE, image.size))
    layout = plan(original[0], original[1], spec)
    if spec.resample == "release":
        return _release_canvas(image, spec), TilePlan((spec.canvas,) * 2, (0, 0), layout.kept), original
    w, h = layout.scaled_size
    if image.size != (w, h):
        image = image.resize((w, h), _RESAMPLE, reducing_gap=_REDUCING_GAP if image.width > w else None)
    return image, layout, original


def _release_canvas(image: Image.Image, spec: TileSpec) -> Image.Image:
    """The release's canvas: PadToSquare (centred at the image's own size, (side - w) // 2), then one PIL
    bicubic resize to C×C (torchvision's Resize on a PIL image)."""
    w, h = image.size
    if w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(v) for v in spec.mean_u8))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    return image.resize((spec.canvas, spec.canvas), _RESAMPLE)


def cut_views(scaled: Image.Image, layout: TilePlan, spec: TileSpec) -> np.ndarray:
    """The scaled image pasted on the canvas at ``layout.offset`` -> views uint8 [1 + kept, S, S, 3].

    View 0 is the whole canvas box-reduced C -> S; then the kept tiles, row-major.
    """
    if scaled.size != layout.scaled_size:
        raise ImageError("corrupt_image", f"scaled image is {scaled.size[0]}x{scaled.size[1]}, "
                                          f"the plan says {layout.scaled_size[0]}x{layout.scaled_size[1]}")
    g, s, c = spec.grid, spec.tile_size, spec.canvas
    canvas = Image.new("RGB", (c, c), tuple(int(v) for v in spec.mean_u8))
    canvas.paste(scaled, layout.offset)
    views = np.empty((1 + int(layout.kept.sum()), s, s, 3), np.uint8)
    views[0] = np.asarray(canvas.reduce(g) if g > 1 else canvas)  # global view: box-reduce C -> S
    arr = np.asarray(canvas)
    for i, idx in enumerate(np.flatnonzero(layout.kept), start=1):
        r, col = divmod(int(idx), g)
        views[i] = arr[r * s:(r + 1) * s, col * s:(col + 1) * s]
    return views


def tile_image(image: Image.Image, spec: TileSpec) -> TiledImage:
    """An RGB image (from :func:`load_image`) -> its global view and kept tiles.

    Before: a W×H RGB image. After: ``views`` uint8 [1 + kept, S, S, 3], ``kept`` bool [G*G].
    """
    scaled, layout, original = scale_image(image, spec)
    where = plan(original[0], original[1], spec) if spec.resample == "release" else layout  # the image on the canvas
    return TiledImage(views=cut_views(scaled, layout, spec), kept=layout.kept, scaled_size=where.scaled_size,
                      original_size=original, offset=where.offset, pad=spec.pad, skip_tokens=spec.skip_tokens)


def load_and_tile(data: ImageInput, spec: TileSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> TiledImage:
    """The one path from bytes to views; preprocess and serving both call it."""
    return tile_image(load_image(data, max_pixels=max_pixels, mean_u8=spec.mean_u8, canvas=draft_canvas(spec)), spec)


def draft_canvas(spec: TileSpec) -> int | None:
    """``load_image``'s ``canvas`` for this spec: None (decode at full size) for the release's resampling."""
    return spec.canvas if spec.resample == "project" else None
