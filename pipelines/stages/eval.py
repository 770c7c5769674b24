"""`sphinx-x eval SPEC`: the spec's benchmarks scored as the field scores them (docs/interfaces.md "Eval").

    >>> summary = run_stage(load_spec("cluster/examples/local.yaml"))
    >>> summary["scores"]                      # {"mmbench": 71.2, "textvqa": 54.0}

Each ``eval.benchmarks[]`` file (VLMEvalKit TSV, VQA-style TSV or LLaVA / lmms-eval JSONL; local
or ``s3://``, never downloaded from a hub) is read by ``actors.eval.benchmark_file``, phrased by
``actors.eval.prompts`` and answered by ONE engine for all benchmarks:

- ``eval.model`` (``@train``: this run's train export; or a model directory) -> the batch engine
  (``actors.eval.batch_engine``: Ray Data over ``eval.actors`` vLLM actors, GPU ones when
  ``eval.num_gpus_per_actor`` > 0; finished blocks kept under ``<eval.output>/_answers/<model key>``
  and reused by a rerun);
- ``eval.endpoint`` -> any OpenAI-compatible URL (``actors.eval.endpoint_engine``).

``actors.eval.scoring`` turns the answers into per-sample rows and a scores dict. Outputs, as
``cluster.layout`` names them::

    <eval.output>/<benchmark>/predictions.jsonl   one row per sample (raw answer, extracted, right)
    <eval.output>/<benchmark>/scores.json         scores, the model they belong to; written last
    <eval.output>/summary.txt, summary.png        one table across benchmarks

Complete when every benchmark's scores.json is there for the same model. The gate
(``eval.gate``: {benchmark: min score}) raises :class:`models.errors.UserError` naming the
benchmark, its score and the threshold, so `sphinx-x run` stops before serve (checked on a
skipped, complete stage too). A local model directory's ``config.json`` gets the latest scores
under ``sphinx_x.scores`` (``eval.write_scores_to_model``).

The one-off form writes under ``-o OUT`` without a spec::

    sphinx-x eval --data mmbench.tsv --model out/export --circular -o runs/mmb
    sphinx-x eval --data textvqa.tsv --endpoint http://host:8000/v1 --model sphinx-x-tiny -o runs/tvqa
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cluster.capacity import Demand, Work
from cluster.layout import TRAIN_EXPORT, Layout
from cluster.placement import placement
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec, EvalBenchmark
from models.errors import UserError
from actors.eval.prompts import STYLE_FOR_METRIC, STYLES, build_messages
from pipelines.stage import StageBase

log = logging.getLogger(__name__)

SCORES_VERSION = 1


# ----------------------------------------------------------------------------- the harness

FILE_FORMAT = {"vlmevalkit_tsv": "tsv", "vqa_tsv": "tsv", "jsonl": "jsonl"}
DEFAULT_METRIC = {"vlmevalkit_tsv": "mcq", "vqa_tsv": "vqa", "jsonl": "vqa"}


@dataclass(frozen=True)
class Loaded:
    """One benchmark ready to answer: its questions (rotations included with ``circular``), one
    request per question (``id`` = ``<benchmark>/<question id>``) and the file's malformed rows."""

    benchmark: EvalBenchmark
    metric: str
    questions: tuple
    requests: tuple
    bad_rows: list  # [{"row", "index", "reason"}]


def guess_format(path: str) -> str:
    """``jsonl`` by extension; a TSV is ``vlmevalkit_tsv`` when its header has option column ``A``."""
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if "://" in path:
        return "vlmevalkit_tsv"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    return "vlmevalkit_tsv" if "A" in header else "vqa_tsv"


def metric_of(b: EvalBenchmark) -> str:
    """``actors.eval.scoring.METRICS``; ``circular`` makes multiple choice ``mcq_circular``."""
    from actors.eval.scoring import METRICS

    metric = b.metric or DEFAULT_METRIC[b.format]
    if b.circular and metric == "mcq":
        metric = "mcq_circular"
    if metric not in METRICS:
        raise UserError(f"eval benchmark {b.name!r}: metric {metric!r} is not one of {', '.join(METRICS)}")
    return metric


def load(b: EvalBenchmark, uri: str, storage: Any, *, image_root: Optional[str] = None) -> Loaded:
    """Read ``b``'s file through ``storage`` and phrase every question (``actors.eval.prompts``)."""
    from actors.eval.benchmark_file import load_images, read_benchmark
    from actors.eval.choice import expand_circular
    from actors.eval.endpoint_engine import AnswerRequest

    metric = metric_of(b)
    style = b.prompt or STYLE_FOR_METRIC[metric]
    if style not in STYLES:
        raise UserError(f"eval benchmark {b.name!r}: prompt {style!r} is not one of {STYLES}")
    parsed = read_benchmark(uri, FILE_FORMAT[b.format], reader=storage.read_bytes, image_root=image_root,
                            text_only=b.text_only)
    # a VLMEvalKit circular file already holds the rotations (their group is another row's index)
    rotated = any(q.group != q.id for q in parsed.questions)
    questions = expand_circular(parsed.questions) if b.circular and not rotated else list(parsed.questions)
    requests = tuple(AnswerRequest(id=f"{b.name}/{q.id}", messages=build_messages(q, style),
                                   images=load_images(q, storage.read_bytes), max_tokens=b.max_tokens)
                     for q in questions)
    bad = [{"row": r.row, "index": r.index, "reason": r.reason} for r in parsed.bad_rows]
    return Loaded(b, metric, tuple(questions), requests, bad)


def score(one: Loaded, answers: dict, *, frame: str = "center") -> tuple[list[dict], dict]:
    """(per-sample rows, scores) of one benchmark's answers (``actors.eval.scoring``); ``frame``: the
    box frame of a grounding benchmark without its own ``box_frame``."""
    from actors.eval.scoring import score_benchmark

    got = {q.id: answers[f"{one.benchmark.name}/{q.id}"] for q in one.questions}
    try:
        result = score_benchmark(one.metric, [(q, got[q.id].text) for q in one.questions],
                                 grounding_frame=one.benchmark.box_frame or frame)
    except ValueError as err:
        raise UserError(f"eval benchmark {one.benchmark.name!r}: {err}") from None
    rows = [{**r.to_dict(), "error": got[r.id].error, **got[r.id].extras()} for r in result.rows]
    return rows, result.scores


def answer_timing(answers: list) -> Optional[dict]:
    """Latency percentiles (nearest rank, s) of the answered requests, when the engine timed them
    (the endpoint engine): ``{"p50", "p99", "mean", "answered"}``; None otherwise."""
    import math

    times = sorted(a.latency_s for a in answers if a.latency_s is not None and not a.error)
    if not times:
        return None
    rank = lambda q: times[max(0, math.ceil(q / 100 * len(times)) - 1)]  # noqa: E731
    return {"p50": rank(50), "p99": rank(99), "mean": sum(times) / len(times), "answered": len(times)}


def main_score(scores: dict) -> float:
    return float(scores["overall"])


def summary_table(results: dict[str, dict]) -> str:
    from actors.eval import scoring

    return scoring.summary_table({n: r["scores"] for n, r in results.items()})


# ----------------------------------------------------------------------------- the model


def model_identity(ctx: RunContext) -> dict[str, str]:
    """What answered: ``{"kind": "model_dir" | "endpoint", "uri", "key"}``; ``key`` changes when
    the model does (the directory's config.json, which export and convert rewrite)."""
    ev = ctx.spec.eval
    if ev.endpoint is not None:
        uri = f"{ev.endpoint.url}#{ev.endpoint.model}"
        return {"kind": "endpoint", "uri": uri, "key": hashlib.sha256(uri.encode()).hexdigest()[:16]}
    uri = ctx.layout.checkpoint(ev.model)
    config = f"{uri.rstrip('/')}/config.json"
    if not ctx.storage.exists(config):
        hint = " (run `sphinx-x train SPEC` first)" if ev.model == TRAIN_EXPORT else ""
        raise UserError(f"eval.model: no model directory at {uri} (no config.json){hint}")
    blob = json.loads(ctx.storage.read_bytes(config))
    blob.pop("sphinx_x", None)  # our own scores never change the model
    digest = hashlib.sha256((uri + json.dumps(blob, sort_keys=True)).encode()).hexdigest()[:16]
    return {"kind": "model_dir", "uri": uri, "key": digest}


def model_box_frame(ctx: RunContext, identity: dict[str, str]) -> str:
    """The square the evaluated model's boxes are fractions of (``actors.eval.grounding.FRAMES``):
    a model directory's flavour pad (``top_left`` -> ``topleft``, ``centre`` -> ``center``); for an
    endpoint, whose model is not known here, the released models' ``center``."""
    from actors.eval.grounding import frame_of_pad

    if identity["kind"] != "model_dir":
        return "center"
    flavour = json.loads(ctx.storage.read_bytes(f"{identity['uri'].rstrip('/')}/config.json"))["flavour"]
    return frame_of_pad(flavour.get("pad", "top_left"))


def _engine(ctx: RunContext, identity: dict[str, str]):
    ev = ctx.spec.eval
    if ev.endpoint is not None:
        from actors.eval.endpoint_engine import EndpointEngine, EndpointOptions

        e = ev.endpoint
        return EndpointEngine(EndpointOptions(url=e.url, model=e.model, api_key_env=e.api_key_env,
                                              concurrency=e.concurrency, logprobs=e.logprobs))
    from actors.eval.batch_engine import BatchEngine, BatchOptions
    from actors.serve.model_loader import MemberWeights
    from actors.serve.vllm.engine import EngineOptions
    from cluster.connect import connect

    connect(ctx.spec)
    gpus = ev.num_gpus_per_actor
    device = "cuda" if gpus > 0 else "cpu"
    dtype = ev.dtype if ev.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    engine = EngineOptions(device=device, dtype=dtype, max_model_len=ev.max_model_len, max_num_seqs=ev.max_num_seqs,
                           tensor_parallel_size=1, gpu_memory_utilization=0.9, cpu_kv_cache_gb=ev.cpu_kv_cache_gb,
                           enforce_eager=device == "cpu", threads=max(1, int(ev.num_cpus_per_actor)))
    weights = MemberWeights(name="eval", checkpoint_uri=identity["uri"], require_success=ev.model == TRAIN_EXPORT)
    options = BatchOptions(engine=engine, actors=ev.actors, num_cpus=ev.num_cpus_per_actor, num_gpus=gpus,
                           block_size=ev.block_size, batch_size=ev.block_size,
                           max_image_pixels=ctx.spec.serve.max_image_pixels)
    cache = f"{ctx.layout.eval_answers}/{identity['key']}"
    return BatchEngine(weights, ctx.spec.storage, options, cache_uri=cache)


# ----------------------------------------------------------------------------- outputs


def read_scores(ctx: RunContext, name: str) -> Optional[dict]:
    uri = ctx.layout.eval_scores(name)
    if not ctx.storage.exists(uri):
        return None
    return json.loads(ctx.storage.read_bytes(uri))


def check_gate(spec: ClusterSpec, scores: dict[str, float]) -> None:
    """UserError naming every benchmark whose score is under its ``eval.gate`` threshold."""
    missed = [f"{name} scored {scores[name]:.2f} < {minimum:g}" for name, minimum in spec.eval.gate.items()
              if name in scores and scores[name] < minimum]
    if missed:
        raise UserError("eval gate missed: " + "; ".join(missed) + " (eval.gate): not serving this model")


def _write_jsonl(ctx: RunContext, uri: str, rows: list[dict]) -> None:
    ctx.storage.write_bytes(uri, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())


def _summary_png(path: Path, scores: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.2))
    bars = ax.bar(names, [scores[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylim(0, 105)
    ax.set_ylabel("score")
    ax.set_title("eval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_summary(ctx: RunContext, results: dict[str, dict]) -> None:
    import tempfile

    ctx.storage.write_bytes(ctx.layout.eval_summary_txt, summary_table(results).encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "summary.png"
        _summary_png(png, {n: r["score"] for n, r in results.items()})
        ctx.storage.write_bytes(ctx.layout.eval_summary_png, png.read_bytes())


def _write_model_scores(ctx: RunContext, identity: dict[str, str], results: dict[str, dict]) -> None:
    """``sphinx_x.scores`` in a LOCAL model directory's config.json (an s3:// one is left alone)."""
    uri = identity["uri"]
    if identity["kind"] != "model_dir" or "://" in uri or not ctx.spec.eval.write_scores_to_model:
        return
    path = Path(uri) / "config.json"
    try:
        config = json.loads(path.read_text())
        config.setdefault("sphinx_x", {})["scores"] = {n: r["score"] for n, r in results.items()}
        tmp = path.with_name(f".config.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(path)
    except OSError as err:  # a read-only model directory: the scores are in the eval output anyway
        log.warning("could not write the scores into %s: %s", path, err)


# ----------------------------------------------------------------------------- the stage


def evaluate(ctx: RunContext) -> dict[str, Any]:
    ev = ctx.spec.eval
    if not ev.benchmarks:
        return {"skipped": "no eval.benchmarks", "scores": {}}
    for b in ev.benchmarks:  # before any engine starts: name the missing file
        if not ctx.storage.exists(ctx.layout.path(b.path)):
            raise UserError(f"eval.benchmarks {b.name!r}: no file at {ctx.layout.path(b.path)}")
    identity = model_identity(ctx)
    loaded = [load(b, ctx.layout.path(b.path), ctx.storage, image_root=_image_root(ctx, b))
              for b in ev.benchmarks]
    requests = [r for one in loaded for r in one.requests]
    log.info("eval: %d prompts over %d benchmarks, model %s", len(requests), len(loaded), identity["uri"])
    t0 = time.perf_counter()
    answers = {a.id: a for a in _engine(ctx, identity).answer(requests)}
    wall_s = time.perf_counter() - t0
    results: dict[str, dict] = {}
    frame = model_box_frame(ctx, identity) if any(one.metric == "grounding" for one in loaded) else "center"
    for one in loaded:
        rows, scores = score(one, answers, frame=frame)
        _write_jsonl(ctx, ctx.layout.eval_predictions(one.benchmark.name), rows)
        record = {"version": SCORES_VERSION, "benchmark": one.benchmark.name, "model": identity,
                  "metric": one.metric, "score": main_score(scores), "scores": scores,
                  "samples": len(one.requests), "errors": sum(1 for r in one.requests if answers[r.id].error),
                  "bad_rows": len(one.bad_rows), "bad_row_examples": one.bad_rows[:20],
                  "latency_s": answer_timing([answers[r.id] for r in one.requests])}
        ctx.storage.write_bytes(ctx.layout.eval_scores(one.benchmark.name), json.dumps(record, indent=2).encode())
        results[one.benchmark.name] = record
        if one.bad_rows:
            log.warning("eval %s: %d malformed rows skipped (first: %s)", one.benchmark.name, len(one.bad_rows),
                        one.bad_rows[0])
    _write_summary(ctx, results)
    _write_model_scores(ctx, identity, results)
    scores = {n: r["score"] for n, r in results.items()}
    summary = {"scores": scores, "output": ctx.layout.evals, "model": identity["uri"],
               "bad_rows": {n: r["bad_rows"] for n, r in results.items() if r["bad_rows"]},
               "table": summary_table(results), "wall_s": round(wall_s, 2),
               "prompts_per_s": round(len(requests) / wall_s, 2) if wall_s else None}
    check_gate(ctx.spec, scores)
    return summary


def _image_root(ctx: RunContext, b: EvalBenchmark) -> Optional[str]:
    return ctx.layout.path(b.image_root) if b.image_root else None


class EvalStage(StageBase):
    """`sphinx-x eval SPEC`, or the one-off `sphinx-x eval --data FILE (--model DIR | --endpoint URL
    --model NAME) -o OUT` (no spec: :meth:`one_off_spec` builds one)."""

    name = "eval"
    help = "score benchmark files (VLMEvalKit / lmms-eval formats) on a model directory or an endpoint"
    spec_optional = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", default=None, metavar="FILE", help="one-off: a benchmark file (.tsv / .jsonl)")
        parser.add_argument("--model", default=None,
                            help="one-off: the model directory (or, with --endpoint, the served model's name)")
        parser.add_argument("--endpoint", default=None, metavar="URL", help="one-off: an OpenAI-compatible URL")
        parser.add_argument("--api-key-env", default=None, help="one-off: the env variable holding the key")
        parser.add_argument("--concurrency", type=int, default=8, help="one-off: requests in flight (endpoint)")
        parser.add_argument("--format", default=None, choices=["vlmevalkit_tsv", "vqa_tsv", "jsonl"],
                            help="one-off: the file's format (default: by extension and columns)")
        parser.add_argument("--metric", default=None, help="one-off: the metric (default: by format)")
        parser.add_argument("--circular", action="store_true", help="one-off: MMBench CircularEval")
        parser.add_argument("--name", default=None, help="one-off: the benchmark's name (default: the file's stem)")
        parser.add_argument("--max-tokens", type=int, default=32, help="one-off: answer length")
        parser.add_argument("-o", "--output", default=None, metavar="OUT", help="one-off: where the scores go")

    def one_off_spec(self, args: argparse.Namespace) -> ClusterSpec:
        """The spec of `sphinx-x eval --data FILE ... -o OUT`: local storage at OUT, one benchmark."""
        from cluster.spec import parse_spec

        if not args.data or not args.output or not args.model:
            raise UserError("sphinx-x eval: give a SPEC, or --data FILE, --model (DIR | NAME with --endpoint) "
                            "and -o OUT")
        data = os.path.abspath(args.data) if "://" not in args.data else args.data
        if "://" not in data and not os.path.isfile(data):
            raise UserError(f"sphinx-x eval: --data {args.data}: no such file")
        fmt = args.format or guess_format(data)
        bench = {"name": args.name or Path(args.data).stem, "path": data, "format": fmt, "metric": args.metric,
                 "circular": bool(args.circular), "max_tokens": args.max_tokens}
        out = os.path.abspath(args.output)
        section: dict[str, Any] = {"benchmarks": [bench], "output": out}
        if args.endpoint:
            section["endpoint"] = {"url": args.endpoint, "model": args.model, "api_key_env": args.api_key_env,
                                   "concurrency": args.concurrency}
        else:
            section["model"] = os.path.abspath(args.model) if "://" not in args.model else args.model
        return parse_spec({"name": "eval", "storage": {"uri": out, "endpoint_url": None}, "eval": section})

    def used(self, spec: ClusterSpec) -> bool:
        """Rendered as a job only when the spec lists benchmarks (``pipelines.stages.plans``)."""
        return bool(spec.eval.benchmarks)

    def demand(self, spec: ClusterSpec) -> Demand:
        ev = spec.eval
        if not ev.benchmarks or ev.endpoint is not None:
            return Demand(self.name)
        per = {"CPU": float(ev.num_cpus_per_actor), **placement(spec, ev.group)}
        if ev.num_gpus_per_actor:
            per["GPU"] = float(ev.num_gpus_per_actor)
        return Demand(self.name, (Work("vLLM eval engines", ev.actors, per, group=ev.group,
                                       uses_gpu=ev.num_gpus_per_actor > 0),))

    def outputs(self, layout: Layout) -> dict[str, str]:
        return {"eval": layout.evals, "summary": layout.eval_summary_txt}

    def is_complete(self, ctx: RunContext) -> bool:
        ev = ctx.spec.eval
        if not ev.benchmarks:
            return True  # nothing to evaluate
        records = [read_scores(ctx, b.name) for b in ev.benchmarks]
        if any(r is None for r in records):
            return False
        try:
            key = model_identity(ctx)["key"]
        except UserError:
            return False
        if any(r.get("model", {}).get("key") != key for r in records):
            return False
        check_gate(ctx.spec, {r["benchmark"]: r["score"] for r in records})  # a skipped eval still gates
        return True

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return evaluate(ctx)

    def report(self, ctx: RunContext, summary: dict[str, Any]) -> None:
        if summary.get("table"):
            print(summary["table"], flush=True)
        print(f"scores: {ctx.layout.evals}", flush=True)


STAGE = EvalStage()


def run_stage(spec: ClusterSpec, *, force: bool = False) -> dict:
    ctx = RunContext.build(spec, force=force)
    if not force and STAGE.is_complete(ctx):
        return {"skipped": "complete", "output": ctx.layout.evals}
    return STAGE.run(ctx)
