"""pipelines.demo.synthetic_coco: the demo's scenes as COCO, marked by actors.curate.som (no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from actors.curate.regions import index_coco
from actors.curate.som import SomConfig, curate_image
from cluster.spec import SomCurate, StorageSection
from cluster.storage import open_storage
from pipelines.demo.synthetic import COLOURS
from pipelines.demo.synthetic_coco import coco_scenes


def test_scenes_are_seeded_and_every_shape_gets_a_mark_on_its_own_colour(tmp_path):
    files = coco_scenes(6, seed=3)
    assert files == coco_scenes(6, seed=3) and files != coco_scenes(6, seed=4)
    storage = open_storage(StorageSection(uri=str(tmp_path), endpoint_url=None))
    for name, data in files.items():
        storage.write_bytes(storage.path(name), data)
    coco = index_coco(json.loads(files["instances.json"]))
    config = SomConfig(section=SomCurate(annotations="instances.json", images="images", contours=False),
                       categories=coco["categories"], max_image_bytes=2**20, max_image_pixels=10**7)
    for img in coco["images"]:
        anns = coco["by_image"][img["id"]]
        (out,) = curate_image({"id": f"s:{img['id']}", "image": storage.path("images", img["file_name"]),
                               "width": img["width"], "height": img["height"], "annotations": anns}, config, storage)
        assert out.reason is None and out.counts["regions_marked"] == len(anns)
        source = np.asarray(Image.open(io.BytesIO(files[f"images/{img['file_name']}"])).convert("RGB"))
        by_id = {a["id"]: a for a in anns}
        for mark in out.records[0]["marks"]:
            x, y = mark["point"]
            ann = by_id[mark["ann_id"]]
            assert mark["category"] == coco["categories"][ann["category_id"]]
            assert tuple(source[y, x]) == COLOURS[ann["colour"]]  # the anchor is on the drawn shape
