"""Shard bytes per image and the training reader's cost: raw views (format 1) vs stored images (format 2).

Prints ONE JSON object. Side by side in one run (issue 17, "compressed shards"):

- **bytes per image** on ``benchmarks/preprocess.py``'s generated JPEGs (0.3–12 MP, 10 aspect
  ratios; a 448 px canvas, 2×2 tiles of 224 as the real flavours): the source JPEG; format 1,
  the raw uint8 views in a Parquet file with LZ4 (what preprocess wrote before); format 2, the
  scaled image in lossless WebP and in PNG (``models.stored_image``). Goal: format 2 ≤ 1.5× the
  source bytes.
- **reader** (``actors.train.data.ReadPlannedRows``, the Ray Data stage that feeds each rank):
  ms of one CPU per row to read the planned rows in a seeded random order, format 1 (views
  stored) vs format 2 (views cut from the stored image), and the views it returns are checked equal.
- **training** (``--train-steps``, 0 skips): ``benchmarks/train.py``'s ``demo_like`` (the real
  train stage: 2 workers, ZeRO-2, micro-batch 8, embedded S3) on synthetic shards written in each
  format, interleaved ``--rounds`` times: steady steps/s and the mean per-step data wait. Goal:
  unchanged within noise.

    .venv/bin/python benchmarks/shard_format.py [--images 200] [--train-steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

TILE, GRID = 224, 2


def _shard_files(paths: list[Path], out: Path) -> dict:
    """Write the images as one shard file per format; returns bytes and the files."""
    from models.stored_image import store
    from models.tiling import TileSpec, load_and_tile

    spec = TileSpec(GRID, TILE)
    raw, webp, png = [], [], []
    for p in paths:
        data = p.read_bytes()
        t = load_and_tile(data, spec)
        common = {"id": p.name, "input_ids": [1, 2, 3], "view_counts": [len(t.views)], "kept": t.kept.tolist(),
                  "tile_size": TILE, "grid": GRID}
        raw.append({**common, "views": t.views.tobytes()})
        for rows, codec in ((webp, "webp"), (png, "png")):
            s = store(data, spec, codec=codec)
            rows.append({**common, "images": [s.data], "plans": s.plan})
    files = {}
    for name, rows in (("format1_views_lz4", raw), ("format2_webp", webp), ("format2_png", png)):
        path = out / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, compression="lz4", row_group_size=64)
        files[name] = path
    return files


def _reader(files: dict, n: int, repeats: int) -> dict:
    """ms of CPU per row for ReadPlannedRows over each file (random order, a fresh reader each
    pass so the row-group cache starts cold), and the views equal across formats."""
    from actors.train.data import ReadPlannedRows
    from cluster.spec import StorageSection
    from models.tiling import TileSpec

    order = np.random.default_rng(0).permutation(n)
    out, views = {}, {}
    for name, path in files.items():
        times = []
        for _ in range(repeats):
            read = ReadPlannedRows(StorageSection(uri=str(path.parent)), [str(path)], tile=TileSpec(GRID, TILE))
            t0 = time.process_time()
            got = [read({"file": np.zeros(len(chunk), np.int64), "row": chunk, "_pos": np.arange(len(chunk))})
                   for chunk in np.array_split(order, max(1, n // 64))]
            times.append((time.process_time() - t0) / n * 1000)
        out[name] = round(float(np.median(times)), 3)
        views[name] = b"".join(v for t in got for v in t.column("views").to_pylist())
    first = next(iter(views.values()))
    return {"cpu_ms_per_row": out, "views_identical": all(v == first for v in views.values())}


def _training(steps: int, rounds: int) -> dict:
    import ray

    from cluster.connect import worker_env
    from cluster.spec import StorageSection
    from cluster.storage import EmbeddedS3
    from train import demo_like

    server = EmbeddedS3()
    server.start()
    os.environ["SPHINX_X_S3_ENDPOINT"] = server.endpoint_url
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": worker_env(StorageSection(), server.endpoint_url)})
    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        for _ in range(rounds):  # interleaved: a burst of load on a shared box hits both alike
            for fmt in (1, 2):
                runs[fmt].append(demo_like(steps, 0.0, server.endpoint_url, shard_format=fmt))
    finally:
        ray.shutdown()
        server.stop()
    med = {fmt: {k: float(np.median([r[k] for r in rs])) for k in ("steps_per_s", "data_s", "step_time_s")}
           for fmt, rs in runs.items()}
    return {"format1": med[1], "format2": med[2],
            "steps_per_s_ratio_2_over_1": round(med[2]["steps_per_s"] / med[1]["steps_per_s"], 3),
            "rounds": {f"format{k}": [r["steps_per_s"] for r in v] for k, v in runs.items()}}


def main() -> None:
    from preprocess import generate

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--cache", default="/tmp/sphinx-x-bench-preprocess")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=40, help="0 skips the training comparison")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    paths = generate(Path(args.cache), args.images)
    source = sum(p.stat().st_size for p in paths)
    with tempfile.TemporaryDirectory() as tmp:
        files = _shard_files(paths, Path(tmp))
        sizes = {name: f.stat().st_size for name, f in files.items()}
        reader = _reader(files, len(paths), args.repeats)
    result = {
        "benchmark": "shard_format", "images": len(paths), "canvas": TILE * GRID,
        "source_jpeg_kb_per_image": round(source / len(paths) / 1e3, 1),
        "kb_per_image": {k: round(v / len(paths) / 1e3, 1) for k, v in sizes.items()},
        "ratio_to_source": {k: round(v / source, 3) for k, v in sizes.items()},
        "reader": reader,
    }
    if args.train_steps:
        result["training"] = _training(args.train_steps, args.rounds)
    result["load_average"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
