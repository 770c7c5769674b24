"""Curate throughput: OCR pages/s per core and Set-of-Mark images/s; prints ONE JSON object.

    .venv/bin/python benchmarks/curate.py [--pdfs 40] [--pages 5] [--images 80]

Inputs are generated into a temporary local storage folder (not timed): ``--pdfs`` PDFs of
``--pages`` born-digital pages (30 lines of Helvetica each, pipelines/demo/synthetic_pdfs.py) and
``--images`` of the demo's scenes with 2-5 shapes each as COCO (``pipelines.demo.synthetic_coco``). Measured:

- OCR (a) a plain single-process loop of the same library: pypdfium2 opens each PDF, renders
  each page at the stage's dpi and reads its text and every character box (the library's floor);
  (b) ``actors.curate.ocr.curate_file`` in one process (a) plus lines, reading order, filters,
  the page PNG and the samples; (c) the stage (``pipelines.stages.curate.run_stage``, kind ocr,
  ``--force``) on a private local Ray with every CPU as a curate task (end to end: listing,
  tasks, assembling; ``ray.init`` not included), pages/s overall and per core.
  Goal (issue 26): (c) per core ≥ 0.9 × (a).
- SoM (d) ``actors.curate.som.curate_image`` in one process; (e) the stage, kind som: marked
  images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.demo.synthetic_pdfs import text_pdf  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while report tables list revenue costs and totals".split()


def _pdfs(folder: Path, n: int, pages: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        doc = [[f"Doc {i} page {p} " + " ".join(rng.choice(WORDS, 5)) for _ in range(11)] for p in range(pages)]
        path = folder / "docs" / f"doc{i:03d}.pdf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text_pdf(doc))
        paths.append(path)
    return paths


def _coco(folder: Path, n: int) -> None:
    from pipelines.demo.synthetic_coco import coco_scenes

    for name, data in coco_scenes(n).items():
        (folder / "coco" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "coco" / name).write_bytes(data)


def _plain_pdfium(paths: list[Path], dpi: float) -> int:
    import pypdfium2 as pdfium  # imported before the clock starts (main)

    pages = 0
    for path in paths:
        pdf = pdfium.PdfDocument(path.read_bytes())
        for i in range(len(pdf)):
            page = pdf[i]
            page.render(scale=dpi / 72).to_pil()
            tp = page.get_textpage()
            n = tp.count_chars()
            tp.get_text_range(0, n)
            for k in range(n):
                tp.get_charbox(k)
            pages += 1
        pdf.close()
    return pages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pdfs", type=int, default=40)
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--images", type=int, default=80)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    from cluster.connect import storage_for
    from cluster.spec import parse_spec
    from pipelines.stages import curate

    with tempfile.TemporaryDirectory(prefix="sphinx-x-bench-curate-") as tmp:
        folder = Path(tmp)
        paths = _pdfs(folder, args.pdfs, args.pages)
        _coco(folder, args.images)
        spec = parse_spec({"storage": {"uri": str(folder), "endpoint_url": None},
                           "cluster": {"head": {"cpus": cores}},
                           "curate": {"ocr": {"input": "docs"},
                                      "som": {"annotations": "coco/instances.json", "images": "coco/images"},
                                      "block_size": 8, "concurrency": cores}})
        dpi = spec.curate.ocr.dpi
        out: dict = {"machine": f"{cores} CPUs", "pdfs": args.pdfs, "pages_per_pdf": args.pages, "dpi": dpi,
                     "images": args.images}

        import pypdfium2  # noqa: F401 - the import is not part of either loop's time

        from actors.curate import ocr as _warm  # noqa: F401

        t = time.perf_counter()
        pages = _plain_pdfium(paths, dpi)
        plain = pages / (time.perf_counter() - t)

        from actors.curate.ocr import OcrConfig, curate_file
        from actors.curate.som import SomConfig, curate_image

        storage = storage_for(spec)
        config = OcrConfig.from_spec(spec)
        t = time.perf_counter()
        kept = 0
        for path in paths:
            kept += sum(o.reason is None for o in curate_file({"id": path.name, "uri": str(path), "kind": "pdf"}, config,
                                                              storage))
        ours_one = pages / (time.perf_counter() - t)

        t = time.perf_counter()
        curate.run_stage(spec, kind="ocr", force=True)  # Ray starts inside (reported, not used for the rate)
        wall_first = time.perf_counter() - t
        t = time.perf_counter()
        m = curate.run_stage(spec, kind="ocr", force=True)["ocr"]  # Ray already up: the stage alone
        stage = m["items"] / (time.perf_counter() - t)
        out["ocr"] = {
            "pages": pages, "samples": m["samples"], "quarantined": m["quarantined"],
            "a_plain_pypdfium2_loop_pages_s": round(plain, 1),
            "b_curate_file_one_process_pages_s": round(ours_one, 1),
            "c_stage_pages_s": round(stage, 1), "c_stage_pages_s_per_core": round(stage / cores, 1),
            "c_first_run_incl_ray_start_s": round(wall_first, 1), "c_phases_s": m["phases"],
            "c_blocks_phase_pages_s_per_core": round(m["items"] / m["phases"]["blocks"] / cores, 1),
            "c_in_worker_pages_s_per_core": round(m["items"] / m["phases"]["workers_busy"], 1),
            "ratio_c_per_core_vs_a": round(stage / cores / plain, 2),
            "ratio_c_per_core_vs_b": round(stage / cores / ours_one, 2),
            "ratio_c_in_worker_vs_b": round(m["items"] / m["phases"]["workers_busy"] / ours_one, 2),
        }

        coco = json.loads((folder / "coco" / "instances.json").read_text())
        from actors.curate.regions import index_coco

        idx = index_coco(coco)
        som_config = SomConfig(section=spec.curate.som, categories=idx["categories"], max_image_bytes=2**26,
                               max_image_pixels=10**8)
        t = time.perf_counter()
        for img in idx["images"]:
            curate_image({"id": f"som:{img['id']}", "image": str(folder / "coco" / "images" / img["file_name"]),
                          "width": img["width"], "height": img["height"], "annotations": idx["by_image"][img["id"]]},
                         som_config, storage)
        som_one = len(idx["images"]) / (time.perf_counter() - t)
        t = time.perf_counter()
        m = curate.run_stage(spec, kind="som", force=True)["som"]
        som_stage = m["samples"] / (time.perf_counter() - t)
        out["som"] = {"images": m["items"], "marked": m["samples"], "marks": m["counts"].get("regions_marked"),
                      "d_curate_image_one_process_images_s": round(som_one, 1),
                      "e_stage_marked_images_s": round(som_stage, 1),
                      "e_stage_per_core": round(som_stage / cores, 1), "e_phases_s": m["phases"],
                      "e_in_worker_images_s_per_core": round(m["samples"] / m["phases"]["workers_busy"], 1),
                      "ratio_e_per_core_vs_d": round(som_stage / cores / som_one, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
