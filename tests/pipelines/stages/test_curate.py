"""sphinx-x curate: both kinds through Ray Data on the embedded S3, then preprocess and a few
training steps on the curated sets beside an ordinary source (one spec, `run`'s local path).

The pure checks (verb shape, which kinds run, demand) need no Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cluster.spec import dump_spec, parse_spec
from models.errors import UserError
from pipelines.cli import build_parser
from pipelines.stages import curate
from pipelines.demo.synthetic_pdfs import scanned_pdf, text_pdf


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _scene(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.full((96, 128, 3), 180, np.uint8)
    a[10:60, 10:50] = rng.integers(0, 255, 3)
    a[30:90, 70:120] = rng.integers(0, 255, 3)
    return _jpeg(Image.fromarray(a))


COCO = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 128, "height": 96},
               {"id": 2, "file_name": "b.jpg", "width": 128, "height": 96},
               {"id": 3, "file_name": "missing.jpg", "width": 128, "height": 96},
               {"id": 4, "file_name": "c.jpg", "width": 128, "height": 96}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 50], "segmentation": [[10, 10, 50, 10, 50, 60, 10, 60]]},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [70, 30, 50, 60], "segmentation": []},
        {"id": 21, "image_id": 2, "category_id": 2, "bbox": [70, 30, 50, 60], "segmentation": [[70, 30, 120, 30, 120, 90]]},
        {"id": 31, "image_id": 3, "category_id": 1, "bbox": [10, 10, 40, 50]},
        {"id": 41, "image_id": 4, "category_id": 1, "bbox": [100, 80, 60, 40]},  # leaves the image
    ],
}
REPORT = [["Quarterly report 2024", "Revenue: 41 million", "Costs were lower than planned"],
          ["The second page has its own words", "and a closing line here"]]


def test_the_verb_takes_the_kind_before_the_spec_and_runs_only_configured_kinds():
    args = build_parser().parse_args(["curate", "som", "spec.yaml", "--force"])
    assert (args.kind, args.spec, args.force) == ("som", "spec.yaml", True)
    spec = parse_spec({"curate": {"som": {"annotations": "a.json", "images": "img"}, "concurrency": 3}})
    assert curate.kinds_of(spec) == ["som"] and curate.STAGE.used(spec) and not curate.STAGE.used(parse_spec({}))
    (work,) = curate.STAGE.demand(spec).work
    assert (work.count, work.per_unit["CPU"]) == (3, 1)

    class Ctx:
        def __init__(self, kind):
            self.spec, self.kind = spec, kind

        def option(self, name):
            return self.kind

    assert curate._kinds(Ctx("all")) == curate._kinds(Ctx(None)) == ["som"]
    with pytest.raises(UserError, match="no curate.ocr section"):
        curate._kinds(Ctx("ocr"))
    from pipelines.stages import plans

    (first, *_) = plans(spec, "job-spec.yaml")  # a cluster run starts with it, as its own job
    assert first.name == "curate" and first.entrypoint.endswith("--stages curate --address local")


@pytest.mark.slow
def test_curate_both_sets_then_preprocess_and_train_on_them_with_an_ordinary_source(ray_module, make_spec, tmp_path,
                                                                                      monkeypatch):
    from cluster.connect import storage_for
    from cluster.layout import Layout
    from pipelines.cli import main
    from pipelines.run import run_local

    spec = make_spec(
        model={"flavour": "debug"},
        curate={"som": {"annotations": "in/coco/instances.json", "images": "in/coco/images"},
                "ocr": {"input": "in/docs", "languages": ["en"]}, "block_size": 2, "concurrency": 2, "previews": 2},
        data={"sources": [{"name": "som", "path": "curated/som/data.jsonl"},
                          {"name": "ocr", "path": "curated/ocr/data.jsonl"},
                          {"name": "plain", "path": "in/plain/data.jsonl"}],
              "max_seq_len": 1024, "rows_per_shard": 4},
        train={"workers": 1, "steps": 2, "micro_batch": 2, "checkpoint_every": 2, "max_failures": 0})
    storage = storage_for(spec)
    lay = Layout.from_spec(spec, storage.uri)
    put = lambda rel, data: storage.write_bytes(lay.path(rel), data)  # noqa: E731
    put("in/coco/instances.json", json.dumps(COCO).encode())
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("c.jpg", 3)):
        put(f"in/coco/images/{name}", _scene(seed))
    put("in/docs/report.pdf", text_pdf(REPORT))
    put("in/docs/sub/copy.pdf", text_pdf(REPORT[:1]))  # the same text as report.pdf's page 1
    put("in/docs/scan.pdf", scanned_pdf(Image.new("L", (80, 60), 0)))  # ink, no text layer
    put("in/docs/notes.txt", b"not a document")
    put("in/plain/p.jpg", _scene(9))
    put("in/plain/data.jsonl", "".join(json.dumps({"id": f"plain-{k}", "image": "p.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nQuestion {k}: what colour is the background?"},
        {"from": "gpt", "value": "Grey."}]}) + "\n"
        for k in range(2)).encode())

    # the blocks' key holds the code version (git HEAD): others committing mid-test must not change it
    monkeypatch.setattr(curate, "code_version", lambda: "test")
    summaries = run_local(spec, ["curate", "preprocess", "train"])

    som, ocr = summaries["curate"]["som"], summaries["curate"]["ocr"]
    assert (som["items"], som["samples"], som["quarantined"]) == (4, 2, {"missing_image": 1, "region_outside": 1})
    assert (ocr["items"], ocr["samples"], ocr["quarantined"], ocr["other_files"]) == (4, 2, {"duplicate": 1, "no_text": 1}, 1)
    records = [json.loads(x) for x in storage.read_bytes(lay.curated_records("som")).decode().splitlines()]
    assert [r["id"] for r in records] == ["som:1", "som:2"] and [len(r["marks"]) for r in records] == [2, 1]
    for r in records:  # the marked picture is where the record says, and its marks' numbers are the questions'
        assert storage.exists(lay.curated("som") / r["image"])
        assert {m["mark"] for m in r["marks"]} == set(range(1, len(r["marks"]) + 1))
    errors = [json.loads(x) for x in storage.read_bytes(lay.curated_errors("ocr")).decode().splitlines()]
    assert {e["id"]: e["reason"] for e in errors} == {"scan.pdf#1": "no_text", "sub/copy.pdf#1": "duplicate"}
    ocr_records = [json.loads(x) for x in storage.read_bytes(lay.curated_records("ocr")).decode().splitlines()]
    texts = {r["id"]: r["conversations"][1]["value"] for r in ocr_records if r["id"].endswith(":text")}
    assert texts == {"report.pdf#1:text": "\n".join(REPORT[0]), "report.pdf#2:text": "\n".join(REPORT[1])}
    for kind in ("som", "ocr"):
        previews = storage.list(lay.curated_previews(kind))
        assert len(previews) == 2 and Image.open(io.BytesIO(storage.read_bytes(previews[0]))).size[0] > 0

    pre = summaries["preprocess"]
    assert {s: pre["sources"][s]["rows_written"] for s in ("som", "ocr", "plain")} == \
        {"som": 2, "ocr": len(ocr_records), "plain": 2}
    assert pre["rows_quarantined"] == 0
    assert summaries["train"]["step"] == 2

    # resumable: without the manifest, a rerun (the verb, through the CLI) reuses every finished block
    before = storage.read_bytes(lay.curated_records("som"))
    storage.delete(lay.curated_manifest("som"))
    path = tmp_path / "spec.yaml"
    path.write_text(dump_spec(spec))
    assert main(["curate", "som", str(path)]) == 0
    manifest = json.loads(storage.read_bytes(lay.curated_manifest("som")))
    assert manifest["blocks_reused"] == manifest["blocks"] == 2
    assert storage.read_bytes(lay.curated_records("som")) == before

    # the one-off form: no spec, a local folder in, local storage at -o OUT
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "r.pdf").write_bytes(text_pdf(REPORT[1:]))
    assert main(["curate", "ocr", "--input", str(tmp_path / "docs"), "-o", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "_manifest.json").read_text())
    assert (one["samples"], one["source"]["path"]) == (1, str(tmp_path / "one" / "data.jsonl"))


def test_the_one_off_form_builds_a_spec_from_its_flags(tmp_path):
    parse = build_parser().parse_args
    spec = curate.STAGE.one_off_spec(parse(["curate", "all", "--input", "docs", "--annotations", "a.json", "--images",
                                            "img", "--engine", "tesseract", "-o", str(tmp_path)]))
    assert spec.storage.uri == str(tmp_path) and spec.curate.ocr.engine == "tesseract"
    assert (spec.curate.ocr.output, spec.curate.som.output) == ("ocr", "som")  # under OUT
    assert spec.curate.ocr.input.endswith("/docs") and spec.curate.som.images.endswith("/img")
    only = curate.STAGE.one_off_spec(parse(["curate", "som", "--annotations", "s3://b/a.json", "--images", "s3://b/i",
                                            "-o", str(tmp_path)]))
    assert (only.curate.som.output, only.curate.som.annotations, only.curate.ocr) == (str(tmp_path), "s3://b/a.json", None)
    with pytest.raises(UserError, match="missing --annotations, --images"):
        curate.STAGE.one_off_spec(parse(["curate", "som", "-o", str(tmp_path)]))


def test_ocr_inputs_skip_other_files_and_the_curated_output_inside_the_prefix(tmp_path):
    from cluster.run_context import RunContext

    spec = parse_spec({"storage": {"uri": str(tmp_path), "endpoint_url": None}, "curate": {"ocr": {"input": "."}}})
    for rel, data in (("a.pdf", text_pdf(REPORT)), ("scans/p.png", _jpeg(Image.new("RGB", (8, 8)))),
                      ("notes.txt", b"x"), ("curated/ocr/images/a.pdf-1-0.png", b"png")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    inputs = curate._ocr_inputs(RunContext.build(spec, options={"kind": "ocr"}))
    assert [(i["id"], i["kind"]) for i in inputs["items"]] == [("a.pdf", "pdf"), ("scans/p.png", "image")]
    assert inputs["other_files"] == 1
    empty = parse_spec({"storage": {"uri": str(tmp_path), "endpoint_url": None}, "curate": {"ocr": {"input": "none"}}})
    with pytest.raises(UserError, match="nothing under"):
        curate._ocr_inputs(RunContext.build(empty, options={"kind": "ocr"}))


def test_som_inputs_quarantine_bad_image_entries_and_refuse_a_missing_file(tmp_path):
    from cluster.run_context import RunContext

    coco = {**COCO, "images": COCO["images"][:1] + [{"id": 8, "file_name": "../../etc/x.jpg", "width": 4, "height": 4},
                                                    {"id": 9, "file_name": "y.jpg"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    spec = parse_spec({"storage": {"uri": str(tmp_path), "endpoint_url": None},
                       "curate": {"som": {"annotations": "coco.json", "images": "img"}}})
    inputs = curate._som_inputs(RunContext.build(spec, options={"kind": "som"}))
    assert [i["id"] for i in inputs["items"]] == ["som:1"] and len(inputs["items"][0]["annotations"]) == 2
    assert {q["id"]: q["reason"] for q in inputs["quarantined"]} == {"som:8": "outside_root", "som:9": "bad_annotation"}
    missing = parse_spec({"storage": {"uri": str(tmp_path), "endpoint_url": None},
                          "curate": {"som": {"annotations": "nope.json", "images": "img"}}})
    with pytest.raises(UserError, match="curate.som.annotations: .*nope.json does not exist"):
        curate._som_inputs(RunContext.build(missing, options={"kind": "som"}))
