"""The eval stage end to end with a scripted answer engine (pure logic: no Ray, no vLLM).

Hand-computed scores:
- MMBench CircularEval (VLMEvalKit ``multiple_choice.mcq_circular_eval``: a question counts only
  if every rotation of its options is answered right): 4 questions of 4 options; the engine
  knows questions 0 and 1, always says "A" to question 2 (right in its first rotation only) and
  always picks a wrong option for question 3 -> 2 / 4 = 50.0.
- VQA accuracy (GT-Vision-Lab/VQA ``vqaEval.py``: mean over the 10 leave-one-out subsets of
  min(#matching humans / 3, 1)): 10 x "red" answered "red" -> 1; 2 x "blue" + 8 x "navy" answered
  "blue" -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; answered "green" where nobody said it -> 0;
  overall (1 + 0.6 + 0) / 3 = 53.33.
"""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from actors.eval.benchmark_file import tsv_text
from actors.eval.endpoint_engine import Answer
from cluster.run_context import RunContext
from cluster.spec import parse_spec
from models.errors import UserError
from pipelines.stages import eval as eval_stage

OPTIONS = ["cat", "dog", "bird", "fish"]
RIGHT = {"Q0": "cat", "Q1": "bird", "Q2": "dog", "Q3": "fish"}  # the right option's text


def _b64_png(colour=(200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mcq_tsv() -> str:
    rows = []
    for i in range(4):
        opts = OPTIONS[i:] + OPTIONS[:i]
        answer = "ABCD"[opts.index(RIGHT[f"Q{i}"])]
        rows.append({"index": i, "image": _b64_png(), "question": f"Q{i}: which animal?", "hint": None,
                     "A": opts[0], "B": opts[1], "C": opts[2], "D": opts[3], "answer": answer,
                     "category": "animals" if i < 2 else "other", "l2-category": "x", "split": "dev"})
    return tsv_text(rows)


def _vqa_tsv() -> str:
    answers = [["red"] * 10, ["blue"] * 2 + ["navy"] * 8, ["yellow"] * 10]
    return tsv_text([{"index": i, "image": _b64_png(), "question": f"V{i}: what colour?", "answer": a}
                     for i, a in enumerate(answers)]) + "7\t\t\t\n"  # a malformed row: no question, no answer


def _text(req) -> str:
    return "".join(p.get("text", "") for m in req.messages if isinstance(m["content"], list) for p in m["content"])


class ScriptedEngine:
    """Answers as the module docstring says; records what it was asked."""

    def __init__(self):
        self.asked: list = []

    def answer(self, requests):
        self.asked.extend(requests)
        out = []
        for r in requests:
            text = _text(r)
            q = re.search(r"(Q\d|V\d):", text).group(1)
            if q.startswith("V"):
                out.append(Answer(r.id, {"V0": "red", "V1": "blue", "V2": "green"}[q]))
                continue
            letters = dict(re.findall(r"\n([A-D])\. (\w+)", text))
            right = next(k for k, v in letters.items() if v == RIGHT[q])
            pick = {"Q0": right, "Q1": right, "Q2": "A", "Q3": "B" if right != "B" else "C"}[q]
            out.append(Answer(r.id, pick))
        return out


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "mmb.tsv").write_text(_mcq_tsv())
    (tmp_path / "bench" / "vqa.tsv").write_text(_vqa_tsv())
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"format": "sphinx-x", "flavour": {"name": "debug"}}))
    engine = ScriptedEngine()
    monkeypatch.setattr(eval_stage, "_engine", lambda ctx, identity: engine)
    data = {"name": "evaltest", "storage": {"uri": str(tmp_path / "store"), "endpoint_url": None},
            "eval": {"model": str(model), "benchmarks": [
                {"name": "mmb", "path": str(tmp_path / "bench" / "mmb.tsv"), "format": "vlmevalkit_tsv",
                 "circular": True},
                {"name": "textvqa", "path": str(tmp_path / "bench" / "vqa.tsv"), "format": "vqa_tsv"}]}}
    return {"data": data, "engine": engine, "model": model, "tmp": tmp_path}


def test_scores_equal_the_hand_computed_values_and_outputs_are_written(setup):
    spec = parse_spec(setup["data"])
    ctx = RunContext.build(spec)
    assert not eval_stage.STAGE.is_complete(ctx)
    summary = eval_stage.STAGE.run(ctx)
    assert summary["scores"]["mmb"] == pytest.approx(50.0)
    assert summary["scores"]["textvqa"] == pytest.approx(100 * 1.6 / 3, abs=0.01)
    assert summary["bad_rows"] == {"textvqa": 1}
    assert len(setup["engine"].asked) == 4 * 4 + 3  # every rotation asked once, 3 VQA questions
    lay = ctx.layout
    rows = [json.loads(x) for x in open(lay.eval_predictions("mmb"))]
    assert len(rows) == 16 and {"raw", "extracted", "right"} <= set(rows[0])
    record = json.loads(open(lay.eval_scores("mmb")).read())
    assert record["scores"]["metric"] == "mcq_circular" and record["model"]["uri"] == str(setup["model"])
    assert "categories" in record["scores"]
    vqa = json.loads(open(lay.eval_scores("textvqa")).read())
    assert vqa["bad_rows"] == 1 and vqa["bad_row_examples"][0]["index"] == "7"
    table = open(lay.eval_summary_txt).read()
    assert "mmb" in table and "50.00" in table and "53.33" in table
    assert open(lay.eval_summary_png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    config = json.loads((setup["model"] / "config.json").read_text())
    assert config["sphinx_x"]["scores"]["mmb"] == pytest.approx(50.0)
    # complete for the same model (our own scores in config.json do not change it) ...
    assert eval_stage.STAGE.is_complete(RunContext.build(spec))
    # ... and not for another model
    (setup["model"] / "config.json").write_text(json.dumps({"format": "sphinx-x", "flavour": {"name": "other"}}))
    assert not eval_stage.STAGE.is_complete(RunContext.build(spec))


def test_a_missed_gate_stops_run_before_serve_naming_benchmark_score_and_threshold(setup, monkeypatch):
    from pipelines import run
    from pipelines.stages import serve

    served = []
    monkeypatch.setattr(serve.STAGE, "run", lambda ctx: served.append(1) or {})
    monkeypatch.setattr(serve.STAGE, "is_complete", lambda ctx: False)
    data = setup["data"]
    data["eval"]["gate"] = {"mmb": 60, "textvqa": 10}
    spec = parse_spec(data)
    with pytest.raises(UserError, match=r"mmb scored 50\.00 < 60") as err:
        run.run_local(spec, ["eval", "serve"])
    assert "textvqa" not in str(err.value)
    assert served == []
    # a complete eval still gates the run
    with pytest.raises(UserError, match="mmb scored 50.00 < 60"):
        run.run_local(spec, ["eval", "serve"])
    data["eval"]["gate"] = {"mmb": 50}
    run.run_local(parse_spec(data), ["eval", "serve"])
    assert served == [1]


def test_one_off_verb_without_a_spec(setup, capsys):
    from pipelines.cli import main

    out = setup["tmp"] / "oneoff"
    assert main(["eval", "--data", str(setup["tmp"] / "bench" / "vqa.tsv"), "--model", str(setup["model"]),
                 "-o", str(out)]) == 0
    record = json.loads((out / "vqa" / "scores.json").read_text())
    assert record["scores"]["metric"] == "vqa" and record["score"] == pytest.approx(53.33, abs=0.01)
    assert "53.33" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--data"])
    assert main(["eval", "--data", "x.tsv"]) == 1  # no model, no -o: a one-line error


def test_spec_section_is_checked():
    from cluster.spec import SpecError

    with pytest.raises(SpecError, match="gate"):
        parse_spec({"eval": {"benchmarks": [], "gate": {"mmb": 50}}})
    with pytest.raises(SpecError, match="format"):
        parse_spec({"eval": {"benchmarks": [{"name": "a", "path": "a.tsv", "format": "csv"}]}})
    assert not eval_stage.STAGE.used(parse_spec({}))
    assert eval_stage.STAGE.demand(parse_spec({})).work == ()


def test_grounding_is_scored_in_the_models_own_frame_unless_the_benchmark_names_one(tmp_path, monkeypatch):
    """A 200 x 100 image, gt box [50, 0, 150, 100] px. A top-left-padded model (the paper flavours,
    config.json pad "top_left") sees it at [0.25, 0, 0.75, 0.5] of its square; the released
    models' centred pad at [0.25, 0.25, 0.75, 0.75] (actors/eval/grounding.py's worked example).
    The engine answers the top-left box: right in the model's own frame, wrong (IoU 1/3) when the
    benchmark says ``box_frame: center``."""
    buf = io.BytesIO()
    Image.new("RGB", (200, 100), (9, 9, 9)).save(buf, "PNG")
    (tmp_path / "where.tsv").write_text(tsv_text([{
        "index": 0, "image": base64.b64encode(buf.getvalue()).decode(), "question": "Where is the box?",
        "answer": "[50, 0, 150, 100]", "width": 200, "height": 100}]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"format": "sphinx-x", "flavour": {"name": "debug",
                                                                                     "pad": "top_left"}}))

    class Engine:
        def answer(self, requests):
            return [Answer(r.id, "[0.25,0.00,0.75,0.50]") for r in requests]

    monkeypatch.setattr(eval_stage, "_engine", lambda ctx, identity: Engine())

    def scored(**extra):
        data = {"name": "evaltest", "storage": {"uri": str(tmp_path / f"store{len(extra)}"), "endpoint_url": None},
                "eval": {"model": str(model), "benchmarks": [
                    {"name": "where", "path": str(tmp_path / "where.tsv"), "format": "vqa_tsv",
                     "metric": "grounding", **extra}]}}
        return eval_stage.STAGE.run(RunContext.build(parse_spec(data)))["scores"]["where"]

    assert scored() == pytest.approx(100.0)
    assert scored(box_frame="center") == pytest.approx(0.0)
    with pytest.raises(Exception, match="box_frame"):
        parse_spec({"eval": {"benchmarks": [{"name": "a", "path": "a.tsv", "format": "vqa_tsv", "box_frame": "left"}]}})
