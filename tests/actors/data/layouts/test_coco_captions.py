"""coco_captions: COCO's captions_*.json read whole; one sample per caption, a LLaVA caption
prompt per row (seeded), missing image entries and empty captions quarantined."""

from __future__ import annotations

from actors.data import prompts

# the layout of annotations/captions_val2017.json (ids and text from its first records)
CAPTIONS = {
    "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "..."}],
    "images": [
        {"license": 4, "file_name": "000000397133.jpg", "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
         "height": 427, "width": 640, "date_captured": "2013-11-14 17:02:52", "flickr_url": "http://...", "id": 397133},
        {"license": 1, "file_name": "000000037777.jpg", "height": 230, "width": 352, "id": 37777},
    ],
    "annotations": [
        {"image_id": 179765, "id": 38, "caption": "A black Honda motorcycle parked in front of a garage."},
        {"image_id": 397133, "id": 370509, "caption": "A man is in a kitchen making pizzas."},
        {"image_id": 397133, "id": 370584, "caption": "Man in apron standing on front of oven with pans and bakeware"},
        {"image_id": 37777, "id": 370999, "caption": "   "},
    ],
}


def test_captions_file_as_published(read, conv):
    rows = read("coco_captions", CAPTIONS, path="annotations/captions_val2017.json")
    assert [(r["id"], r["reason"]) for r in rows] == [("38", "missing_image_entry"), ("370509", None),
                                                      ("370584", None), ("370999", "bad_field")]
    good = rows[1]
    assert good["image_paths"] == ["s3://b/img/000000397133.jpg"]
    human, gpt = conv(good)
    assert human["value"].startswith("<image>\n") and human["value"][8:] in prompts.TEMPLATES["caption"]
    assert gpt == {"from": "gpt", "value": "A man is in a kitchen making pizzas."}
    again = read("coco_captions", CAPTIONS, path="annotations/captions_val2017.json")
    assert [r["conversations"] for r in again] == [r["conversations"] for r in rows]  # deterministic
    seeds = {conv(read("coco_captions", CAPTIONS, seed=s)[1])[0]["value"] for s in range(12)}
    assert len(seeds) > 1  # the seed picks among the templates


def test_not_a_captions_file_is_one_row(read):
    rows = read("coco_captions", [{"image": "a.jpg"}], path="x.json")
    assert len(rows) == 1 and rows[0]["reason"] == "bad_field" and rows[0]["id"] == "s:file"
    broken = read("coco_captions", b'{"images": [', path="x.json")
    assert len(broken) == 1 and broken[0]["reason"] == "invalid_json"
