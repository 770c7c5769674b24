"""actors.curate.som / marks / regions / som_questions: COCO regions -> marked image + questions.

Checked as the issue asks: every mark number in a question exists in its image, each mark lies
inside its region, labels never overlap, the answers agree with the annotations; bad input is
quarantined with its reason."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from actors.curate.marks import interior_points, place_marks
from actors.curate.regions import RegionError, decode_mask, region_of
from actors.curate.som import SomConfig, curate_image
from actors.curate.som_questions import som_conversation
from cluster.spec import SomCurate, StorageSection
from cluster.storage import open_storage
from models.boxes import from_canvas, parse_boxes
from models.flavours import from_name
from models.tiling import TileSpec

CATS = {1: "person", 2: "dog", 3: "cup"}
W, H = 160, 120


def _ring_rle() -> dict:
    m = np.zeros((H, W), np.uint8)
    m[10:70, 90:150] = 1
    m[25:55, 105:135] = 0  # a hole where the box centre is
    rle = coco_mask.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def _uncompressed(x0, y0, x1, y1) -> dict:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    flat = m.T.reshape(-1)  # column-major
    runs, current, n = [], False, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


ANNS = [
    {"id": 1, "category_id": 1, "bbox": [10, 10, 30, 60], "segmentation": [[10, 10, 40, 10, 40, 70, 10, 70]], "iscrowd": 0},
    {"id": 2, "category_id": 2, "bbox": [90, 10, 60, 60], "segmentation": _ring_rle(), "iscrowd": 0},
    {"id": 3, "category_id": 1, "bbox": [50, 80, 40, 30], "segmentation": _uncompressed(50, 80, 90, 110), "iscrowd": 0},
    {"id": 4, "category_id": 3, "bbox": [120, 90, 20, 20], "segmentation": [], "iscrowd": 0},  # box only
    {"id": 5, "category_id": 1, "bbox": [0, 0, 160, 120], "segmentation": _uncompressed(0, 0, 5, 5), "iscrowd": 1},
]


@pytest.fixture
def storage(tmp_path):
    img = Image.new("RGB", (W, H), (200, 200, 200))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    (tmp_path / "scene.jpg").write_bytes(buf.getvalue())
    return open_storage(StorageSection(uri=str(tmp_path), endpoint_url=None))


TILE = TileSpec.from_flavour(from_name("debug"))


def _config(**kw) -> SomConfig:
    return SomConfig(section=SomCurate(annotations="a.json", images="img", **kw), categories=CATS,
                     max_image_bytes=2**20, max_image_pixels=10**7, tile=TILE)


def _item(storage, anns=ANNS, **kw) -> dict:
    return {"id": "scene:1", "image": storage.path("scene.jpg"), "width": W, "height": H, "annotations": anns, **kw}


def test_marks_sit_inside_their_regions_and_questions_agree_with_annotations(storage):
    (out,) = curate_image(_item(storage), _config(), storage)
    assert out.reason is None, out.detail
    (record,) = out.records
    assert out.counts["regions_crowd"] == 1 and out.counts["regions_marked"] == 4
    marked = Image.open(io.BytesIO(out.images[record["image"]]))
    assert marked.size == (W, H)
    by_id = {a["id"]: a for a in ANNS}
    for mark in record["marks"]:
        region = region_of(by_id[mark["ann_id"]], CATS, (W, H))
        x, y = mark["point"]
        assert region.mask[y, x], mark  # inside the mask (the ring's hole is not)
        assert mark["category"] == CATS[by_id[mark["ann_id"]]["category_id"]]
        x1, y1, x2, y2 = mark["label"]
        pixels = np.array(marked)[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3)
        assert (pixels != (200, 200, 200)).any(axis=1).all()  # the label is drawn there
    labels = [m["label"] for m in record["marks"]]
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    numbers = {m["mark"]: m["category"] for m in record["marks"]}
    assert sorted(numbers) == [1, 2, 3, 4]
    text = " ".join(t["value"] for t in record["conversations"])
    assert {int(n) for n in re.findall(r"[Mm]arks? (\d+)", text)} <= set(numbers)
    turns = record["conversations"]
    assert turns[0]["value"].startswith("<image>\n") and [t["from"] for t in turns] == ["human", "gpt"] * 5
    k = int(re.search(r"What is mark (\d+)\?", turns[0]["value"]).group(1))
    assert numbers[k] in turns[1]["value"]
    cat = re.search(r"Which mark is the (\w+)\?", turns[2]["value"]).group(1)
    assert {int(n) for n in re.findall(r"\d+", turns[3]["value"])} == {n for n, c in numbers.items() if c == cat}
    cat = re.search(r"How many marks show an? (\w+)\?", turns[4]["value"]).group(1)
    assert turns[5]["value"] == f"{sum(c == cat for c in numbers.values())}."
    k = int(re.search(r"Where is mark (\d+)\?", turns[6]["value"]).group(1))
    (g,) = parse_boxes(turns[7]["value"])
    (mark,) = [m for m in record["marks"] if m["mark"] == k]
    assert np.allclose(from_canvas(g.boxes[0], (W, H), TILE), mark["bbox"], atol=1.5)  # the region's box
    assert turns[9]["value"] == " ".join(f"Mark {n}: {numbers[n]}." for n in sorted(numbers))


def test_the_anchor_of_a_ring_is_on_the_ring_not_in_its_hole():
    ring = decode_mask(_ring_rle(), (W, H), (90, 10, 150, 70), 2)
    x, y = interior_points(ring)[0]
    assert ring[y, x] and not (105 <= x < 135 and 25 <= y < 55)


def test_labels_never_overlap_even_when_regions_crowd_one_spot():
    masks = []
    for k in range(6):  # six nested squares around one centre: every deepest point is the same
        m = np.zeros((60, 60), bool)
        m[20 - k * 3:40 + k * 3, 20 - k * 3:40 + k * 3] = True
        masks.append(m)
    marks = place_marks(masks, (60, 60))
    boxes = [m.label for m in marks if m is not None]
    assert len(boxes) >= 2
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    for m in marks:
        if m is not None:
            assert masks[m.index][m.point[1], m.point[0]]


@pytest.mark.parametrize("ann, reason", [
    ({"id": 9, "category_id": 1, "bbox": [150, 100, 40, 40], "segmentation": []}, "region_outside"),
    ({"id": 9, "category_id": 1, "bbox": [10, 10, 5, 5], "segmentation": [[10, 10, 200, 10, 200, 20]]}, "region_outside"),
    ({"id": 9, "category_id": 1, "bbox": [10, 10, 5, 5], "segmentation": {"size": [H, W], "counts": [W * H]}},
     "empty_mask"),
    ({"id": 9, "category_id": 1, "bbox": [10, 10, 5, 5], "segmentation": {"size": [10, 10], "counts": [100]}},
     "size_mismatch"),
    ({"id": 9, "category_id": 77, "bbox": [10, 10, 5, 5]}, "bad_annotation"),
    ({"id": 9, "category_id": 1, "bbox": "x"}, "bad_annotation"),
])
def test_a_bad_region_quarantines_its_image_with_the_reason(storage, ann, reason):
    (out,) = curate_image(_item(storage, anns=ANNS[:1] + [ann]), _config(), storage)
    assert out.reason == reason and not out.records and out.detail


def test_missing_image_wrong_size_and_nothing_to_mark_are_quarantined(storage):
    (out,) = curate_image(_item(storage, image=storage.path("nope.jpg")), _config(), storage)
    assert out.reason == "missing_image"
    (out,) = curate_image(_item(storage, width=W + 1), _config(), storage)
    assert out.reason == "size_mismatch"
    (out,) = curate_image(_item(storage, anns=[ANNS[4]]), _config(), storage)
    assert (out.reason, out.counts["regions_crowd"]) == ("no_regions", 1)


def test_small_and_surplus_regions_are_counted_not_hidden(storage):
    (out,) = curate_image(_item(storage), _config(min_area=700, max_marks=1), storage)
    # areas: person 1800, ring 2700, person 1200, cup 400 (< 700)
    assert out.counts["regions_small"] == 1 and out.counts["regions_over_max"] == 2
    assert [m["ann_id"] for m in out.records[0]["marks"]] == [2]


def test_questions_are_deterministic_per_sample():
    marks = [(1, "person"), (2, "dog"), (3, "person")]
    assert som_conversation(marks, "a") == som_conversation(marks, "a")
    with pytest.raises(ValueError):
        som_conversation([], "a")


def test_region_error_carries_reason():
    with pytest.raises(RegionError) as err:
        region_of({"id": 1, "category_id": 1, "bbox": [0, 0, 0, 5]}, CATS, (W, H))
    assert err.value.reason == "empty_mask"
