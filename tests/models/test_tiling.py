"""The any-resolution rule: paper numbers, an independent re-derivation, modes, EXIF, bad bytes."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from models.errors import UserError
from models.flavours import from_name
from models.tiling import (
    ImageError, TileSpec, image_token_count, kept_mask, load_and_tile, load_image, plan, tile_image, tokens_saved,
)

MEAN = (123, 117, 104)
SPEC = TileSpec(grid=2, tile_size=32, mean_u8=MEAN)


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _ref_rule(W: int, H: int, G: int, S: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Independent re-derivation: exact fractions, round half up, then count tiles touching pixels."""
    C = G * S
    scale = Fraction(C, max(W, H))
    w, h = (max(1, math.floor(W * scale + Fraction(1, 2))), max(1, math.floor(H * scale + Fraction(1, 2))))
    kept = [(r, c) for r in range(G) for c in range(G) if c * S < w and r * S < h]
    return (w, h), kept


def test_paper_token_counts():
    spec = TileSpec(grid=2, tile_size=224)
    assert image_token_count(1000, 1000, spec, tokens_per_view=257) == 5 * 259 == 1295
    assert image_token_count(1000, 500, spec, tokens_per_view=257) == 3 * 259 + 2 == 779
    assert image_token_count(500, 1000, spec, tokens_per_view=257) == 779
    assert tokens_saved(kept_mask(1000, 500, spec), 257) == 2 * 258
    assert kept_mask(1000, 500, spec).tolist() == [True, True, False, False]
    assert kept_mask(500, 1000, spec).tolist() == [True, False, True, False]


SIZES = [(1, 1), (1, 5000), (5000, 1), (1, 10000), (10000, 1), (64, 64), (64, 32), (32, 64), (100, 37),
         (37, 100), (640, 480), (480, 640), (3000, 500), (500, 3000), (65, 64), (64, 95), (64, 97), (7, 3)]


@pytest.mark.parametrize("G,S", [(2, 32), (3, 16), (2, 224), (3, 224)])
def test_rule_matches_rederivation(G, S):
    spec = TileSpec(grid=G, tile_size=S)
    for W, H in SIZES:
        _, kept = _ref_rule(W, H, G, S)
        mask = kept_mask(W, H, spec)
        assert [(i // G, i % G) for i in np.flatnonzero(mask)] == kept, (W, H)
        assert image_token_count(W, H, spec, 17) == (1 + len(kept)) * 19 + G * G - len(kept)


@pytest.mark.parametrize("W,H", SIZES)
def test_tile_image_matches_rule(W, H):
    rng = np.random.default_rng(W * 7 + H)
    im = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    t = tile_image(load_image(im, mean_u8=MEAN), SPEC)
    (w, h), kept = _ref_rule(W, H, 2, 32)
    assert t.scaled_size == (w, h) and t.original_size == (W, H)
    assert t.tiles(kept=True) == kept
    assert t.views.shape == (1 + len(kept), 32, 32, 3) and t.views.dtype == np.uint8
    assert image_token_count(W, H, SPEC, 17) == (1 + t.n_kept) * 19 + t.n_skipped
    canvas = t.canvas(MEAN)
    # every padding pixel is exactly the mean colour; the image region is not all padding
    pad = np.ones((64, 64), bool)
    pad[:h, :w] = False
    assert (canvas[pad] == MEAN).all()
    # the global view comes first: the whole canvas box-reduced to S x S
    ref_global = canvas.reshape(32, 2, 32, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(t.views[0].astype(np.float64) - ref_global).max() <= 1.0
    # kept tiles are slices of the canvas, row-major
    for view, (r, c) in zip(t.views[1:], kept):
        assert (view == canvas[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]).all()


def test_tiles_keep_the_image_content():
    """A left-half red / right-half blue 2:1 image: tile (0,0) red, (0,1) blue, bottom row skipped."""
    a = np.zeros((50, 100, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:] = (0, 0, 255)
    t = load_and_tile(_png(Image.fromarray(a)), SPEC)
    assert t.kept.tolist() == [True, True, False, False]
    assert (t.views[1][:, :28] == (255, 0, 0)).all()
    assert (t.views[2][:, 4:] == (0, 0, 255)).all()
    assert (t.views[0][20:] == MEAN).all()  # global view: bottom half padding


def test_grid_one_is_global_only():
    spec = TileSpec(grid=1, tile_size=32)
    t = tile_image(load_image(Image.new("RGB", (300, 100), (9, 9, 9))), spec)
    assert t.views.shape == (1, 32, 32, 3) and t.kept.shape == (0,)
    assert image_token_count(300, 100, spec, 17) == 19


def test_deterministic_and_jpeg_draft_keeps_the_grid():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((2000, 1500), Image.Resampling.BILINEAR))
    data = _jpeg(Image.fromarray(big))
    a, b = load_and_tile(data, SPEC), load_and_tile(data, SPEC)
    assert (a.views == b.views).all() and (a.kept == b.kept).all()
    drafted = load_image(data, canvas=SPEC.canvas)
    assert drafted.size[0] < 2000 and min(drafted.size) >= 48  # decoded at a reduced scale >= w' x h'
    full = tile_image(load_image(data), SPEC)
    assert a.original_size == full.original_size == (2000, 1500)
    assert a.scaled_size == full.scaled_size and (a.kept == full.kept).all()
    assert np.abs(a.views.astype(int) - full.views.astype(int)).mean() < 4  # same picture


# ----------------------------------------------------------------------------- modes and EXIF


def test_modes_convert_correctly():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(_png(rgba), mean_u8=MEAN)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == MEAN and out.getpixel((0, 0)) == (255, 0, 0)
    half = load_image(Image.new("RGBA", (2, 2), (255, 255, 255, 128)), mean_u8=(0, 0, 0))
    assert all(abs(v - 128) <= 1 for v in half.getpixel((0, 0)))

    la = Image.new("LA", (2, 2), (200, 0))
    assert load_image(_png(la), mean_u8=MEAN).getpixel((0, 0)) == MEAN

    p = Image.new("P", (2, 2), 0)
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    out = load_image(_png(p, transparency=0), mean_u8=MEAN)
    assert out.getpixel((0, 0)) == MEAN and out.getpixel((1, 1)) == (40, 50, 60)

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # red
    assert load_image(_jpeg(cmyk)).getpixel((0, 0))[0] > 200

    assert load_image(_png(Image.new("L", (2, 2), 77))).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(_png(Image.new("1", (2, 2), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped():
    a = np.array([[0, 257 * 100], [65535, 32896]], np.uint16)
    im16 = Image.fromarray(a)  # mode I;16
    assert im16.mode.startswith("I;16")
    for src in (im16, _png(im16)):
        out = np.asarray(load_image(src))
        assert out[..., 0].tolist() == [[0, 100], [255, 128]], src if isinstance(src, Image.Image) else "png"
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32))
    assert np.asarray(load_image(f))[..., 0].tolist() == [[0, 128], [255, 64]]
    i32 = Image.fromarray(np.array([[-10, 0], [10, 90]], np.int32))
    assert np.asarray(load_image(i32))[..., 0].tolist() == [[0, 26], [51, 255]]


@pytest.mark.parametrize("orientation,expected", [(6, (20, 40)), (8, (20, 40)), (3, (40, 20)), (1, (40, 20))])
def test_exif_orientation(orientation, expected):
    a = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high, red left column
    a[:, :4] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(im, exif=exif.tobytes())
    out = load_image(data)
    assert out.size == expected
    t = load_and_tile(data, SPEC)
    assert t.original_size == expected
    if orientation == 6:  # rotated 90° clockwise: the red column becomes the top row
        assert np.asarray(out)[:2, :, 0].mean() > 200
    if orientation == 8:  # rotated 90° counter-clockwise: the red column becomes the bottom row
        assert np.asarray(out)[-2:, :, 0].mean() > 200


# ----------------------------------------------------------------------------- bad input


def test_corrupt_and_truncated_bytes():
    data = _jpeg(Image.new("RGB", (64, 64), (1, 2, 3)))
    for bad in (b"", b"not an image at all", data[:20], data[: len(data) // 2], _png(Image.new("RGB", (64, 64)))[:60]):
        with pytest.raises(ImageError) as err:
            load_and_tile(bad, SPEC)
        assert err.value.reason == "corrupt_image"
        assert isinstance(err.value, UserError)
    with pytest.raises(ImageError) as err:
        load_image("path.jpg")  # type: ignore[arg-type]
    assert err.value.reason == "bad_input"


def test_pixel_limit_is_checked_from_the_header():
    data = _png(Image.new("L", (300, 200)))
    with pytest.raises(ImageError) as err:
        load_image(data, max_pixels=300 * 200 - 1)
    assert err.value.reason == "too_many_pixels"
    assert load_image(data, max_pixels=300 * 200).size == (300, 200)


def test_decompression_bomb(monkeypatch):
    """PIL's own bomb check (warning and error) becomes too_many_pixels, before decoding."""
    data = _png(Image.new("L", (200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 40k px > limit: PIL warns
    with pytest.raises(ImageError) as err:
        load_image(data, max_pixels=10**9)
    assert err.value.reason == "too_many_pixels"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40k px > 2x limit: PIL raises
    with pytest.raises(ImageError) as err:
        load_image(data, max_pixels=10**9)
    assert err.value.reason == "too_many_pixels"


def test_a_huge_header_is_refused_without_decoding():
    """A 100000 x 100000 PNG header on a few bytes of data: refused from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(ImageError) as err:
        load_image(bomb, max_pixels=64_000_000)
    assert err.value.reason == "too_many_pixels"


def test_exif_rotation_with_a_drafted_jpeg():
    """A big JPEG stored 1200x900 with orientation 6: drafted decode, still the true 900x1200 grid."""
    a = np.zeros((900, 1200, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(Image.fromarray(a), exif=exif.tobytes())
    fast, full = load_and_tile(data, SPEC), tile_image(load_image(data), SPEC)
    assert fast.original_size == full.original_size == (900, 1200)
    assert fast.scaled_size == full.scaled_size == (48, 64)
    assert (fast.kept == full.kept).all() and fast.views.shape == full.views.shape
    assert np.abs(fast.views.astype(int) - full.views.astype(int)).mean() < 2


# ----------------------------------------------------------------------------- the release's geometry


def _ref_centred(W: int, H: int, G: int, S: int) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]:
    """Independent re-derivation for centred padding: the scaled image's rectangle, centred with
    floor division as LLaMA2-Accessory's PadToSquare does, and the tiles it overlaps."""
    (w, h), _ = _ref_rule(W, H, G, S)
    C = G * S
    x0, y0 = (C - w) // 2, (C - h) // 2
    rows = {r for r in range(G) for y in range(y0, y0 + h) if r * S <= y < (r + 1) * S}
    cols = {c for c in range(G) for x in range(x0, x0 + w) if c * S <= x < (c + 1) * S}
    return (w, h), (x0, y0), [(r, c) for r in range(G) for c in range(G) if r in rows and c in cols]


@pytest.mark.parametrize("G,S", [(2, 32), (3, 16), (3, 224)])
def test_centred_rule_matches_rederivation(G, S):
    spec = TileSpec(grid=G, tile_size=S, pad="centre")
    for W, H in SIZES:
        size, offset, kept = _ref_centred(W, H, G, S)
        p = plan(W, H, spec)
        assert (p.scaled_size, p.offset) == (size, offset), (W, H)
        assert [(i // G, i % G) for i in np.flatnonzero(p.kept)] == kept, (W, H)
        assert image_token_count(W, H, spec, 17) == (1 + len(kept)) * 19 + G * G - len(kept)
    if G == 3:  # a 3:1 image centred on a 3x3 grid keeps only the middle row (top-left: the top one)
        assert kept_mask(300, 100, spec).reshape(G, G).any(1).tolist() == [False, True, False]
        assert kept_mask(300, 100, TileSpec(grid=G, tile_size=S)).reshape(G, G).any(1).tolist() == [True, False, False]


@pytest.mark.parametrize("W,H", [(200, 100), (100, 200), (77, 300), (64, 64), (1, 500)])
def test_centred_tiles_match_pad_to_square(W, H):
    """The release pads at the original resolution (PadToSquare: a max(W,H) square of the mean
    colour, the image at (max - min) // 2) and then resizes the square to C. The canvas here (resize,
    then paste at (C - w') // 2) puts the image on the same rectangle, to within one pixel."""
    G, S = 2, 32
    spec = TileSpec(grid=G, tile_size=S, mean_u8=MEAN, pad="centre", skip_tokens=False)
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([x * 255 // max(W - 1, 1), y * 255 // max(H - 1, 1), np.full_like(x, 200)], -1).astype(np.uint8)
    t = tile_image(load_image(Image.fromarray(a)), spec)
    m = max(W, H)
    square = Image.new("RGB", (m, m), MEAN)
    square.paste(Image.fromarray(a), ((m - W) // 2, (m - H) // 2))
    ref = np.asarray(square.resize((G * S, G * S), Image.Resampling.BICUBIC)).astype(int)
    canvas = t.canvas(MEAN).astype(int)
    (w, h), (x0, y0) = t.scaled_size, t.offset
    def rect(margin: int) -> np.ndarray:
        m = np.zeros(canvas.shape[:2], bool)
        m[max(0, y0 - margin):max(0, y0 + h + margin), max(0, x0 - margin):max(0, x0 + w + margin)] = True
        return m

    assert (canvas[~rect(0)] == MEAN).all()  # exact padding outside the pasted image
    assert (ref[~rect(2)] == MEAN).all()  # the reference's bicubic bleeds up to 2 px past its edge
    inside = rect(-2)
    if inside.any():
        assert np.abs(canvas[inside] - ref[inside]).mean() < 3


def test_no_skip_tokens_encodes_every_tile():
    spec = TileSpec(grid=2, tile_size=32, mean_u8=MEAN, pad="centre", skip_tokens=False)
    for W, H in SIZES:
        assert kept_mask(W, H, spec).tolist() == [True] * 4
        assert image_token_count(W, H, spec, 257) == 5 * 259
    t = load_and_tile(_png(Image.new("RGB", (100, 25), (255, 0, 0))), spec)  # 4:1 -> 64x16 at y 24
    assert t.views.shape == (5, 32, 32, 3) and t.n_skipped == 0 and tokens_saved(t.kept, 257) == 0
    assert (t.offset, t.pad, t.skip_tokens) == ((0, 24), "centre", False)
    assert (t.views[1][:24] == MEAN).all() and (t.views[1][25:] == (255, 0, 0)).all()  # top tiles: red below y 24
    assert (t.views[3][:7] == (255, 0, 0)).all() and (t.views[3][9:] == MEAN).all()  # bottom tiles: red above y 8
    canvas = t.canvas(MEAN)
    assert (canvas[24:40] == (255, 0, 0)).all() and (canvas[:24] == MEAN).all() and (canvas[40:] == MEAN).all()
    top_left = TileSpec(grid=2, tile_size=32, mean_u8=MEAN, skip_tokens=False)
    assert kept_mask(100, 25, top_left).tolist() == [True] * 4 and plan(100, 25, top_left).offset == (0, 0)


def test_spec_from_flavour_carries_the_geometry():
    for name, tokens in [("sphinx-tiny", 259), ("sphinx-tiny-1k", 5 * 259)]:
        f = from_name(name)
        spec = TileSpec.from_flavour(f)
        assert (spec.pad, spec.skip_tokens, spec.canvas) == ("centre", False, 512 * f.grid)
        assert spec.to_dict() == {"grid": f.grid, "tile_size": 512, "canvas": 512 * f.grid,
                                  "mean_u8": list(f.mean_u8), "pad": "centre", "skip_tokens": False,
                                  "resample": "release"}
        assert TileSpec.from_dict(spec.to_dict()) == spec
        for W, H in [(1000, 1000), (1000, 500), (30, 900)]:
            assert image_token_count(W, H, spec, f.tokens_per_view) == tokens
        # the release pads with PadToSquare's int(mean·255) and normalises with the mean itself
        assert spec.mean_u8 == (122, 116, 104)
        assert f.normalise_mean_u8 == pytest.approx((122.771, 116.746, 104.094), abs=1e-3)
    toy = TileSpec.from_flavour(from_name("debug-sphinx-tiny-1k"))
    t = tile_image(load_image(Image.new("RGB", (90, 30), (0, 255, 0))), toy)
    assert t.views.shape == (5, 64, 64, 3) and t.offset == (0, 42) and t.skip_tokens is False
    paper = TileSpec.from_flavour(from_name("tiny"))
    assert (paper.pad, paper.skip_tokens, paper.mean_u8) == ("top_left", True, (123, 117, 104))
    assert from_name("tiny").normalise_mean_u8 == (123.0, 117.0, 104.0)  # padding normalises to exactly 0
    with pytest.raises(ValueError, match="pad must be one of"):
        TileSpec(grid=2, tile_size=32, pad="center")


def test_release_resampling_pads_then_resizes():
    """resample "release": PadToSquare at the image's own size, then one bicubic resize of the square (the
    release's transform); the scaled image is the whole canvas, so stored images keep it whole."""
    spec = TileSpec(grid=2, tile_size=32, mean_u8=MEAN, pad="centre", skip_tokens=False, resample="release")
    im = Image.new("RGB", (90, 30), (255, 0, 0))
    square = Image.new("RGB", (90, 90), MEAN)
    square.paste(im, (0, 30))
    t = tile_image(load_image(im), spec)
    assert t.views.shape == (5, 32, 32, 3) and (t.scaled_size, t.offset) == ((64, 21), (0, 21))  # where it lies
    assert np.array_equal(t.canvas(MEAN), np.asarray(square.resize((64, 64), Image.Resampling.BICUBIC)))
    with pytest.raises(ValueError, match="resample 'release' needs pad 'centre' and skip_tokens False"):
        TileSpec(grid=2, tile_size=32, resample="release")
