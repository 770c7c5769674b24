"""preprocess end to end over one source of every layout: cluster/examples/aws.yaml's SPHINX-X mix as
written (its bucket re-rooted on the embedded S3, a few rows of each dataset in its published
layout, tiny images), plus a sharegpt, a messages and a llava source with its own pixel boxes, on
the shared Ray (debug flavour).

The manifest carries every source's counts, quarantine reasons, layout, prompt templates, weight
and epochs (with a mixture temperature), the shards hold the prompts and the boxes in SPHINX's text
form, the summary prints the mix, and the train stage trains one epoch of those very shards (every
row read once, a finite loss; ~25 s on 2 cores).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import tempfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.data import prompts
from actors.data.mixture import plan
from actors.data.rows import copies_for
from cluster.spec import EXAMPLES_DIR, load_spec
from models.boxes import parse_boxes
from models.conversation import load_tokenizer

PLACEHOLDER = "s3://my-team-datasets"


def _png(w: int = 32, h: int = 24, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _ask(q: str, a: str, image: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def _datasets() -> dict[str, bytes]:
    """Files under the placeholder bucket (keys relative to it), each in its dataset's published layout."""
    j = lambda x: json.dumps(x).encode()  # noqa: E731
    files: dict[str, bytes] = {}
    images = ["coco/train2017/000000000001.jpg", "coco/train2014/COCO_train2014_000000000009.jpg",
              "sharegpt4v/images/sam/1.png", "llavar/images/a.jpg", "gqa/images/2354786.jpg",
              "textvqa/train_images/0054c91397f2fe05.jpg", "ocrvqa/images/1439511679.jpg",
              "docvqa/train/documents/xnbl0037_1.png", *(f"vg/VG_100K/{k}.jpg" for k in range(1, 11))]
    for k, key in enumerate(images):
        files[key] = _png(32 + k, 24, seed=k)
    files["llava/llava_instruct_150k.json"] = j([{"id": "li1", "image": "000000000001.jpg",
                                                  "conversations": _ask("What is shown?", "Noise.")}])
    files["sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json"] = j(
        [{"id": "sam_1", "image": "sam/1.png", "conversations": _ask("Describe it in detail.", "Colourful noise.")}])
    files["lvis-instruct4v/lvis_instruct4v_220k.json"] = j(
        [{"id": "lv1", "image": "train2017/000000000001.jpg", "conversations": _ask("Any objects?", "None.")}])
    files["llavar/llavar_instruct_16k.json"] = j([{"id": "lr1", "image": "a.jpg",
                                                   "conversations": _ask("Read it.", "Nothing to read.")}])
    files["ultrachat/train_0.jsonl"] = b"\n".join(
        j({"id": str(k), "data": [f"Question {k}?", f"Answer {k}.", "Thanks!", "You are welcome."]}) for k in range(10))
    files["vqav2/v2_OpenEnded_mscoco_train2014_questions.json"] = j({"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "What colour?", "question_id": 9000},
        {"image_id": 9, "question": "How many?", "question_id": 9001}]})
    files["vqav2/v2_mscoco_train2014_annotations.json"] = j({"annotations": [
        {"question_id": 9000, "image_id": 9, "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": 1}]}]})  # 9001: no answer
    files["gqa/train_balanced_questions.json"] = j({"02930152": {"question": "Is the sky dark?", "imageId": "2354786",
                                                                 "answer": "yes", "fullAnswer": "Yes, it is."}})
    files["okvqa/OpenEnded_mscoco_train2014_questions.json"] = j({"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "What sport?", "question_id": 90}]})
    files["okvqa/mscoco_train2014_annotations.json"] = j({"annotations": [
        {"question_id": 90, "image_id": 9, "answers": [{"answer": a, "answer_id": k} for k, a in
                                                       enumerate(["tennis", "tennis", "golf"])]}]})
    files["aokvqa/aokvqa_v1p0_train.json"] = j([{"split": "train", "image_id": 1, "question_id": "22Mex",
                                                 "question": "What is it?", "choices": ["a", "b", "c", "d"],
                                                 "correct_choice_idx": 2, "direct_answers": ["c"] * 10}])
    files["coco/annotations/captions_train2017.json"] = j({
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 32, "height": 24},
                   {"id": 2, "file_name": "000000000002.jpg", "width": 32, "height": 24}],  # not uploaded
        "annotations": [{"id": 1, "image_id": 1, "caption": "Noise."}, {"id": 2, "image_id": 1, "caption": "Dots."},
                        {"id": 3, "image_id": 2, "caption": "Lost."}, {"id": 4, "image_id": 77, "caption": "?"}]})
    files["textvqa/TextVQA_0.5.1_train.json"] = j({"dataset_name": "textvqa", "data": [
        {"question": "what brand?", "image_id": "0054c91397f2fe05", "answers": ["nokia"] * 9 + ["toshiba"],
         "question_id": 0}]})
    files["ocrvqa/dataset.json"] = j({"1439511679": {"imageURL": "http://x/51P1p8LIYHL.jpg",
                                                     "questions": ["Who wrote this book?", "Is it a novel?"],
                                                     "answers": ["Kay Hooper", "Yes"]}})
    files["docvqa/train/train_v1.0_withQT.json"] = j({"dataset_name": "docvqa", "data": [
        {"questionId": 337, "question": "what is the date?", "image": "documents/xnbl0037_1.png",
         "answers": ["1/8/93"]}]})
    instances = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 33, "height": 24}],
                 "annotations": [{"id": 1, "image_id": 9, "bbox": [3.3, 2.4, 16.5, 12.0], "iscrowd": 0},
                                 {"id": 2, "image_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}
    refs = [{"ref_id": 0, "ann_id": 1, "image_id": 9, "split": "train",
             "sentences": [{"sent_id": 0, "sent": "the left square", "raw": "The left square"}]},
            {"ref_id": 1, "ann_id": 2, "image_id": 9, "split": "train", "sentences": [{"sent_id": 1, "sent": "crowd"}]},
            {"ref_id": 2, "ann_id": 1, "image_id": 9, "split": "testA", "sentences": [{"sent_id": 2, "sent": "held"}]}]
    for name, refs_file in [("refcoco", "refs(unc).p"), ("refcocog", "refs(umd).p")]:
        files[f"{name}/{refs_file}"] = pickle.dumps(refs, protocol=2)
        files[f"{name}/instances.json"] = j(instances)
    files["vg/region_descriptions.json"] = j(
        [{"id": k, "regions": [{"region_id": 100 + k, "image_id": k, "phrase": f"region {k}", "x": 2, "y": 3,
                                "width": 10, "height": 8}]} for k in range(1, 11)])
    files["vg/image_data.json"] = j([{"image_id": k, "url": f"https://cs.stanford.edu/x/VG_100K/{k}.jpg",
                                      "width": 31 + 8 + k, "height": 24} for k in range(1, 11)])
    # llava records with their own boxes (the demo's region rows): a good one, a slot without a box
    # (quarantined at parse), a box past its 40x30 image (quarantined by the tiler, stage boxes)
    files["grounding/images/g.png"] = _png(40, 30, seed=7)
    where = _ask("Where is the red square?", "<box:0>")
    files["grounding/train.jsonl"] = b"\n".join(j(r) for r in [
        {"id": "g1", "image": "g.png", "conversations": where, "boxes": [[0, 4, 4, 20, 24]]},
        {"id": "g2", "image": "g.png", "conversations": where},
        {"id": "g3", "image": "g.png", "conversations": where, "boxes": [[0, 4, 4, 45, 24]]}])
    # two more layouts the example does not use
    files["chat/sharegpt.jsonl"] = j({"id": "sg1", "conversations": [
        {"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}]})
    table = pa.Table.from_pylist([{"messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}],
        "images": [{"bytes": _png(20, 40, seed=99), "path": None}]}])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    files["chat/messages.parquet"] = buf.getvalue()
    return files


@pytest.fixture(scope="module")
def mix(s3):
    """aws.yaml's data section re-rooted on the embedded S3, plus sharegpt and messages sources."""
    from cluster.spec import StorageSection
    from cluster.storage import open_storage

    root = f"s3://sphinx-x-test/mix-{uuid.uuid4().hex[:8]}"
    storage = open_storage(StorageSection(uri=root, endpoint_url="embedded"))
    for key, data in _datasets().items():
        storage.write_bytes(f"datasets/{key}", data)
    sources = []
    for src in load_spec(EXAMPLES_DIR / "aws.yaml").data.sources:
        entry = src.model_dump(exclude_defaults=True)
        for key in ("path", "image_root", "annotations"):
            if key in entry:
                assert entry[key].startswith(PLACEHOLDER + "/")
                entry[key] = f"{root}/datasets" + entry[key][len(PLACEHOLDER):]
        sources.append(entry)
    sources += [{"name": "sharegpt", "path": f"{root}/datasets/chat/sharegpt.jsonl", "layout": "sharegpt"},
                {"name": "messages", "path": f"{root}/datasets/chat/messages.parquet", "layout": "messages"},
                {"name": "grounding", "path": f"{root}/datasets/grounding/train.jsonl",
                 "image_root": f"{root}/datasets/grounding/images"}]
    return root, sources


def test_every_layout_preprocesses_into_shards_that_train_with_the_mix_in_the_manifest(ray_module, make_spec, mix):
    from cluster.storage import open_storage
    from pipelines.stages import preprocess, train

    root, sources = mix
    spec = make_spec(data={"sources": sources, "max_seq_len": 768, "rows_per_shard": 8, "concurrency": 2,
                           "max_quarantine_fraction": 0.5, "mixture_temperature": 2.0, "prompt_seed": 3})
    m = preprocess.run_stage(spec)
    s = m["sources"]
    layouts = {name: v["layout"] for name, v in s.items()}
    assert set(layouts.values()) == {"llava", "sharegpt", "messages", "ultrachat", "coco_captions", "vqa", "textvqa",
                                     "ocrvqa", "docvqa", "refcoco", "vg_regions"}
    # the mix: epochs = ratio x weight x the temperature factor over the records read
    sizes = {name: v["rows_read"] for name, v in s.items()}
    expected = plan([(x["name"], x.get("ratio", 1.0), x.get("weight", 1.0)) for x in sources], sizes, 2.0)
    assert {n: v["epochs"] for n, v in s.items()} == pytest.approx(expected, rel=1e-5)
    assert s["docvqa"]["weight"] == 2.0 and s["vqav2"]["weight"] == 0.5 and m["mixture_temperature"] == 2.0
    assert (s["aokvqa"]["prompt"], s["aokvqa"]["prompt_templates"]) == (
        "multiple_choice", list(prompts.templates_of("multiple_choice")))
    assert s["coco-captions"]["prompt_templates"] == list(prompts.TEMPLATES["caption"])
    assert (s["refcoco"]["prompt"], s["refcocog"]["prompt"], s["vg-regions"]["prompt"]) == (
        "referring", "region_caption", "region_caption")
    assert s["ultrachat"]["prompt"] is None and s["llava-instruct"]["layout"] == "llava"
    # counts and every quarantine reason, per source
    for name, v in s.items():  # every source has a good record: written at least once at epochs >= 1
        assert v["rows_written"] >= 1 or v["epochs"] < 1, name
    assert min(s[n]["epochs"] for n in ("refcoco", "refcocog", "aokvqa", "sharegpt", "messages", "docvqa")) >= 1

    def quarantined(source: str, reasons: dict[str, str]) -> dict[str, int]:
        """The reasons of these records, once per copy written (epochs < 1 may leave one out)."""
        out: dict[str, int] = {}
        for rid, reason in reasons.items():
            n = copies_for(s[source]["epochs"], f"{source}:{rid}")
            if n:
                out[reason] = out.get(reason, 0) + n
        return out

    assert s["vqav2"]["quarantined_by_reason"] == quarantined("vqav2", {"9001": "missing_answer"})
    assert s["coco-captions"]["quarantined_by_reason"] == quarantined(
        "coco-captions", {"3": "missing_image", "4": "missing_image_entry"})
    assert s["refcoco"]["quarantined_by_reason"] == quarantined("refcoco", {"1:1": "crowd_box"})
    assert s["refcoco"]["epochs"] >= 1 and s["refcoco"]["quarantined_by_reason"]["crowd_box"] >= 1
    assert s["refcoco"]["subsampled_out"] == 1  # its testA ref
    assert s["grounding"]["quarantined_by_reason"] == quarantined("grounding", {"g2": "bad_box", "g3": "bad_box"})
    assert sum(sum(v["quarantined_by_reason"].values()) for v in s.values()) == m["rows_quarantined"] > 0
    for v in s.values():
        assert v["rows_in"] == v["rows_written"] + v["rows_quarantined"]
        assert v["rows_read"] >= v["subsampled_out"] + v["duplicate_samples"] + v["duplicate_images"]
    # the shards: prompts and boxes as the model trains on them
    storage = open_storage(spec.storage)
    shards = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f"shards/{n}"))) for n in m["shards"]])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(storage.download_dir("shards/tokenizer", tmp))
    rows = shards.select(["id", "source", "input_ids", "labels"]).to_pylist()
    assert {r["source"] for r in rows} == {n for n, v in s.items() if v["rows_written"]}

    def answer(source: str) -> str:
        r = next(r for r in rows if r["source"] == source)
        return tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100])

    def asked(source: str) -> str:
        r = next(r for r in rows if r["source"] == source)
        return tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab == -100])

    # refcoco: the box [3.3, 2.4, 19.8, 14.4] on the 33x24 image; debug canvas 96, top_left: scaled to
    # 96x70, so x / 33 and y * 70 / 24 / 96 -> [0.10, 0.07, 0.60, 0.44]
    assert parse_boxes(answer("refcoco").replace(" ", ""))[0].boxes == [(0.10, 0.07, 0.60, 0.44)]
    # a llava record's own box [4, 4, 20, 24] on its 40x30 image: scaled to 96x72 -> x / 40, y * 72 / 30 / 96
    assert parse_boxes(answer("grounding").replace(" ", ""))[0].boxes == [(0.10, 0.10, 0.50, 0.60)]
    flat = lambda text: text.replace(" ", "")  # noqa: E731 - the debug BPE decodes with its own spacing
    assert "boundingboxcoordinate" in flat(asked("refcoco")) and "theleftsquare" in flat(asked("refcoco"))
    assert "shortdescriptionforthisregion" in flat(asked("refcocog")) and flat(answer("refcocog")).startswith("the")
    assert "Answerwiththeoption" in flat(asked("aokvqa")) and flat(answer("aokvqa")).startswith("C")
    assert "Beterse." in flat(asked("sharegpt"))
    errors = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f"shards/{n}"))) for n in m["error_shards"]])
    assert {(r["id"], r["stage"], r["reason"]) for r in errors.to_pylist() if r["source"] == "grounding"} == {
        ("g2", "parse", "bad_box"), ("g3", "boxes", "bad_box")}
    text = preprocess.format_summary(m)
    assert "mixture temperature 2" in text and "refcoco / referring (1 templates)" in text
    assert next(x for x in text.splitlines() if x.strip().startswith("docvqa")).split()[6] == "2"  # weight

    # ... and these very shards train: one epoch, one packed row per step, so every row of every
    # source is read once (the workers check they read the plan's rows in order)
    trained = train.run_stage(make_spec(**{**spec.model_dump(mode="json"), "train": {
        "workers": 1, "micro_batch": 1, "steps": None, "epochs": 1, "checkpoint_every": 1000, "max_failures": 0,
        "lr": 1e-3}}), export=False)
    assert trained["rows"] == shards.num_rows == sum(v["rows_written"] for v in s.values())
    assert trained["step"] == trained["total_steps"] == trained["packed_rows"] >= 1
    history = [json.loads(x) for x in storage.read_bytes(f"{spec.train.output}/metrics.jsonl").decode().splitlines()]
    assert [h["step"] for h in history] == list(range(1, trained["step"] + 1))
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in history) and math.isfinite(trained["loss"])
    assert sum(h["image_tokens"] for h in history) == sum(shards.column("image_tokens").to_pylist())
    assert sum(h["tokens"] for h in history) == sum(shards.column("num_tokens").to_pylist())
