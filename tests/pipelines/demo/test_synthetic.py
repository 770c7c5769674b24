"""pipelines.demo.synthetic: determinism, disjoint splits, aspect spread, canonical answers."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pytest
from PIL import Image

from models.errors import UserError
from pipelines.demo import synthetic as S


@pytest.fixture(scope="module")
def ds():
    return S.generate(240, 80, seed=3)


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for k in sorted(files):
        h.update(k.encode() + b"\0" + files[k])
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(ds):
    again = S.files(S.generate(240, 80, seed=3))
    assert _digest(again) == _digest(S.files(ds))
    assert _digest(S.files(S.generate(240, 80, seed=4))) != _digest(again)


def test_heldout_images_never_in_training(ds):
    train_imgs = {s.image for s in ds.train if s.image}
    held_imgs = [s.image for s in ds.heldout if s.image]
    assert held_imgs and not train_imgs.intersection(held_imgs)
    train_ids = {r["id"] for r in ds.train_rows()}
    assert not train_ids.intersection(r["id"] for r in ds.heldout_rows())


def test_aspect_ratios_include_panoramas_and_tall_images(ds):
    ratios = Counter(round(s.size[0] / s.size[1], 2) for s in ds.train if s.size)
    assert ratios[4.0] > 0 and ratios[0.33] > 0 and ratios[0.5] > 0 and ratios[1.0] > 0
    # the files are what the sizes say
    s = next(s for s in ds.train if s.size == (192, 48))
    assert Image.open(io.BytesIO(s.image)).size == (192, 48)


def test_every_type_present_with_one_word_canonical_answers(ds):
    rows = ds.heldout_rows()
    types = Counter(r["type"] for r in rows)
    assert set(types) == set(S.QUESTION_TYPES)
    assert any("image" not in r for r in rows)  # text-only samples exist
    for r in rows:
        assert r["answer"] == S.normalise_answer(r["answer"]) and " " not in r["answer"]
        assert ("image" in r) == r["conversations"][0]["value"].startswith("<image>")
    colours = {r["answer"] for r in rows if r["type"] == "colour"}
    assert colours <= set(S.COLOURS)
    assert {r["answer"] for r in rows if r["type"] == "count"} <= {"1", "2", "3", "4"}


def test_training_rows_are_llava_multi_turn(ds):
    row = next(r for r in ds.train_rows() if "image" in r and len(r["conversations"]) == 6)
    roles = [t["from"] for t in row["conversations"]]
    assert roles == ["human", "gpt"] * 3
    assert row["conversations"][0]["value"].startswith("<image>\n")
    assert sum("<image>" in t["value"] for t in row["conversations"]) == 1
    assert set(row) == {"id", "image", "conversations"}


def test_majority_baseline_matches_training_answers(ds):
    st = ds.stats()
    for qtype, t in st["types"].items():
        counts = Counter(a for s in ds.train for ty, _, a in s.qa if ty == qtype)
        assert t["majority"] == counts.most_common(1)[0][0]
        held = [r["answer"] for r in ds.heldout_rows() if r["type"] == qtype]
        assert t["baseline"] == pytest.approx(sum(a == t["majority"] for a in held) / len(held))
        assert t["baseline"] < 0.5  # balanced classes: the majority guess is weak


def test_write_local_round_trip(ds, tmp_path):
    where = S.write(ds, tmp_path / "syn")
    rows = S.load_heldout((tmp_path / "syn" / "heldout.jsonl").read_bytes())
    assert len(rows) == len(ds.heldout_rows())
    first = json.loads((tmp_path / "syn" / "train.jsonl").read_text().splitlines()[0])
    if "image" in first:
        assert (tmp_path / "syn" / first["image"]).is_file()
    assert where["image_root"] == str(tmp_path / "syn")
    assert json.loads((tmp_path / "syn" / "stats.json").read_text())["train_samples"] == 240


def test_bad_arguments_and_bad_heldout_are_clear():
    with pytest.raises(UserError, match="n_train"):
        S.generate(0, 1)
    with pytest.raises(UserError, match="mix"):
        S.generate(10, 1, mix=(0.5, 0.5, 0.5))
    with pytest.raises(UserError, match="line 1: not JSON"):
        S.load_heldout(b"{oops\n")
    with pytest.raises(UserError, match="line 2: .*'type' and 'answer'"):
        S.load_heldout(b'{"type": "a", "answer": "b"}\n{"id": 1}\n')


@pytest.mark.parametrize("text, key", [("Red.", "red"), ("  3\n###", "3"), ("circle square", "circle"), ("", "")])
def test_normalise_answer(text, key):
    assert S.normalise_answer(text) == key


@pytest.fixture(scope="module")
def regions():
    return S.generate(120, 60, seed=5, regions=True)


def test_region_questions_name_the_shape_by_slot_with_its_pixel_box(regions, ds):
    assert not any("boxes" in r for r in ds.train_rows())  # off by default (same files as before)
    one = [s for s in regions.train if s.kind == "scene" and s.meta["count"] == 1]
    assert one and all(s.boxes for s in one)
    assert not any(s.boxes for s in regions.train if s not in one)
    for s in one:
        (image, x1, y1, x2, y2), = s.boxes
        w, h = s.size
        assert image == 0 and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        (q, a), = [(q, a) for t, q, a in s.qa if t == S.REGION_TYPE]
        assert a == S.BOX_SLOT and f"the {s.meta['colour']} {s.meta['shape']}" in q
    row = next(r for r in regions.train_rows() if "boxes" in r)
    turns = row["conversations"]
    i = next(i for i, t in enumerate(turns) if t["value"] == S.BOX_SLOT)
    assert turns[i]["from"] == "gpt" and not turns[i - 1]["value"].endswith(S.ANSWER_HINT)
    held = [r for r in regions.heldout_rows() if r["type"] == S.REGION_TYPE]
    assert held and all(json.loads(r["answer"]) == r["boxes"][0][1:] for r in held)


@pytest.mark.parametrize("pad, frame", [("top_left", "topleft"), ("centre", "center")])
def test_region_boxes_hold_their_shape_on_the_model_canvas(regions, pad, frame):
    """The pixel box, moved onto the canvas the model sees (models.boxes.to_canvas), encloses
    the shape's pixels there; the eval scores that box as right (IoU >= 0.5 in its frame)."""
    import numpy as np

    from actors.eval.grounding import grounding_iou
    from models.boxes import format_box, to_canvas
    from models.tiling import TileSpec, load_and_tile

    spec = TileSpec(grid=2, tile_size=128, pad=pad)
    c = spec.canvas
    for s in [s for s in regions.heldout if s.boxes][:8]:
        box = to_canvas(s.boxes[0][1:], s.size, spec)
        canvas = load_and_tile(s.image, spec).canvas(spec.mean_u8).astype(int)
        near = np.abs(canvas - np.array(S.COLOURS[s.meta["colour"]])).sum(-1) < 60
        ys, xs = np.nonzero(near)
        seen = (xs.min() / c, ys.min() / c, (xs.max() + 1) / c, (ys.max() + 1) / c)
        assert seen == pytest.approx(box, abs=4 / c), (s.id, s.size)
        row = next(r for r in regions.heldout_rows() if r["id"] == f"{s.id}-{S.REGION_TYPE}")
        iou, _ = grounding_iou(format_box(box), json.loads(row["answer"]), *s.size, frame=frame)
        assert iou >= 0.9


def test_region_baseline_is_the_mean_box_and_weak(regions):
    from actors.eval.grounding import box_iou

    st = regions.stats()["types"][S.REGION_TYPE]
    frac = lambda s: [v / d for v, d in zip(s.boxes[0][1:], (*s.size, *s.size))]  # noqa: E731
    train = [frac(s) for s in regions.train if s.boxes]
    assert st["majority"] == pytest.approx([sum(c) / len(train) for c in zip(*train)], abs=1e-4)
    held = [s for s in regions.heldout if s.boxes]
    assert st["heldout"] == len(held)
    assert st["baseline"] == sum(box_iou(st["majority"], frac(s)) >= 0.5 for s in held) / len(held) < 0.5


def test_regions_add_where_questions_and_change_nothing_else(regions):
    """The ``where`` question draws from its own stream: with and without ``regions`` the images and
    every other question are the same, so the held-out split of earlier runs is kept."""
    plain = S.generate(120, 60, seed=5)
    for a, b in zip(plain.train + plain.heldout, regions.train + regions.heldout):
        assert (a.id, a.image, a.meta) == (b.id, b.image, b.meta)
        assert a.qa == [x for x in b.qa if x[0] != S.REGION_TYPE]
