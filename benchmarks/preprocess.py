"""Preprocess throughput on ≥1000 generated JPEGs (0.3–12 MP, mixed aspect ratios); prints ONE JSON object.

    .venv/bin/python benchmarks/preprocess.py [--images 1000] [--subset 150] [--cache /tmp/sphinx-x-bench-preprocess]

Every image goes to the same output tile size (flavour ``debug`` with ``tile_size`` 224, grid 2:
a 448 px canvas, as the real flavours). Measured:

- (a) the Ray Data pipeline (``pipelines.stages.preprocess.run_stage``) on a local Ray with all CPUs,
  local storage, JSONL + image_root, run twice on the same cluster: ``cold`` (just started) and
  ``warm`` (the stage again: Ray Data's cluster-wide helper actors are up; the tiler actors are
  new processes each time): images/s overall and per core, end to end (``run_stage`` incl.
  tokenizer pass and actor start-up; ``ray.init`` not included), the first shard back at the
  driver after the stage started, steady state (rows tallied after the first shard came back ÷
  time from then to the last), phase times, and the CPU seconds of the driver and of all Ray
  processes (a load-independent view of the overhead);
- (b) the same work in one plain process: the same ``actors.data.tiler.Tiler`` in shard mode called
  on the same raw rows, ``--rows-per-shard`` rows per call as the pipeline's blocks (read,
  decode, tile, tokenize, write the shard file): images/s and CPU seconds;
- (b2) as many plain processes as CPUs at once, each the (b) loop on every n-th block (no Ray):
  what this machine gives n workers, the ceiling for (a);
- per image on a fixed subset (every k-th image): our ``models.tiling.load_and_tile``;
  (c) transformers' ``LlavaNextImageProcessorPil`` (anyres, the PIL backend the installed
  transformers uses without torchvision) configured to the same 224 px tiles and 2×2 grid,
  uint8 out (no rescale/normalise, like ours), decode included; (d) PIL decode alone (full
  decode to RGB: the floor of a full-resolution pipeline), and (d') PIL reduced-scale JPEG decode
  to the canvas size (the floor of ours).

Goals: (c) / ours ≥ 2; (a) per core / (b) ≥ 0.9 end to end and the first shard back ≤ 5 s on a
warm cluster (issue 17); (b) / (d) reported. The image set is generated
in parallel once and cached under ``--cache`` (never in git); generation is not timed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 1), (1, 3), (5, 2)]
TILE, GRID = 224, 2


def _image_size(i: int) -> tuple[int, int]:
    rng = np.random.default_rng(i)
    mp = float(np.exp(rng.uniform(np.log(0.3), np.log(12.0)))) * 1e6
    aw, ah = ASPECTS[i % len(ASPECTS)]
    w = int(round((mp * aw / ah) ** 0.5))
    return w, max(1, int(round(mp / w)))


def _make(args: tuple[int, str]) -> int:
    """A smooth colour field with some detail (JPEG-friendly, realistic sizes on disk)."""
    i, path = args
    if os.path.exists(path):
        return 0
    w, h = _image_size(i)
    rng = np.random.default_rng(1000 + i)
    small = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    im = small.resize((w, h), Image.Resampling.BILINEAR)
    detail = Image.fromarray(rng.integers(0, 40, (h // 8 + 1, w // 8 + 1), dtype=np.uint8)).resize((w, h))
    im = Image.merge("RGB", [Image.blend(c, detail, 0.3) for c in im.split()])
    tmp = path + ".tmp"
    im.save(tmp, "JPEG", quality=88)
    os.replace(tmp, path)
    return 1


def generate(cache: Path, n: int) -> list[Path]:
    img_dir = cache / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = [img_dir / f"{i:05d}.jpg" for i in range(n)]
    todo = [(i, str(p)) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        print(f"generating {len(todo)} JPEGs under {img_dir} (cached for next runs) ...", file=sys.stderr)
        with Pool(os.cpu_count() or 2) as pool:
            pool.map(_make, todo, chunksize=4)
    lines = [json.dumps({"id": f"b{i}", "image": p.name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in one sentence."},
        {"from": "gpt", "value": f"A smooth colour field number {i} with some fine detail."}]}) for i, p in enumerate(paths)]
    (cache / "data.jsonl").write_text("\n".join(lines))
    return paths


def _llava_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [[TILE * r, TILE * c] for r in range(1, GRID + 1) for c in range(1, GRID + 1)]
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints,
        do_rescale=False, do_normalize=False, do_convert_rgb=True,
    )


def _per_image(paths: list[Path]) -> dict:
    from models.tiling import TileSpec, load_and_tile

    spec = TileSpec(GRID, TILE)
    proc = _llava_processor()
    data = [p.read_bytes() for p in paths]
    timings: dict[str, list[float]] = {"ours": [], "llava": [], "decode": [], "decode_draft": []}

    def ours(b):
        load_and_tile(b, spec)

    def llava(b):
        proc(images=Image.open(io.BytesIO(b)).convert("RGB"), return_tensors="np")

    def decode(b):
        Image.open(io.BytesIO(b)).convert("RGB")

    def decode_draft(b):
        im = Image.open(io.BytesIO(b))
        w, h = im.size
        m = max(w, h)
        im.draft("RGB", (max(1, w * TILE * GRID // m), max(1, h * TILE * GRID // m)))
        im.convert("RGB")

    fns = {"ours": ours, "llava": llava, "decode": decode, "decode_draft": decode_draft}
    ours(data[0]), llava(data[0])  # warm-up (imports, caches)
    for b in data:  # interleaved, so a load spike on the shared box hits all four alike
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(b)
            timings[name].append(time.perf_counter() - t)
    return {k: float(np.mean(v)) * 1000 for k, v in timings.items()}


def _config_and_tokenizer(texts: list[str]):
    from actors.data.tiler import TilerConfig
    from models.conversation import train_bpe_tokenizer
    from models.flavours import from_name

    f = from_name("debug", tile_size=TILE, grid=GRID)
    cfg = TilerConfig.from_flavour(f, max_seq_len=f.max_seq_len)
    return cfg, train_bpe_tokenizer(texts, int(f.llm["vocab_size"]))


def _plain_loop(cache: Path, rows_per_shard: int, index: int = 0, procs: int = 1,
                barrier=None) -> tuple[float, float, float, int, int]:
    """The Tiler in shard mode on every ``procs``-th block of ``rows_per_shard`` raw rows from
    block ``index`` on, after a warm-up call (and ``barrier``, when given): (start, end, CPU s,
    rows, good rows)."""
    from actors.data import rows as raw
    from actors.data.tiler import Tiler

    rows = raw.parse_json_file((cache / "data.jsonl").read_bytes(), "data.jsonl", source="bench", ratio=1.0,
                               image_root=str(cache / "images"))
    cfg, tok = _config_and_tokenizer([t["value"] for r in rows for t in json.loads(r["conversations"])])
    out_dir = tempfile.mkdtemp(prefix="sphinx-x-bench-plain-")
    tiler = Tiler(cfg, tok, shard_dir=out_dir)
    tiler(raw.to_table(rows[:2]))  # warm-up
    if barrier is not None:
        barrier.wait()
    t, cpu = time.perf_counter(), time.process_time()
    n_ok = 0
    for i in range(index * rows_per_shard, len(rows), procs * rows_per_shard):
        n_ok += tiler(raw.to_table(rows[i:i + rows_per_shard])).column("reason").null_count
    end, cpu = time.perf_counter(), time.process_time() - cpu
    shutil.rmtree(out_dir, ignore_errors=True)
    return t, end, cpu, len(rows), n_ok


def plain_process(cache: Path, rows_per_shard: int) -> dict:
    """(b): the Tiler in shard mode on the raw rows, ``rows_per_shard`` rows per call, one process."""
    t, end, cpu, n, n_ok = _plain_loop(cache, rows_per_shard)
    secs = end - t
    return {"images": n, "ok": n_ok, "seconds": round(secs, 2), "cpu_s": round(cpu, 2),
            "images_per_s": round(n / secs, 2)}


def _plain_worker(args: tuple) -> tuple[float, float, float, int, int]:
    """One of (b2)'s processes (a picklable entry point for the pool)."""
    return _plain_loop(*args)


def plain_parallel(cache: Path, rows_per_shard: int, procs: int) -> dict:
    """(b2): ``procs`` plain processes at once, each the (b) loop on every ``procs``-th block.

    No Ray, no coordination: the most this machine gives ``procs`` workers (shared caches,
    memory bandwidth, a hypervisor's vCPUs), the ceiling for (a).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        with ctx.Pool(procs) as pool:
            spans = pool.map(_plain_worker, [(cache, rows_per_shard, i, procs, barrier) for i in range(procs)])
    secs = max(span[1] for span in spans) - min(span[0] for span in spans)
    n = spans[0][3]
    return {"images": n, "procs": procs, "seconds": round(secs, 2), "cpu_s": round(sum(span[2] for span in spans), 2),
            "images_per_s": round(n / secs, 2), "images_per_s_per_core": round(n / secs / procs, 2)}


def _tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and every descendant (Ray's processes), by pid."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me] + me.children(recursive=True):
        try:
            c = proc.cpu_times()
            out[proc.pid] = c.user + c.system
        except psutil.Error:
            pass
    return out


def ray_pipeline(cache: Path, cpus: int, rows_per_shard: int, hf_tokenizer_run: bool = False) -> dict:
    """(a): run_stage on a local Ray with every CPU, twice: ``cold`` on the cluster just started,
    then ``warm`` (the same stage again on that cluster: Ray Data's cluster-wide helper actors are
    up, the driver has imported Ray Data; every tiler actor is a new process either way), and with
    ``hf_tokenizer_run`` a third, warm, run shipping transformers' tokenizer object to the actors
    as before ``models.light_tokenizer``."""
    import ray

    from cluster.spec import parse_spec
    from pipelines.stages import preprocess

    out = Path(tempfile.mkdtemp(prefix="sphinx-x-bench-out-"))
    spec = parse_spec({
        "name": "bench", "storage": {"uri": str(out), "endpoint_url": None},
        "model": {"flavour": "debug", "overrides": {"tile_size": TILE, "grid": GRID}},
        "data": {"sources": [{"name": "bench", "path": str(cache / "data.jsonl"), "image_root": str(cache / "images")}],
                 "concurrency": cpus, "num_cpus_per_worker": 1, "rows_per_shard": rows_per_shard},
    })
    phases: dict[str, float] = {}
    arrivals: list[tuple[float, int, int]] = []  # (time, rows, rows so far) per bookkeeping block the driver gets

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = round(time.perf_counter() - t, 2)
        return wrapper

    class TimedProgress(preprocess.Progress):
        """The driver's progress line, updated once per bookkeeping block it receives."""

        def update(self, done, **fields):
            arrivals.append((time.perf_counter(), done - (arrivals[-1][2] if arrivals else 0), done))
            return super().update(done, **fields)

    def one_run() -> dict:
        phases.clear()
        arrivals.clear()
        cpu0, own0 = _tree_cpu(), time.process_time()
        t = time.perf_counter()
        summary = preprocess.run_stage(spec, force=True)
        secs = time.perf_counter() - t
        cpu1, own = _tree_cpu(), time.process_time() - own0
        n = summary["rows_in"]
        total_cpu = sum(c - cpu0.get(pid, 0.0) for pid, c in cpu1.items())
        (t_first, _, _), (t_last, _, _) = arrivals[0], arrivals[-1]
        steady_rows = sum(r for _, r, _ in arrivals[1:])
        steady = steady_rows / (t_last - t_first) if t_last > t_first else None
        return {"images": n, "written": summary["rows_written"], "shards": len(summary["shards"]),
                "seconds": round(secs, 2), "cpus": cpus, "phases": dict(phases),
                "first_shard_back_s": round(t_first - t, 2),
                "images_per_s": round(n / secs, 2), "images_per_s_per_core": round(n / secs / cpus, 2),
                "steady_images_per_s": round(steady, 2) if steady else None,
                "steady_images_per_s_per_core": round(steady / cpus, 2) if steady else None,
                "cpu_s": {"driver": round(own, 2), "all_ray_processes_and_driver": round(total_cpu, 2)}}

    orig = preprocess.prepare_tokenizer, preprocess._run_graph, preprocess.Progress
    preprocess.prepare_tokenizer = timed("tokenizer_s", preprocess.prepare_tokenizer)
    preprocess._run_graph = timed("graph_s", preprocess._run_graph)
    preprocess.Progress = TimedProgress
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = round(time.perf_counter() - t, 2)
    try:
        cold = one_run()
        time.sleep(2)  # the cold run's actors exit
        warm = one_run()
        runs = {"ray_init_s": ray_init_s, "cold": cold, "warm": warm}
        if hf_tokenizer_run:  # before models.light_tokenizer: the actors unpickle transformers' class
            light, preprocess.for_workers = preprocess.for_workers, lambda tok: tok
            try:
                time.sleep(2)
                runs["warm_hf_tokenizer"] = one_run()
            finally:
                preprocess.for_workers = light
    finally:
        preprocess.prepare_tokenizer, preprocess._run_graph, preprocess.Progress = orig
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--subset", type=int, default=150, help="images for the per-image comparisons (c), (d)")
    p.add_argument("--cache", default="/tmp/sphinx-x-bench-preprocess")
    p.add_argument("--rows-per-shard", type=int, default=64, help="rows per shard = per tiler call, (a) and (b)")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--hf-tokenizer-run", action="store_true",
                   help="(a) once more, warm, with transformers' tokenizer in the actors (the state before)")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cache = Path(args.cache)
    paths = generate(cache, args.images)
    sizes = [_image_size(i) for i in range(args.images)]
    mps = [w * h / 1e6 for w, h in sizes]
    step = max(1, args.images // args.subset)
    per = _per_image(paths[::step][: args.subset])
    load_before = os.getloadavg()[0]
    b = plain_process(cache, args.rows_per_shard)
    cpus = os.cpu_count() or 1
    b2 = plain_parallel(cache, args.rows_per_shard, cpus)
    a = None if args.skip_ray else ray_pipeline(cache, cpus, args.rows_per_shard, args.hf_tokenizer_run)
    result = {
        "benchmark": "preprocess",
        "images": args.images, "megapixels": {"min": round(min(mps), 2), "max": round(max(mps), 2),
                                              "mean": round(float(np.mean(mps)), 2)},
        "jpeg_mb_total": round(sum(p.stat().st_size for p in paths) / 2**20, 1),
        "tile_size": TILE, "grid": GRID,
        "load_avg_1m": {"before_b": round(load_before, 1), "after_a": round(os.getloadavg()[0], 1)},
        "rows_per_shard": args.rows_per_shard,
        "per_image_ms_subset": {"n": len(paths[::step][: args.subset]), **{k: round(v, 2) for k, v in per.items()}},
        "b_plain_process": b,
        "b2_plain_processes_in_parallel": b2,
        "a_ray_data": a,
        "ratios": {
            "c_llava_over_ours": round(per["llava"] / per["ours"], 2),
            "ours_over_d_decode": round(per["ours"] / per["decode"], 2),
            "ours_over_d_draft_decode": round(per["ours"] / per["decode_draft"], 2),
            "b_ms_per_image_over_d_decode": round(1000 / b["images_per_s"] / per["decode"], 2),
            **{f"a_{k}_per_core_over_b": round(a[k]["images_per_s_per_core"] / b["images_per_s"], 2) if a else None
               for k in ("cold", "warm")},
            **{f"a_{k}_steady_per_core_over_b": (round(a[k]["steady_images_per_s_per_core"] / b["images_per_s"], 2)
                                                 if a and a[k]["steady_images_per_s"] else None)
               for k in ("cold", "warm")},
            "b2_per_core_over_b": round(b2["images_per_s_per_core"] / b["images_per_s"], 2),
            "a_warm_per_core_over_b2_per_core": (round(a["warm"]["images_per_s_per_core"] / b2["images_per_s_per_core"], 2)
                                                 if a else None),
            "b_cpu_over_a_warm_cpu": round(b["cpu_s"] / a["warm"]["cpu_s"]["all_ray_processes_and_driver"], 2) if a else None,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
