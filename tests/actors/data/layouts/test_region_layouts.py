"""refcoco and vg_regions: referring expressions and region descriptions -> samples with pixel
boxes named by <box:k> slots; crowd boxes, boxes outside the image, refs without annotations,
regions without an image are quarantined; RefCOCO's benchmark splits are left out, counted."""

from __future__ import annotations

import json
import pickle

import pytest

# instances.json of refcoco (the refer API's layout)
INSTANCES = {
    "info": {}, "licenses": [], "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    "images": [{"license": 1, "file_name": "COCO_train2014_000000581857.jpg", "height": 478, "width": 640,
                "id": 581857},
               {"file_name": "COCO_train2014_000000098304.jpg", "height": 424, "width": 640, "id": 98304}],
    "annotations": [
        {"segmentation": [[0, 0, 1, 1]], "area": 1.0, "iscrowd": 0, "image_id": 581857,
         "bbox": [103.93, 299.99, 134.22, 177.42], "category_id": 1, "id": 1719310},
        {"iscrowd": 1, "image_id": 98304, "bbox": [263.87, 216.88, 21.13, 15.17], "category_id": 18, "id": 3007},
        {"iscrowd": 0, "image_id": 98304, "bbox": [600.0, 400.0, 80.0, 50.0], "category_id": 18, "id": 3008},
    ],
}


def _ref(ref_id, ann_id, image_id, split="train", sents=("the lady with the blue shirt", "lady with back to us")):
    return {"sent_ids": list(range(len(sents))), "file_name": f"COCO_train2014_{image_id:012d}_16.jpg",
            "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split, "category_id": 1,
            "sentences": [{"tokens": s.split(), "raw": s.upper(), "sent_id": k, "sent": s} for k, s in enumerate(sents)]}


REFS = [_ref(0, 1719310, 581857), _ref(1, 3007, 98304, sents=("crowd",)), _ref(2, 3008, 98304, sents=("far",)),
        _ref(3, 999, 581857, sents=("nothing",)), _ref(4, 1719310, 581857, split="testA", sents=("held out",))]


def test_refcoco_refs_pickle_as_published(read, conv):
    # refer's refs(unc).p is a protocol-2 Python pickle of plain lists and dicts
    rows = read("refcoco", pickle.dumps(REFS, protocol=2), side=INSTANCES, path="refcoco/refs(unc).p")
    got = [(r["id"], r["reason"], r["copies"]) for r in rows]
    assert got == [("0:0", None, 1), ("0:1", None, 1), ("1:0", "crowd_box", 1), ("2:0", "bad_box", 1),
                   ("3:0", "missing_annotation", 1), ("4:0", None, 0)]  # testA: left out, counted
    assert rows[0]["image_paths"] == ["s3://b/img/COCO_train2014_000000581857.jpg"]
    assert json.loads(rows[0]["boxes"]) == [[0, 103.93, 299.99, pytest.approx(238.15), pytest.approx(477.41)]]
    assert conv(rows[0]) == [
        {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence "
                                   "describes: the lady with the blue shirt"},
        {"from": "gpt", "value": "<box:0>"}]
    assert "outside the 640x424 image" in rows[3]["detail"]
    as_json = read("refcoco", REFS, side=INSTANCES, path="refs.json")
    assert [r["conversations"] for r in as_json] == [r["conversations"] for r in rows]
    caption = read("refcoco", REFS[:1], side=INSTANCES, prompt="region_caption")
    assert conv(caption[0])[0]["value"].endswith("for this region: <box:0>")
    assert conv(caption[0])[1]["value"] == "the lady with the blue shirt"


def test_refcoco_pickle_naming_a_class_is_refused_whole(read):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    rows = read("refcoco", pickle.dumps([Evil()], protocol=2), side=INSTANCES, path="refs(unc).p")
    assert len(rows) == 1 and rows[0]["id"] == "s:file" and "UnpicklingError" in rows[0]["detail"]
    assert "print; a refs file holds plain data only" in rows[0]["detail"]


# region_descriptions.json and image_data.json of Visual Genome 1.2
REGIONS = [
    {"regions": [{"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green in colour",
                  "y": 57, "x": 421},
                 {"region_id": 1383, "width": 182, "height": 109, "image_id": 1, "phrase": "shade is along the street ",
                  "y": 372, "x": 194},
                 {"region_id": 1384, "width": 300, "height": 30, "image_id": 1, "phrase": "off the edge", "y": 590,
                  "x": 10},
                 {"region_id": 1385, "width": 10, "height": 10, "image_id": 1, "phrase": "", "y": 1, "x": 1}],
     "id": 1},
    {"regions": [{"region_id": 9, "width": 5, "height": 5, "image_id": 77, "phrase": "a cat", "y": 1, "x": 1}], "id": 77},
]
IMAGE_DATA = [{"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 600,
               "image_id": 1, "coco_id": None, "flickr_id": None}]


def test_vg_regions_with_image_data(read, conv):
    rows = read("vg_regions", REGIONS, side=IMAGE_DATA, path="region_descriptions.json")
    got = [(r["id"], r["reason"]) for r in rows]
    assert got == [("1:r1384", "bad_box"), ("1:r1385", "bad_field"), ("1:0", None), ("77", "missing_image_entry")]
    good = rows[2]
    assert good["image_paths"] == ["s3://b/img/VG_100K_2/1.jpg"]
    assert json.loads(good["boxes"]) == [[0, 421, 57, 503, 196], [0, 194, 372, 376, 481]]
    turns = conv(good)
    assert turns[0]["value"] == "<image>\nPlease provide a short description for this region: <box:0>"
    assert turns[1]["value"] == "the clock is green in colour" and turns[2]["value"].endswith("<box:1>")


def test_vg_regions_without_image_data_and_chunking(read, conv):
    from actors.data.layouts.vg_regions import REGIONS_PER_SAMPLE

    many = [{"id": 5, "regions": [{"region_id": k, "x": k, "y": 0, "width": 3, "height": 3, "phrase": f"thing {k}"}
                                  for k in range(REGIONS_PER_SAMPLE + 2)]}]
    rows = read("vg_regions", many, prompt="referring")
    assert [r["id"] for r in rows] == ["5:0", "5:1"] and rows[0]["image_paths"] == ["s3://b/img/5.jpg"]
    assert len(json.loads(rows[0]["boxes"])) == REGIONS_PER_SAMPLE and len(json.loads(rows[1]["boxes"])) == 2
    assert conv(rows[1])[0]["value"].endswith("describes: thing 10") and conv(rows[1])[1]["value"] == "<box:0>"
