"""A shortened `sphinx-x demo` end to end: data in S3 -> shards -> DeepSpeed on Ray Train ->
export -> Serve -> held-out questions through the HTTP endpoint with the openai client.

The demo runs as a user runs it (`sphinx-x demo --keep-serving`, its own Ray and S3). The pieces
must connect (shards and manifest, the export served, the endpoint answering every question and
serving the web page, report.json with its fields and PNGs, the per-type figures from the eval
harness), the model trained inside the test must beat the majority-class baseline on at least
one question type, >= 99 % of the served greedy answers must be the PyTorch model's token for
token (pipelines.demo.parity, issue #14), and Ctrl-C then stops it leaving no process (#28).
The small pure functions of the demo are tested on their own at the bottom.
"""

from __future__ import annotations

import base64
import json
import re
import signal
from dataclasses import replace

import pytest

from pipelines.demo import benchmark, demo, synthetic

# 200 steps: in a bare loop this data reaches colour 0.61 vs a 0.19 majority baseline
N_TRAIN, N_HELDOUT, STEPS = 240, 30, 200


@pytest.mark.slow
def test_demo_end_to_end_then_ctrl_c_while_it_keeps_serving(tmp_path):
    """`sphinx-x demo --keep-serving` as a user runs it (tests/cli_command.py: its own Ray and S3),
    checked from its report while it serves, then stopped with Ctrl-C: no process may remain."""
    import urllib.request

    import psutil
    import ray

    from cli_command import STOP_WITHIN_S, Command

    if ray.is_initialized():  # the demo starts its own Ray: the session's gives its CPUs back
        ray.shutdown()
    run_dir = tmp_path / "run"
    cmd = Command(["demo", "--quick", "--samples", str(N_TRAIN), str(N_HELDOUT), "--steps", str(STEPS),
                   "--keep-serving", "--run-dir", str(run_dir)], tmp_path)
    try:
        cmd.wait_for("Ctrl-C stops", timeout_s=900)
        terminal = "\n".join(cmd.lines)
        report = json.loads((run_dir / "report.json").read_text())
        # the files of the run directory
        for name in ("loss.png", "tiling.png"):
            assert (run_dir / name).read_bytes()[:4] == b"\x89PNG" and (run_dir / name).stat().st_size > 1000
        assert (run_dir / "spec.yaml").exists()
        # every generated sample is written: the demo's source turns dedup off (its text-only chats
        # repeat word for word on purpose), so the repeats are written and counted as none
        data = report["data"]
        assert data["duplicate_samples"] == 0 and data["rows_written"] == N_TRAIN and data["shard_files"] > 0
        t = report["training"]
        assert t["steps"] == STEPS and t["tokens_per_s"] > 0 and t["final_loss"] < t["first_loss"]
        assert t["export"], "no export"
        # skip tokens: panoramas and tall images skip tiles
        assert report["skip_tokens"]["saved_tokens"] > 0 and report["tiling_example"]["skipped"]
        # the endpoint answered every held-out question and serves the page (the address is shown)
        serving = report["serving"]
        heldout = synthetic.generate(N_TRAIN, N_HELDOUT, 0, regions=True).heldout_rows()
        assert serving["requests"] == len(heldout)
        assert serving["errors"] == 0, report["errors"]
        assert serving["latency_s"]["p50"] > 0 and serving["latency_s"]["p99"] >= serving["latency_s"]["p50"]
        # answers.jsonl: every request's latency, slowest first, the report's three slowest on top
        timing = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
        assert len(timing) == len(heldout) and timing[:3] == serving["slowest"]
        assert [t["latency_s"] for t in timing] == sorted((t["latency_s"] for t in timing), reverse=True)
        assert all(t["attempts"] >= 1 and t["completion_tokens"] >= 1 for t in timing)
        assert "slowest: " in terminal
        assert f"web page    {serving['web_page']}" in terminal
        with urllib.request.urlopen(serving["web_page"], timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read(2000).lower()
        # per type: accuracy next to the baseline, and the model learned something
        q = report["questions"]
        assert set(q) == {*synthetic.QUESTION_TYPES, synthetic.REGION_TYPE} == {r["type"] for r in heldout}
        # the grounding type's baseline is one fixed box (the mean training box), shown in the majority's place
        assert len(q["where"]["majority_answer"]) == 4 and re.search(r"\n  where +\d\.\d\d +0\.\d\d", terminal)
        for v in q.values():
            assert 0 <= v["accuracy"] <= 1 and 0 <= v["baseline"] <= 1 and v["total"] > 0
        assert any(v["accuracy"] > v["baseline"] for v in q.values()), terminal[-3000:]
        # the figures are the eval harness's (issue #23): per category = per type, right / asked
        ev = report["eval"]
        assert ev["metric"] == "first_word" and ev["output"].endswith("/eval")
        for qtype, v in q.items():
            assert v["accuracy"] == pytest.approx(ev["categories"][qtype] / 100) == pytest.approx(v["correct"] / v["total"])
        # parity (issue #14): the served greedy answers are the PyTorch model's, token for token
        parity = report["parity"]
        assert parity["total"] == serving["requests"]
        assert parity["share"] >= 0.99, json.dumps(parity["differences"], indent=1)
    except BaseException:
        Command.kill_all(cmd.descendants() + [psutil.Process(cmd.proc.pid)])
        raise
    took, left = cmd.interrupt(signal.SIGINT)
    assert took < STOP_WITHIN_S and not left, f"left running after Ctrl-C: {left}"
    assert not [line for line in cmd.lines if "graceful_shutdown" in line]  # Ray's shutdown noise: the log's


# ----------------------------------------------------------------------------- pieces


def test_spec_is_the_local_example_with_the_demo_budget():
    spec = demo.build_spec(demo.FULL, run_id="r1", port=8765)
    assert spec.storage.uri == "s3://sphinx-x/demo/r1" and spec.storage.endpoint_url == "embedded"
    (src,) = spec.data.sources
    assert src.path == "s3://sphinx-x/demo/r1/demo-data/train.jsonl"
    assert spec.train.workers == 2 and spec.train.zero_stage == 2 and spec.train.steps == demo.FULL.steps
    assert spec.train.lr == demo.FULL.lr  # random init: not the paper's fine-tuning 2e-5
    (m,) = spec.serve.models
    assert m.checkpoint == "@train" and spec.serve.http.port == 8765
    # the held-out questions are asked by the eval harness through the served endpoint
    b, where = spec.eval.benchmarks
    assert b.path == "s3://sphinx-x/demo/r1/demo-data/heldout.tsv" and b.metric == "first_word" and b.text_only
    # the grounding questions: Acc@IoU >= 0.5 in the debug flavour's own (top-left padded) frame
    assert where.path == "s3://sphinx-x/demo/r1/demo-data/heldout-where.tsv" and where.metric == "grounding"
    assert where.box_frame == "topleft" and where.max_tokens == benchmark.WHERE_MAX_TOKENS
    assert spec.eval.endpoint.url == "http://127.0.0.1:8765/v1" and spec.eval.endpoint.model == m.name
    assert spec.eval.endpoint.logprobs and spec.eval.endpoint.concurrency == demo.FULL.eval_threads


def test_heldout_questions_are_a_vlmevalkit_tsv_the_harness_reads():
    from actors.eval.benchmark_file import read_benchmark
    from actors.eval.prompts import build_messages
    from models.conversation import IMAGE

    ds = synthetic.generate(20, 12, seed=3, regions=True)
    all_rows = ds.heldout_rows()
    rows = [r for r in all_rows if r["type"] != synthetic.REGION_TYPE]
    images = {s.image_path: s.image for s in ds.heldout if s.image is not None}
    tsvs = benchmark.heldout_tsvs(all_rows, images)
    data = tsvs[benchmark.BENCHMARK]
    parsed = read_benchmark("held.tsv", "tsv", reader=lambda _: data, text_only=True)
    assert not parsed.bad_rows and [q.id for q in parsed.questions] == [r["id"] for r in rows]
    with pytest.raises(Exception, match="no usable question|no image"):  # the field's rule without text_only
        bad = benchmark.heldout_tsvs([r for r in rows if "image" not in r], images)[benchmark.BENCHMARK]
        read_benchmark("held.tsv", "tsv", reader=lambda _: bad)
    # the grounding questions: their own file, the pixel box and the image's size
    where = [r for r in all_rows if r["type"] == synthetic.REGION_TYPE]
    assert where and set(tsvs) == {benchmark.BENCHMARK, benchmark.WHERE_BENCHMARK}
    parsed_where = read_benchmark("where.tsv", "tsv", reader=lambda _: tsvs[benchmark.WHERE_BENCHMARK])
    for q, r in zip(parsed_where.questions, where):
        s = next(s for s in ds.heldout if s.image_path == r["image"])
        assert q.id == r["id"] and q.images == (s.image,) and json.loads(r["answer"]) == s.boxes[0][1:]
        assert (q.extra["width"], q.extra["height"]) == tuple(str(v) for v in s.size)
    for q, r in zip(parsed.questions, rows):
        assert q.category == r["type"] and q.answers == (r["answer"],)
        assert q.images == ((images[r["image"]],) if "image" in r else ())
        # the plain prompt puts the image first and "\n" + text: the training turn, token for token
        (msg,) = build_messages(q, "plain")
        text = msg["content"][-1]["text"]
        assert (IMAGE + text if q.images else text) == r["conversations"][0]["value"]
    # a sample's later questions refer to its first row (VLMEvalKit's space saver), so each image is stored once
    assert data.count(base64.b64encode(next(iter(images.values()))).decode().encode()) == 1


def test_evaluation_reads_the_harness_outputs():
    predictions = [
        {"id": "a-colour", "raw": "red\n", "right": True, "category": "colour", "error": None, "latency_s": 0.1,
         "finish_reason": "stop", "prompt_tokens": 40, "tokens": ["red", "\n"]},
        {"id": "a-shape", "raw": "", "right": False, "category": "shape", "error": "HTTP 503: busy"},
        {"id": "b-shape", "raw": "circle", "right": True, "category": "shape", "error": None,
         "finish_reason": "length", "prompt_tokens": 41, "tokens": ["circle"]},
    ]
    predictions[2]["latency_s"] = 0.3
    scores = {"score": 66.7, "metric": "first_word", "latency_s": {"p50": 0.1, "p99": 0.3, "mean": 0.2},
              "scores": {"categories": {"colour": 100.0, "shape": 50.0}}}
    where = [{"id": "c-where", "raw": "[0.1,0.1,0.5,0.5]", "right": False, "category": "where", "error": None,
              "latency_s": 0.5}]
    where_scores = {"score": 0.0, "metric": "grounding", "scores": {"categories": {"where": 0.0}}}
    questions = {p["id"]: (f"q {p['id']}", "x") for p in predictions + where}
    ev = benchmark.evaluation([(scores, predictions)], questions, wall_s=2.0)
    assert ev["types"] == {"colour": {"correct": 1, "total": 1, "accuracy": 1.0},
                           "shape": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert ev["errors"] == [{"id": "a-shape", "error": "HTTP 503: busy"}] and ev["requests"] == 3
    assert ev["answers"]["a-colour"] == {"text": "red\n", "finish_reason": "stop", "prompt_tokens": 40,
                                         "tokens": ["red", "\n"]}
    assert set(ev["answers"]) == {"a-colour", "b-shape"} and ev["requests_per_s"] == 1.5
    assert ev["latency_s"] == {"p50": 0.1, "p99": 0.3, "mean": pytest.approx(0.2)}  # the answered ones
    both = benchmark.evaluation([(scores, predictions), (where_scores, where)], questions, wall_s=2.0)
    assert both["types"]["where"] == {"correct": 0, "total": 1, "accuracy": 0.0} and both["requests"] == 4
    assert both["latency_s"]["p99"] == 0.5 and both["score"] == 66.7  # latencies of both; the first's score
    # every request's timing, slowest first (the demo's answers.jsonl), the failed one included
    assert [(t["id"], t["latency_s"]) for t in both["timing"]] == [("c-where", 0.5), ("b-shape", 0.3),
                                                                   ("a-colour", 0.1), ("a-shape", None)]
    assert both["timing"][3]["error"] == "HTTP 503: busy" and both["timing"][1]["finish_reason"] == "length"
    assert [s["id"] for s in ev["samples"]] == ["a-colour", "b-shape"]


def test_training_figures():
    history = [{"step": i + 1, "loss": 5.0 - i, "tokens": 100, "saved_tokens": 7, "step_time_s": 2.0 if i else 9.0}
               for i in range(4)]
    f = demo.training_figures(history)
    assert f["tokens_per_s"] == 50.0 and f["train_saved_tokens"] == 28 and f["first_loss"] == 5.0


def test_bad_steps_is_a_user_error():
    import argparse

    from models.errors import UserError

    with pytest.raises(UserError, match="--steps"):
        demo.command(argparse.Namespace(quick=True, steps=0, run_dir=None, keep_serving=False))
    with pytest.raises(UserError, match="--samples needs at least 16"):
        demo.command(argparse.Namespace(quick=True, steps=None, samples=[4, 2], run_dir=None, keep_serving=False))
    with pytest.raises(UserError, match="--seed must be >= 0"):
        demo.command(argparse.Namespace(quick=True, steps=None, samples=None, seed=-1, run_dir=None,
                                        keep_serving=False))
    # the seed reaches the data, the batch order and the initial weights (the train section's seed)
    assert demo.build_spec(replace(demo.FULL, seed=3), run_id="r", port=1).train.seed == 3
