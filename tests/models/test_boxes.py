"""models/boxes.py: pixel boxes <-> SPHINX's canvas fractions for both pads (and the release's
PadToSquare resampling), on wide, tall, square and tiny images, with the expected coordinates
worked out from ``models.tiling.plan``; the text form as LLaMA2-Accessory writes and reads it
(accessory/demos/multi_turn_mm_box.py)."""

from __future__ import annotations

import random

import pytest

from models.boxes import (BoxError, Grounding, format_box, format_boxes, from_canvas, parse_boxes,
                          to_canvas)
from models.errors import UserError
from models.flavours import from_name
from models.tiling import TileSpec, plan

RELEASE = TileSpec(grid=2, tile_size=512, pad="centre", skip_tokens=False)  # C 1024, pad centre, project resample
PAPER = TileSpec.from_flavour(from_name("plus"))                            # G 2, S 224: C 448, pad top_left
PADDED = TileSpec.from_flavour(from_name("sphinx-tiny-1k"))                 # the release's PadToSquare + resize


def test_the_flavours_carry_the_two_pads():
    assert (RELEASE.canvas, RELEASE.pad, RELEASE.resample) == (1024, "centre", "project")
    assert TileSpec.from_flavour(from_name("debug-sphinx-tiny-1k")).pad == "centre"
    assert (PAPER.canvas, PAPER.pad) == (448, "top_left")
    assert (PADDED.canvas, PADDED.pad, PADDED.resample) == (1024, "centre", "release")


# (size, spec, the plan's (scaled, offset), pixel box, canvas box worked out by hand)
CASES = [
    # wide 2:1 -> 1024x512 at y0 = (1024 - 512) // 2 = 256; x: ·1.024, y: 256 + ·1.024
    ((1000, 500), RELEASE, ((1024, 512), (0, 256)), (100, 50, 600, 450),
     (102.4 / 1024, 307.2 / 1024, 614.4 / 1024, 716.8 / 1024)),
    # the same on the paper's 448 canvas at (0, 0): ·0.448
    ((1000, 500), PAPER, ((448, 224), (0, 0)), (100, 50, 600, 450), (44.8 / 448, 22.4 / 448, 268.8 / 448, 201.6 / 448)),
    # tall 1:2 -> 512x1024 at x0 = 256; ·1
    ((512, 1024), RELEASE, ((512, 1024), (256, 0)), (64, 128, 448, 896), (0.3125, 0.125, 0.6875, 0.875)),
    # tall on 448: w' = (2·512·448 + 1024) // 2048 = 224; ·0.4375
    ((512, 1024), PAPER, ((224, 448), (0, 0)), (64, 128, 448, 896), (28 / 448, 56 / 448, 196 / 448, 392 / 448)),
    # tall 1:3: w' = (2·300·1024 + 900) // 1800 = 341 (not 341.33), x0 = (1024 - 341) // 2 = 341
    ((300, 900), RELEASE, ((341, 1024), (341, 0)), (0, 0, 300, 900), (341 / 1024, 0.0, 682 / 1024, 1.0)),
    # w' = (2·300·448 + 900) // 1800 = 149: the whole image is 149/448 wide, not 1/3
    ((300, 900), PAPER, ((149, 448), (0, 0)), (0, 0, 300, 900), (0.0, 0.0, 149 / 448, 1.0)),
    # square: the canvas is the image
    ((640, 640), RELEASE, ((1024, 1024), (0, 0)), (160, 320, 480, 640), (0.25, 0.5, 0.75, 1.0)),
    ((640, 640), PAPER, ((448, 448), (0, 0)), (160, 320, 480, 640), (0.25, 0.5, 0.75, 1.0)),
    # tiny 3x2, scaled up: h' = (2·2·1024 + 3) // 6 = 683 at y0 = (1024 - 683) // 2 = 170
    ((3, 2), RELEASE, ((1024, 683), (0, 170)), (1, 0, 2, 2), (1 / 3, 170 / 1024, 2 / 3, 853 / 1024)),
    # h' = (2·2·448 + 3) // 6 = 299
    ((3, 2), PAPER, ((448, 299), (0, 0)), (1, 0, 2, 2), (1 / 3, 0.0, 2 / 3, 299 / 448)),
]


# the release's canvas: PadToSquare on a max(W, H) square at ((M - W) // 2, (M - H) // 2), then resized
# whole, so x -> (x0 + x) / M (Accessory's box_xyxy_expand2square), whatever the canvas side
PADDED_CASES = [
    ((1000, 500), (100, 50, 600, 450), (0.1, 0.3, 0.6, 0.7)),                    # M 1000, y0 250
    ((512, 1024), (64, 128, 448, 896), (0.3125, 0.125, 0.6875, 0.875)),          # M 1024, x0 256
    ((300, 900), (0, 0, 300, 900), (1 / 3, 0.0, 2 / 3, 1.0)),                    # M 900, x0 300 (plan: 341/1024)
    ((640, 640), (160, 320, 480, 640), (0.25, 0.5, 0.75, 1.0)),
    ((3, 2), (1, 0, 2, 2), (1 / 3, 0.0, 2 / 3, 2 / 3)),                          # M 3, y0 (3 - 2) // 2 = 0
]


@pytest.mark.parametrize("size, box_px, expected", PADDED_CASES)
def test_the_release_resampling_frame_by_hand(size, box_px, expected):
    got = to_canvas(box_px, size, PADDED)
    assert got == pytest.approx(expected, abs=1e-12)
    assert from_canvas(got, size, PADDED) == pytest.approx(box_px, abs=1e-9)


@pytest.mark.parametrize("size, spec, placed, box_px, expected", CASES)
def test_pixel_box_to_canvas_and_back_by_hand(size, spec, placed, box_px, expected):
    layout = plan(*size, spec)
    assert (layout.scaled_size, layout.offset) == placed
    got = to_canvas(box_px, size, spec)
    assert got == pytest.approx(expected, abs=1e-12)
    assert from_canvas(got, size, spec) == pytest.approx(box_px, abs=1e-9)
    assert from_canvas(expected, size, spec) == pytest.approx(box_px, abs=1e-9)


@pytest.mark.parametrize("spec", [RELEASE, PAPER, PADDED, TileSpec.from_flavour(from_name("debug-sphinx-tiny")),
                                  TileSpec.from_flavour(from_name("debug"))],
                         ids=["centre", "top_left", "release", "centre-g1", "top_left-48"])
@pytest.mark.parametrize("size", [(1000, 500), (300, 900), (640, 640), (3, 2), (1, 7), (4000, 31)])
def test_round_trip_through_the_text_form(spec, size):
    """pixels -> canvas -> "[..]" (two decimals) -> parse -> pixels: off by at most half a
    hundredth of the canvas, in image pixels (C / scale · 0.005)."""
    rng = random.Random(f"{size}{spec}")
    w, h = size
    sw, sh = plan(w, h, spec).scaled_size
    tol_x, tol_y = 0.005 * spec.canvas * w / sw + 1e-9, 0.005 * spec.canvas * h / sh + 1e-9
    if spec.resample == "release":  # the canvas is a max(W, H) square scaled whole
        tol_x = tol_y = 0.005 * max(w, h) + 1e-9
    for _ in range(20):
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
            continue
        text = f"<p>thing</p> {format_box(to_canvas((x1, y1, x2, y2), size, spec))}"
        (g,) = parse_boxes(text)
        back = from_canvas(g.boxes[0], size, spec)
        for got, want, tol in zip(back, (x1, y1, x2, y2), (tol_x, tol_y, tol_x, tol_y)):
            assert abs(got - want) <= tol, (text, back)


def test_from_canvas_clips_a_box_in_the_padding_to_the_image():
    # 1000x500 centred: rows 0..256 of the canvas are padding above the image
    assert from_canvas((0.0, 0.0, 1.0, 0.1), (1000, 500), RELEASE) == (0.0, 0.0, 1000.0, 0.0)
    assert from_canvas((0.5, 0.5, 1.2, 1.0), (1000, 500), PAPER) == (500.0, 500.0, 1000.0, 500.0)


def test_bad_pixel_boxes_are_box_errors():
    for box in [(-5, 0, 10, 10), (0, 0, 1002, 10), (0, 0, 10, 502), (10, 10, 10, 20), (30, 10, 20, 20),
                (0, 0, float("nan"), 5), (1, 2, 3), ("a", 0, 1, 1)]:
        with pytest.raises(BoxError, match="bad_box") as err:
            to_canvas(box, (1000, 500), PAPER)
        assert isinstance(err.value, UserError) and err.value.reason == "bad_box"
    # within a pixel of the edge (annotation rounding): clipped, not refused
    assert to_canvas((-0.5, 0, 1000.7, 500.2), (1000, 500), PAPER) == pytest.approx((0.0, 0.0, 1.0, 0.5))


def test_format_writes_two_decimals_and_joins_with_semicolons():
    assert format_box((0.1, 0.3, 0.6, 0.7)) == "[0.10,0.30,0.60,0.70]"
    assert format_box((0, 0.125, 0.999, 1)) == "[0.00,0.12,1.00,1.00]"
    assert format_boxes([(0.05, 0.4, 0.3, 0.9), (0.55, 0.42, 0.8, 0.88)]) == "[0.05,0.40,0.30,0.90;0.55,0.42,0.80,0.88]"
    for bad in [(0.1, 0.2, 1.3, 0.5), (-0.1, 0, 1, 1), (0.1, 0.2, 0.3)]:
        with pytest.raises(BoxError):
            format_box(bad)
    with pytest.raises(BoxError):
        format_boxes([])


def test_parse_the_forms_sphinx_writes():
    # multi_turn_mm_box.py: '<p>(.*?)<\/p>\s*(\[[\d.,;\s]*\])', then bare '[...]', boxes split by ';'
    text = ("There are <p>two dogs</p> [0.05,0.40,0.30,0.90;0.55,0.42,0.80,0.88] near <p>a red ball</p>[0.41,0.70,0.52,0.81]."
            " Also [0.10, 0.20, 0.30, 0.40].")
    assert parse_boxes(text) == [
        Grounding("two dogs", [(0.05, 0.4, 0.3, 0.9), (0.55, 0.42, 0.8, 0.88)]),
        Grounding("a red ball", [(0.41, 0.7, 0.52, 0.81)]),
        Grounding(None, [(0.1, 0.2, 0.3, 0.4)]),
    ]
    assert parse_boxes(format_boxes([(0.05, 0.4, 0.3, 0.9)])) == [Grounding(None, [(0.05, 0.4, 0.3, 0.9)])]


def test_parse_is_tolerant_and_refuses_nothing():
    assert parse_boxes("") == []
    assert parse_boxes("no box here, see [1] and [x1, y1, x2, y2]") == []
    assert parse_boxes("<p>a nose</p> [0.51,0.32]") == []                     # a key point, not a box
    assert parse_boxes("<p>untagged</p> and nothing") == []
    assert parse_boxes("[ 0.1 ,0.2,  0.3 , 0.4 ; 0.5,0.6 ]") == [Grounding(None, [(0.1, 0.2, 0.3, 0.4)])]
    assert parse_boxes("<p> spaced </p>   [1,2,3,4]") == [Grounding("spaced", [(1.0, 2.0, 3.0, 4.0)])]
    # a phrase never swallows an earlier <p>...</p> that had no box
    assert parse_boxes("<p>a</p> and <p>b</p> [0.1,0.2,0.3,0.4]") == [Grounding("b", [(0.1, 0.2, 0.3, 0.4)])]
    # Accessory's miou0.5 reading of an answer whose "[" was cut off
    assert parse_boxes("0.1, 0.2, 0.3, 0.4]") == [Grounding(None, [(0.1, 0.2, 0.3, 0.4)])]
    assert parse_boxes("[0.1, 0.2, 0.3, 0.4") == []
    # pixel boxes (a ground truth) are read as written
    assert parse_boxes("[3.24, 159.31, 159.64, 472.12]") == [Grounding(None, [(3.24, 159.31, 159.64, 472.12)])]
