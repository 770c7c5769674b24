"""`sphinx-x demo`: the main job, end to end on the embedded default, and it visibly learns.

    sphinx-x demo [--run-dir DIR] [--keep-serving] [--quick] [--steps N] [--samples TRAIN HELDOUT] [--seed N]

1. starts the embedded default: an S3 server on 127.0.0.1 (moto) and a local Ray;
2. draws the synthetic dataset (pipelines.demo.synthetic) into S3: rendered scenes and words in
   a spread of aspect ratios (panoramas, tall images), text-only chat, a held-out split;
3. runs the stages through their ``run_stage``: preprocess (Ray Data: tiles + tokens ->
   Parquet shards) -> train (Ray Train, 2 workers, DeepSpeed ZeRO-2, gloo on CPU) -> export
   -> serve (Ray Serve, OpenAI-compatible, autoscaled);
4. has the eval harness (``pipelines.stages.eval``) ask the endpoint every held-out question,
   written as a VLMEvalKit TSV (pipelines.demo.benchmark), with the official ``openai`` client
   (a few at once); its per-category scores are the report's accuracies per question type,
   next to the majority-class baseline; the grounding questions (``where``: the box of a
   one-shape scene's shape) are a second file, scored by Acc@IoU >= 0.5 next to the IoU of one
   fixed guess, the mean training box;
5. reruns every question greedily on the PyTorch model (``models.sphinx``, fp32, CPU) from the
   served export and counts the answers identical token for token (pipelines.demo.parity);
6. prints the report and writes ``report.json``, ``spec.yaml``, ``loss.png``,
   ``tiling.png`` and ``answers.jsonl`` (every answer's latency, slowest first) into the run
   directory. Without ``--keep-serving`` it then shuts down
   Serve, Ray and the S3 server it started.

The debug model starts from random weights (no weights can be downloaded here), so the demo
trains with lr 3e-3, not the paper's 2e-5 (which fine-tunes pretrained LLMs). Everything
runs on 2 CPU cores in about 14 minutes (BENCHMARKS.md, "sphinx-x demo"); ``--quick`` is the CI-sized version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from actors.data.manifest import Manifest
from actors.eval.grounding import frame_of_pad
from actors.train.summaries import TrainSummary
from cluster.layout import Layout
from cluster.ports import free_port
from cluster.spec import ClusterSpec, dump_spec, example_path, parse_spec
from models.errors import UserError
from models.flavours import from_name
from pipelines.demo import benchmark, synthetic

log = logging.getLogger(__name__)

MODEL_NAME = "sphinx-x-demo"
DATA_DIR = "demo-data"


@dataclass(frozen=True)
class DemoConfig:
    """The knobs of one demo run (the full demo, or ``--quick`` for CI)."""

    n_train: int = 5000
    n_heldout: int = 150
    steps: int = 3500  # ~12 min under Ray Train on 2 cores (4.4-5 steps/s); shape, count and the boxes need them
    micro_batch: int = 8  # per worker; global batch = micro_batch x 2 workers
    lr: float = 3e-3  # best of 1e-3 / 3e-3 in a bare-loop sweep from random init
    warmup_ratio: float = 0.05
    # random-init encoders stay frozen: their random features already separate shape and count
    # (a linear probe on pooled global-view features: 0.80 / 0.85), and training them at the
    # demo's lr made colour worse (benchmarks/learnability.py, BENCHMARKS.md "sphinx-x demo")
    train_encoders: bool = False
    seed: int = 0
    eval_threads: int = 4
    max_tokens: int = 4  # the one-word answers' limit (the grounding answers': benchmark.WHERE_MAX_TOKENS)
    regions: bool = True  # one-shape scenes are also asked where the shape is (the "where" type, Acc@IoU >= 0.5)


FULL = DemoConfig()
QUICK = DemoConfig(n_train=300, n_heldout=40, steps=200)

# The debug flavour as the demo trains it (kept in the spec, not in models/flavours.py).
MODEL_OVERRIDES: dict[str, Any] = {}


# ----------------------------------------------------------------------------- the spec


def build_spec(cfg: DemoConfig, *, run_id: str, port: int) -> ClusterSpec:
    """cluster/examples/local.yaml with the demo's data, training budget and one served model."""
    data = yaml.safe_load(example_path("local").read_text())
    uri = f"s3://sphinx-x/demo/{run_id}"
    data["name"] = "sphinx-x-demo"
    data["storage"] = {**data.get("storage", {}), "uri": uri, "endpoint_url": "embedded"}
    # dedup off: the generator draws its text-only chats from a closed list, so most of them
    # repeat word for word on purpose (their share of the mix); deduplicated, each would be
    # trained on once and chat falls to chance (measured: 1.00 -> 0.07 on the held-out chats)
    data["data"] = {**data.get("data", {}), "max_seq_len": 512, "output": "shards", "sources": [
        {"name": "synthetic", "path": f"{uri}/{DATA_DIR}/train.jsonl", "image_root": f"{uri}/{DATA_DIR}",
         "dedup": "off"}]}
    data["model"] = {"flavour": "debug", "overrides": dict(MODEL_OVERRIDES)}
    data["train"] = {**data.get("train", {}), "workers": 2, "use_gpu": False, "zero_stage": 2,
                     "precision": "fp32", "micro_batch": cfg.micro_batch, "grad_accum": 1, "lr": cfg.lr,
                     "train_encoders": cfg.train_encoders, "warmup_ratio": cfg.warmup_ratio, "steps": cfg.steps, "epochs": None,
                     "checkpoint_every": cfg.steps, "keep_checkpoints": 1, "seed": cfg.seed,
                     # the recipe BENCHMARKS.md measured (one sample per row): packing would put ~5
                     # samples in each of its 8 rows, ~5x the work per step, with unmeasured figures
                     "packing": False}
    data["serve"] = {**data.get("serve", {}), "http": {"host": "127.0.0.1", "port": port}, "models": [{
        "name": MODEL_NAME, "checkpoint": "@train", "flavour": "debug",
        # two replicas from the start: a replica scaled up while the questions run starts its vLLM
        # engine on the same 2 cores and stalls the answers (p99 15 s); started at deploy, both are
        # ready before the first question (Serve routes only to replicas whose constructor returned)
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2,
                               "target_ongoing_requests": 2},
        "ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 8}]}
    files = {benchmark.BENCHMARK: benchmark.FILE}
    if cfg.regions:
        files[benchmark.WHERE_BENCHMARK] = benchmark.WHERE_FILE
    flavour = from_name(data["model"]["flavour"], **data["model"]["overrides"])
    data["eval"] = benchmark.eval_section({name: f"{uri}/{DATA_DIR}/{f}" for name, f in files.items()},
                                          f"http://127.0.0.1:{port}", MODEL_NAME, concurrency=cfg.eval_threads,
                                          max_tokens=cfg.max_tokens,
                                          box_frame=frame_of_pad(flavour.pad))
    return parse_spec(data, "demo-spec")


# ----------------------------------------------------------------------------- evaluation


def ask_heldout(spec: ClusterSpec, ds: synthetic.Dataset) -> tuple[dict, dict]:
    """Write the held-out questions as the benchmark file, run the eval stage on the served
    endpoint, and read its outputs back: (the demo's evaluation, the questions as sent, for
    parity: id -> (OpenAI messages, image bytes))."""
    from actors.eval.endpoint_engine import openai_messages
    from cluster.run_context import RunContext
    from pipelines.stages import eval as eval_stage

    rows = ds.heldout_rows()
    images = {s.image_path: s.image for s in ds.heldout if s.image is not None}
    ctx = RunContext.build(spec, force=True)
    tsvs = benchmark.heldout_tsvs(rows, images)
    benches = spec.eval.benchmarks
    for bench in benches:
        ctx.storage.write_bytes(ctx.layout.path(bench.path), tsvs[bench.name])
    summary = eval_stage.run_stage(spec, force=True)
    results = [(eval_stage.read_scores(ctx, b.name),
                benchmark.read_jsonl(ctx.storage.read_bytes(ctx.layout.eval_predictions(b.name)))) for b in benches]
    texts = {r["id"]: (r["conversations"][0]["value"].replace("<image>\n", ""), r["answer"]) for r in rows}
    result = benchmark.evaluation(results, texts, summary.get("wall_s"))
    result["output"] = str(ctx.layout.evals)
    requests = [r for b in benches for r in eval_stage.load(b, ctx.layout.path(b.path), ctx.storage).requests]
    sent = {r.id.split("/", 1)[1]: (openai_messages(r.messages, r.images), list(r.images)) for r in requests}
    result["max_tokens"] = {r.id.split("/", 1)[1]: r.max_tokens for r in requests}
    return result, sent


def _check_page(url: str) -> str:
    """GET the web page at ``/``; returns its URL, or raises naming what came back instead."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/", timeout=60) as resp:
        body = resp.read()
    if resp.status != 200 or b"/v1/chat/completions" not in body:
        raise UserError(f"the endpoint's web page at {url}/ is missing (HTTP {resp.status})")
    return f"{url}/"


# ----------------------------------------------------------------------------- pictures


def tiling_png(ds: synthetic.Dataset, flavour, path: Path) -> dict:
    """Draw how a held-out panorama is tiled (pipelines.tiles' drawing); returns its description."""
    from models.tiling import TileSpec, load_and_tile
    from pipelines import tiles

    sample = max((s for s in ds.heldout + ds.train if s.size), key=lambda s: s.size[0] / s.size[1])
    spec = TileSpec.from_flavour(flavour)
    tiled = load_and_tile(sample.image, spec)
    info = tiles.describe(tiled, spec, flavour.tokens_per_view)
    info.update(image=sample.image_path, flavour=flavour.name)
    tiles.render_png(tiled, spec, info).save(path)
    return info


def loss_png(storage, spec: ClusterSpec, history: list[dict], path: Path) -> None:
    """The train stage's loss.png; drawn here from metrics.jsonl if the stage left none."""
    key = Layout.from_spec(spec, storage.uri).loss_png
    if storage.exists(key):
        path.write_bytes(storage.read_bytes(key))
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in history], [m["loss"] for m in history])
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("sphinx-x demo: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metrics(storage, spec: ClusterSpec) -> list[dict]:
    key = Layout.from_spec(spec, storage.uri).metrics
    if not storage.exists(key):
        return []
    return [json.loads(line) for line in storage.read_bytes(key).decode().splitlines() if line.strip()]


def training_figures(history: list[dict]) -> dict:
    """Throughput from the per-step metrics (the first step, with DeepSpeed warm-up, excluded)."""
    steady = history[1:] or history
    secs = sum(m.get("step_time_s", 0) for m in steady)
    tokens = sum(m.get("tokens", 0) for m in steady)
    return {
        "steps": len(history),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": (sum(m["loss"] for m in history[-10:]) / len(history[-10:])) if history else None,
        "tokens_per_s": round(tokens / secs, 1) if secs else None,
        "steps_per_s": round(len(steady) / secs, 3) if secs else None,
        "train_tokens": sum(m.get("tokens", 0) for m in history),
        "train_saved_tokens": sum(m.get("saved_tokens", 0) for m in history),
    }


# ----------------------------------------------------------------------------- the run


class _Embedded:
    """The S3 server and Ray this demo started itself (so it stops exactly those)."""

    def __init__(self) -> None:
        self.s3 = None
        self.ray_started = False

    def start(self, spec: ClusterSpec) -> None:
        from cluster import runtime
        from cluster.storage import ENDPOINT_ENV, EmbeddedS3Process

        up = runtime.up_state(alive_only=True)
        if not os.environ.get(ENDPOINT_ENV) and not (up and up.get("s3")):
            self.s3 = EmbeddedS3Process().start()  # its own process: uploads are not GIL-bound
            os.environ[ENDPOINT_ENV] = self.s3.endpoint_url
            log.info("demo: embedded S3 at %s", self.s3.endpoint_url)
        import ray

        from cluster.connect import connect

        if not ray.is_initialized():
            self.ray_started = not (up and up.get("ray")) and not os.environ.get("RAY_ADDRESS")
        connect(spec)  # the spec's head resources (cluster/examples/local.yaml: 4 logical CPUs)

    def stop(self, spec: ClusterSpec) -> None:
        """Delete the demo's Serve app; stop Serve and Ray if this demo started Ray, then S3."""
        import ray

        if ray.is_initialized():
            try:
                from pipelines.stages import serve

                serve.shutdown(spec)
            except Exception as err:  # noqa: BLE001 - best effort; Ray goes next anyway
                log.warning("demo: stopping Serve: %s", err)
            if self.ray_started:
                from ray import serve as ray_serve

                ray_serve.shutdown()
                ray.shutdown()
        if self.s3 is not None:
            from cluster.storage import ENDPOINT_ENV

            self.s3.stop()
            os.environ.pop(ENDPOINT_ENV, None)
            self.s3 = None


def _stage(name: str, fn, timings: dict) -> dict:
    from pipelines.run import own_signals

    print(f"[demo] {name} ...", flush=True)
    t0 = time.time()
    with own_signals(name):  # a handler a stage installs (Ray's) ends with it: Ctrl-C stays ours
        out = fn()
    timings[name] = round(time.time() - t0, 1)
    print(f"[demo] {name} done in {timings[name]:.0f} s", flush=True)
    return out


def run(cfg: DemoConfig, run_dir: Path, *, keep_serving: bool = False) -> dict:
    """The whole demo; returns the report (also ``run_dir/report.json``)."""
    from cluster.connect import storage_for
    from pipelines.demo import parity
    from pipelines.stages import preprocess, serve, train

    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    spec = build_spec(cfg, run_id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], port=free_port())
    (run_dir / "spec.yaml").write_text(dump_spec(spec))
    env = _Embedded()
    timings: dict[str, float] = {}
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops the demo as Ctrl-C does
    try:
        _stage("start embedded S3 + local Ray", lambda: env.start(spec), timings)
        storage = storage_for(spec)
        ds = _stage("generate synthetic data",
                    lambda: synthetic.generate(cfg.n_train, cfg.n_heldout, cfg.seed, regions=cfg.regions), timings)
        where = _stage("upload to S3", lambda: synthetic.write(ds, DATA_DIR, storage), timings)
        shards = _stage("preprocess", lambda: preprocess.run_stage(spec, force=True), timings)
        trained = TrainSummary.from_dict(_stage("train + export", lambda: train.run_stage(spec, force=True), timings),
                                         where="the train stage's summary")
        served = _stage("serve", lambda: serve.run_stage(spec), timings)
        served["web_page"] = _check_page(served["url"])
        evaluation, questions = _stage(f"eval: {len(ds.heldout_rows())} held-out questions through the endpoint",
                                       lambda: ask_heldout(spec, ds), timings)
        parity_report = _stage("parity: the served answers vs the PyTorch model",
                               lambda: parity.compare(spec, MODEL_NAME, questions, evaluation["answers"],
                                                      max_tokens=evaluation["max_tokens"]), timings)
        # every answer's latency, slowest first: what a p99 is made of (the eval's own copy is on S3)
        (run_dir / "answers.jsonl").write_text("".join(json.dumps(t) + "\n" for t in evaluation["timing"]))
        history = _metrics(storage, spec)
        loss_png(storage, spec, history, run_dir / "loss.png")
        flavour = from_name(spec.model.flavour, **spec.model.overrides)
        tiling = tiling_png(ds, flavour, run_dir / "tiling.png")
        report = _report(cfg, spec, ds, where, shards, trained, served, evaluation, parity_report, history,
                         tiling, run_dir, timings, time.time() - t_start)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        print(format_report(report, serving=keep_serving), flush=True)
        if keep_serving:
            print(f"\nserving at {served['url']}/  (web page)  and {served['url']}/v1  (OpenAI API); "
                  "Ctrl-C stops", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                print("stopping", flush=True)
        return report
    except KeyboardInterrupt:
        print("[demo] interrupted: stopping Serve, Ray and the embedded S3", flush=True)
        raise
    finally:
        env.stop(spec)
        signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt()


def _report(cfg, spec, ds, where, shards, trained, served, evaluation, parity_report, history, tiling, run_dir,
            timings, total_s) -> dict:
    stats = ds.stats()["types"]
    questions = {}
    for qtype, t in sorted(evaluation["types"].items()):
        questions[qtype] = {**t, "baseline": stats[qtype]["baseline"], "majority_answer": stats[qtype]["majority"]}
    manifest = Manifest.from_dict(shards)  # preprocess's summary: the manifest's keys
    image_tokens, saved = manifest.tokens.image, manifest.tokens.saved
    return {
        "questions": questions,
        "training": {**training_figures(history), "workers": spec.train.workers,
                     "zero_stage": spec.train.zero_stage, "global_batch": spec.train.global_batch,
                     "lr": spec.train.lr, "wall_s": trained.wall_s, "export": trained.export},
        "skip_tokens": {"image_tokens": image_tokens, "saved_tokens": saved,
                        "saved_fraction": saved / (image_tokens + saved) if image_tokens + saved else 0.0,
                        "rows": manifest.counts.rows_written},
        "serving": {"url": served["url"], "web_page": served["web_page"], "model": MODEL_NAME, "requests": evaluation["requests"],
                    "errors": len(evaluation["errors"]), "latency_s": evaluation["latency_s"],
                    "requests_per_s": evaluation["requests_per_s"], "concurrency": cfg.eval_threads,
                    "slowest": evaluation["timing"][:3]},
        "parity": parity_report,
        "eval": {"benchmark": benchmark.BENCHMARK, "metric": evaluation["metric"], "score": evaluation["score"],
                 "categories": evaluation["categories"], "output": evaluation["output"]},
        "samples": evaluation["samples"],
        "errors": evaluation["errors"][:10],
        "data": {"train_samples": len(ds.train), "heldout_questions": evaluation["requests"],
                 "train_jsonl": where["train"], "heldout_jsonl": where["heldout"], "shards": spec.data.output,
                 "shard_files": len(manifest.shards), "rows_written": manifest.counts.rows_written,
                 "duplicate_samples": manifest.counts.duplicate_samples},
        "files": {"report": str(run_dir / "report.json"), "loss_png": str(run_dir / "loss.png"),
                  "tiling_png": str(run_dir / "tiling.png"), "spec": str(run_dir / "spec.yaml"),
                  "answers": str(run_dir / "answers.jsonl")},
        "tiling_example": {k: tiling[k] for k in ("image", "original_size", "kept", "skipped", "image_tokens",
                                                 "tokens_saved")},
        "config": asdict(cfg),
        "timings_s": timings,
        "total_s": round(total_s, 1),
    }


def format_report(r: dict, *, serving: bool = False) -> str:
    """The report as the terminal shows it; the web page's address only while it is ``serving``."""
    lines = ["", "sphinx-x demo — held-out questions, answered by the served endpoint", "",
             f"  {'question':<9} {'accuracy':>9} {'baseline':>9}   (majority answer)"]
    for qtype, q in r["questions"].items():
        lines.append(f"  {qtype:<9} {q['accuracy']:>9.2f} {q['baseline']:>9.2f}   ({q['majority_answer']!r}, "
                     f"{q['correct']}/{q['total']})")
    t, s, v, p = r["training"], r["skip_tokens"], r["serving"], r["parity"]
    lat = v["latency_s"]
    fmt = lambda x: "n/a" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
    lines += [
        "",
        f"  training    {t['steps']} steps, {t['workers']} workers, ZeRO-{t['zero_stage']}, global batch "
        f"{t['global_batch']}: {t['tokens_per_s'] or 0:.0f} tokens/s, loss {t['first_loss'] or 0:.2f} -> "
        f"{t['final_loss'] or 0:.2f}",
        f"  skip tokens saved {s['saved_tokens']} of {s['image_tokens'] + s['saved_tokens']} image tokens "
        f"({s['saved_fraction']:.0%}) over {s['rows']} rows",
        f"  serving     {v['requests']} requests, {v['concurrency']} at a time: p50 {fmt(lat['p50'])}, "
        f"p99 {fmt(lat['p99'])}, {v['errors']} errors",
        "              slowest: " + ", ".join(f"{fmt(a['latency_s'])} ({a['category']}, {a['completion_tokens']} tokens"
                                           + (f", {a['attempts']} tries" if (a['attempts'] or 1) > 1 else "") + ")"
                                           for a in v.get("slowest", []) if a["latency_s"] is not None),
        f"  parity      vLLM vs PyTorch greedy (fp32, CPU): {p['identical']}/{p['total']} identical",
        f"  eval        {r['eval']['benchmark']} ({r['eval']['metric']}): {r['eval']['score']:.1f} % overall, "
        f"scored by the eval harness: {r['eval']['output']}",
        f"  web page    {v['web_page']}" if serving else
        "  web page    served while the demo ran (sphinx-x demo --keep-serving keeps it up)",
        f"  loss curve  {r['files']['loss_png']}",
        f"  tiling      {r['files']['tiling_png']}  ({r['tiling_example']['image']}: kept "
        f"{len(r['tiling_example']['kept'])}, skipped {len(r['tiling_example']['skipped'])} tiles)",
        f"  report      {r['files']['report']}",
        f"  total       {r['total_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps}")
        cfg = replace(cfg, steps=args.steps)
    if getattr(args, "samples", None) is not None:
        n_train, n_heldout = args.samples
        batch = 2 * cfg.micro_batch  # one global batch: two workers' micro-batches
        if n_train < batch or n_heldout < 1:
            raise UserError(f"--samples needs at least {batch} training samples (one global batch) and 1 held-out "
                            f"sample, got {n_train} {n_heldout}")
        cfg = replace(cfg, n_train=n_train, n_heldout=n_heldout)
    if getattr(args, "seed", None) is not None:
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        cfg = replace(cfg, seed=args.seed)
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    report = run(cfg, run_dir, keep_serving=args.keep_serving)
    return 0 if not report["serving"]["errors"] else 1
