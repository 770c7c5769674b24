"""Grounding Acc@IoU>=0.5, on hand-computed cases.

Source: Alpha-VLLM/LLaMA2-Accessory accessory/eval_mm/evaluate.py (metric miou0.5: the first
"[...]" in the answer, 4 floats else the zero box; box_xyxy_expand2square; IoU >= 0.5).
"""

import pytest

from actors.eval.grounding import box_iou, grounding_iou, normalize_gt, parse_box


def test_parse_box():
    assert parse_box("The box is [0.1, 0.2, 0.3, 0.4].") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("0.1, 0.2, 0.3, 0.4]") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("[0.1, 0.2]") is None
    assert parse_box("no box") is None
    # SPHINX's own answer forms, through the one parser (models.boxes.parse_boxes)
    assert parse_box("<p>the man</p> [0.10,0.20,0.30,0.40;0.5,0.5,0.6,0.6]") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("nose [0.51,0.32], body [0.1,0.2,0.3,0.4]") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("[3.24, 159.31, 159.64, 472.12]") == (3.24, 159.31, 159.64, 472.12)  # a pixel ground truth


def test_iou_by_hand():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # inter 1, union 4 + 4 - 1
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_center_square_frame_by_hand():
    # 200 x 100 image: padded 50 px on top -> gt [50, 0, 150, 100] -> [0.25, 0.25, 0.75, 0.75]
    assert normalize_gt([50, 0, 150, 100], 200, 100, "center") == (0.25, 0.25, 0.75, 0.75)
    assert normalize_gt([50, 0, 150, 100], 200, 100, "topleft") == (0.25, 0.0, 0.75, 0.5)
    assert normalize_gt([50, 0, 150, 100], 200, 100, "image") == (0.25, 0.0, 0.75, 1.0)
    iou, pred = grounding_iou("[0.25, 0.25, 0.75, 0.5]", [50, 0, 150, 100], 200, 100)
    assert iou == pytest.approx(0.5) and pred == (0.25, 0.25, 0.75, 0.5)
    assert grounding_iou("nothing", [50, 0, 150, 100], 200, 100)[0] == 0.0
    with pytest.raises(ValueError):
        normalize_gt([50, 0, 150, 100], None, None)


def test_a_flavours_pad_names_its_frame():
    from actors.eval.grounding import frame_of_pad

    assert frame_of_pad("top_left") == "topleft" and frame_of_pad("centre") == "center"
    with pytest.raises(KeyError):
        frame_of_pad("left")
