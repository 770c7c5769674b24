"""actors.data.regions: <box:k> slots become SPHINX box text in the canvas frame of both pads;
bad boxes raise BoxError (bad_box)."""

from __future__ import annotations

import pytest

from actors.data.regions import check_box, check_boxes, fill, slot, text_of
from models.boxes import BoxError
from models.tiling import TileSpec

CONV = [{"from": "human", "value": "<image>\nWhere is the dog?"}, {"from": "gpt", "value": "<p>dog</p> <box:0;1>"}]


@pytest.mark.parametrize("pad, expected", [
    # 1000x500 on a 1024 canvas: scaled 1024x512, at y0 = 0 (top_left) or 256 (centre)
    ("top_left", "<p>dog</p> [0.10,0.05,0.60,0.45;0.00,0.00,0.50,0.25]"),
    ("centre", "<p>dog</p> [0.10,0.30,0.60,0.70;0.00,0.25,0.50,0.50]"),
])
def test_fill_places_boxes_on_the_canvas_of_either_pad(pad, expected):
    spec = TileSpec(grid=2, tile_size=512, pad=pad)
    out = fill(CONV, [[0, 100, 50, 600, 450], [0, 0, 0, 500, 250]], [(1000, 500)], spec)
    assert out[1]["value"] == expected and out[0] == CONV[0]


def test_bad_boxes_and_slots():
    spec = TileSpec(grid=2, tile_size=512)
    with pytest.raises(BoxError):
        fill(CONV, [[0, 100, 50, 1600, 450], [0, 0, 0, 1, 1]], [(1000, 500)], spec)  # outside the image
    with pytest.raises(BoxError):
        fill(CONV, [[0, 100, 50, 600, 450]], [(1000, 500)], spec)  # slot 1 names no box
    with pytest.raises(BoxError):
        fill(CONV, [[1, 1, 1, 5, 5], [1, 1, 1, 5, 5]], [(1000, 500)], spec)  # a box of a second image
    assert check_box([10, 10, 5, 20], (100, 100)) and check_box([0, 0, 101.5, 10], (100, 100))
    assert check_box([0, 0, 100, 100], (100, 100)) is None and check_box([0, 0, 1e9, 1], None) is None
    assert slot(0, 2) == "<box:0;2>" and text_of("at <box:3>") == "at [0.00,0.00,1.00,1.00]"


def test_check_boxes_refuses_what_needs_no_image_size():
    conv = [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "<box:0>"}]
    assert check_boxes(conv, [[0, 1, 2, 30, 40]], 1) is None and check_boxes(conv, [[0.0, 1, 2, 3, 4]], 1) is None
    assert check_boxes(conv[:1], None, 0) is None  # no slot, no box
    assert "0 box(es)" in check_boxes(conv, None, 1) and "0 box(es)" in check_boxes(conv, [], 1)
    assert "2 image(s)" in check_boxes(conv, [[2, 1, 2, 3, 4]], 2) and "-1" in check_boxes(conv, [[-1, 1, 2, 3, 4]], 1)
    assert "image index" in check_boxes(conv, [[0.5, 1, 2, 3, 4]], 1)
    assert "empty" in check_boxes(conv, [[0, 3, 2, 3, 4]], 1) and "empty" in check_boxes(conv, [[0, 1, 4, 3, 4]], 1)
    for bad in ([[0, 1, 2, 3]], [[0, 1, 2, 3, None]], [(0, 1, 2, 3, float("nan"))], [[False, 1, 2, 3, 4]], ["x"]):
        assert "expected [image, x1, y1, x2, y2]" in check_boxes(conv, bad, 1), bad
    assert "expected a list" in check_boxes(conv, "[[0, 1, 2, 3, 4]]", 1)
