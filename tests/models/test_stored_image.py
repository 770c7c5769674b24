"""models.stored_image: the stored form gives back, bit for bit, the views serving cuts."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image

from models.stored_image import row_views, store, views
from models.tiling import ImageError, TileSpec, load_and_tile

SIZES = [(96, 96), (200, 60), (60, 200), (1000, 10), (10, 1000), (1, 1), (97, 40), (641, 479), (3000, 2000)]
SPECS = [TileSpec(grid=2, tile_size=48), TileSpec(grid=3, tile_size=32, pad="centre", skip_tokens=False),
         TileSpec(grid=1, tile_size=40)]


@functools.lru_cache(maxsize=None)  # the six parametrized cases encode the same images (3000×2000 noise: ~1 s)
def _bytes(w: int, h: int, fmt: str, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("codec", ["webp", "png"])
@pytest.mark.parametrize("spec", SPECS, ids=["g2", "g3-centre-noskip", "g1"])
def test_stored_views_equal_the_served_views(spec, codec):
    for i, (w, h) in enumerate(SIZES):
        for fmt in ("JPEG", "PNG"):
            data = _bytes(w, h, fmt, seed=i)
            served = load_and_tile(data, spec)
            stored = store(data, spec, codec=codec)
            assert stored.plan == [*served.scaled_size, *served.offset]
            np.testing.assert_array_equal(stored.kept, served.kept)
            assert stored.original_size == served.original_size
            np.testing.assert_array_equal(views(stored.data, stored.plan, stored.kept, spec), served.views)


def test_transparent_and_grey_images_store_as_served():
    spec = TileSpec(grid=2, tile_size=48)
    for data in (_bytes(120, 50, "PNG", 1, "RGBA"), _bytes(50, 120, "PNG", 2, "L")):
        stored = store(data, spec)
        np.testing.assert_array_equal(views(stored.data, stored.plan, stored.kept, spec),
                                      load_and_tile(data, spec).views)


def test_row_views_concatenates_images_in_order_and_checks_lengths():
    spec = TileSpec(grid=2, tile_size=48)
    a, b = _bytes(200, 60, "PNG", 3), _bytes(60, 60, "JPEG", 4)
    sa, sb = store(a, spec), store(b, spec)
    raw = row_views([sa.data, sb.data], sa.plan + sb.plan, sa.kept.tolist() + sb.kept.tolist(), spec)
    want = np.concatenate([load_and_tile(a, spec).views, load_and_tile(b, spec).views])
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(want.shape), want)
    assert row_views([], [], [], spec) == b""
    with pytest.raises(ImageError, match="2 stored images but 4 plan values"):
        row_views([sa.data, sb.data], sa.plan, sa.kept.tolist() + sb.kept.tolist(), spec)


def test_a_damaged_stored_image_is_a_clear_error():
    spec = TileSpec(grid=2, tile_size=48)
    stored = store(_bytes(90, 40, "PNG", 5), spec)
    with pytest.raises(ImageError, match="does not decode"):
        views(stored.data[:40], stored.plan, stored.kept, spec)
    with pytest.raises(ImageError, match="the plan says"):
        views(stored.data, [stored.plan[0] + 1, *stored.plan[1:]], stored.kept, spec)


def test_compressed_is_smaller_than_the_raw_views():
    spec = TileSpec(grid=2, tile_size=224)
    small = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((1600, 1200), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=88)
    stored = store(buf.getvalue(), spec)
    assert len(stored.data) < load_and_tile(buf.getvalue(), spec).views.nbytes / 4
