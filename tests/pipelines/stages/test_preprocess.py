"""preprocess end to end on the embedded S3: every kind of bad row, odd images, re-run, 2 nodes.

One generated dataset (four sources: JSONL with every bad-row kind, a JSON array repeated
by ratio 2, WebDataset tar shards, Parquet with image bytes and ratio 0.5) goes through the
real Ray Data graph twice: on the shared local Ray (quarantine over the threshold: exit
non-zero, but shards and manifest written), then re-run with --force through the CLI on a
simulated 2-node cluster (byte-identical shards, stale ones gone).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from models.conversation import tokenize_conversation
from models.stored_image import row_views
from models.tiling import TileSpec, load_and_tile

MAX_PIXELS = 1_000_000


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


def _images() -> dict[str, bytes]:
    """The odd-but-valid image zoo plus the bad ones."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 80x40, shown 40x80
    rgba = _noise(50, 30, seed=1).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((50, 30)))
    palette = _noise(40, 40, seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good = _jpeg(_noise(90, 60, seed=3))
    return {
        "rgb.jpg": good,
        "rgba.png": _png(rgba),
        "cmyk.jpg": _jpeg(_noise(64, 48, "CMYK", seed=4)),
        "gray.png": _png(_noise(30, 70, "L", seed=5)),
        "palette.png": _png(palette),
        "exif.jpg": _jpeg(_noise(80, 40, seed=6), exif=exif.tobytes()),
        "one.png": _png(Image.new("RGB", (1, 1), (200, 10, 10))),
        "pano.jpg": _jpeg(_noise(400, 24, seed=7)),
        "truncated.jpg": good[: len(good) // 2],
        "bomb.png": _png(Image.new("L", (2000, 1000))),  # 2 MP > MAX_PIXELS, tiny file
    }


GOOD_IMAGES = ["rgb.jpg", "rgba.png", "cmyk.jpg", "gray.png", "palette.png", "exif.jpg", "one.png", "pano.jpg"]


def _turns(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _mix_lines() -> tuple[list[str], Counter]:
    """JSONL of source `mix`: good rows of every image kind, text-only rows, and each bad kind."""
    lines = [json.dumps({"id": f"img-{n}", "image": n, "conversations": _turns("<image>\nWhat is this?", f"It is {n}.")})
             for n in GOOD_IMAGES]
    lines += [
        json.dumps({"id": "text-1", "conversations": _turns("Say hi.", "Hi there.")}),
        json.dumps({"id": "text-2", "conversations": _turns("2+2?", "4.") + _turns("And 3+3?", "6.")}),
        json.dumps({"id": "noph", "image": "rgb.jpg", "conversations": _turns("Describe.", "Noise.")}),
        '{"id": "broken", "conversations": [',
        json.dumps({"id": "nofield"}),
        json.dumps({"id": "nonstr", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "mismatch", "conversations": _turns("<image>\nWhat?", "Nothing.")}),
        json.dumps({"id": "missing", "image": "nope.jpg", "conversations": _turns("<image>\nWhat?", "x")}),
        # images that cannot be fetched for other reasons are quarantined, never fatal
        json.dumps({"id": "http", "image": "http://127.0.0.1:9/a.jpg", "conversations": _turns("<image>\nWhat?", "x")}),
        json.dumps({"id": "bucket", "image": "s3://no-such-bucket-sphinx-x/a.jpg",
                    "conversations": _turns("<image>\nWhat?", "x")}),
        json.dumps({"id": "trunc", "image": "truncated.jpg", "conversations": _turns("<image>\nWhat?", "x")}),
        json.dumps({"id": "bomb", "image": "bomb.png", "conversations": _turns("<image>\nWhat?", "x")}),
        json.dumps({"id": "long", "conversations": _turns("Tell a story.", "once upon a time " * 400)}),
    ]
    expected = Counter(invalid_json=1, bad_field=2, unknown_role=1, image_mismatch=1, missing_image=1, outside_root=1,
                       unsupported_image_uri=1, corrupt_image=1, too_many_pixels=1, too_long=1)
    return lines, expected


def _wds_tar(images: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        members = [("s1.jpg", images["rgb.jpg"]),
                   ("s1.json", json.dumps({"conversations": _turns("<image>\nCaption?", "Noise.")}).encode()),
                   ("s2.png", images["gray.png"]), ("s2.txt", b"a grey picture"),
                   ("s3.txt", b"text only caption")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(images: dict[str, bytes]) -> bytes:
    rows = [{"id": f"pq-{i}", "conversations": json.dumps(_turns("<image>\nWhat?" if i % 2 else "Hello?", f"Row {i}.")),
             "image": images["pano.jpg"] if i % 2 else None} for i in range(8)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("conversations", pa.string()), ("image", pa.binary())])), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(s3):
    """Upload the dataset once; returns (bucket prefix URI, image bytes, expected reasons of `mix`)."""
    import uuid

    from cluster.spec import StorageSection
    from cluster.storage import open_storage

    root = f"s3://sphinx-x-test/pre-{uuid.uuid4().hex[:8]}"
    storage = open_storage(StorageSection(uri=root, endpoint_url="embedded"))
    images = _images()
    for name, data in images.items():
        storage.write_bytes(f"data/images/{name}", data)
    lines, expected = _mix_lines()
    storage.write_bytes("data/mix.jsonl", "\n".join(lines).encode())
    arr = [{"image": "rgb.jpg", "conversations": _turns("<image>\nColour?", "Many.")},
           {"conversations": _turns("Name?", "Sphinx.")}]
    storage.write_bytes("data/arr.json", json.dumps(arr).encode())
    storage.write_bytes("data/wds/shard-000.tar", _wds_tar(images))
    storage.write_bytes("data/pq/part-0.parquet", _parquet(images))
    return root, images, expected


def _spec(make_spec, root: str, output: str, **data):
    sources = [
        {"name": "mix", "path": f"{root}/data/mix.jsonl", "image_root": f"{root}/data/images"},
        {"name": "arr", "path": f"{root}/data/arr.json", "image_root": f"{root}/data/images", "ratio": 2},
        {"name": "wds", "path": f"{root}/data/wds"},
        {"name": "pq", "path": f"{root}/data/pq", "ratio": 0.5},
    ]
    return make_spec(data={"sources": sources, "output": output, "max_seq_len": 512, "overflow": "quarantine",
                           "max_image_pixels": MAX_PIXELS, "rows_per_shard": 8, "concurrency": 2, **data})


def _files(storage, prefix: str) -> dict[str, bytes]:
    return {k: storage.read_bytes(k) for k in storage.list(prefix) if k.endswith(".parquet")}


def _read(storage, prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(io.BytesIO(b)) for _, b in sorted(_files(storage, prefix).items())
                             if "/errors/" not in _])


def test_preprocess_end_to_end(ray_local, make_spec, dataset, tmp_path):
    from cluster.storage import open_storage
    from pipelines.stages import preprocess

    root, images, expected = dataset
    spec = _spec(make_spec, root, "shards")
    storage = open_storage(spec.storage)
    assert not preprocess.is_complete(spec)

    # 1. too many bad rows for the default threshold: exit non-zero, but nothing is lost
    with pytest.raises(preprocess.QuarantineError, match="quarantined, over data.max_quarantine_fraction") as err:
        preprocess.run_stage(spec)
    m = json.loads(storage.read_bytes("shards/_manifest.json"))
    assert err.value.summary["rows_in"] == m["rows_in"]
    assert m["rows_in"] == m["rows_written"] + m["rows_quarantined"]
    assert Counter(m["quarantined_by_reason"]) == expected
    src = m["sources"]
    assert src["mix"]["rows_in"] == 22 and src["mix"]["rows_written"] == 11
    assert src["arr"]["rows_read"] == 2 and src["arr"]["rows_in"] == 4 and src["arr"]["rows_written"] == 4
    assert src["wds"]["rows_written"] == 3
    assert src["pq"]["rows_read"] == 8 and src["pq"]["rows_in"] + src["pq"]["subsampled_out"] == 8
    assert 0 < src["pq"]["rows_in"] < 8
    assert m["tokens"]["saved"] > 0 and m["tokens"]["image"] > 0 and m["flavour"] == "debug"

    # errors/ holds one row per quarantined copy, with the right reasons and stages
    errs = pa.concat_tables([pq.read_table(io.BytesIO(b)) for b in _files(storage, "shards/errors").values()])
    assert errs.column_names == ["id", "source", "stage", "reason", "detail"]
    assert Counter(errs.column("reason").to_pylist()) == expected
    by_id = {r["id"]: r for r in errs.to_pylist()}
    assert by_id["missing"]["stage"] == "fetch" and by_id["bomb"]["stage"] == "decode"
    assert by_id["http"]["reason"] == "unsupported_image_uri" and "no URL fetches" in by_id["http"]["detail"]
    assert by_id["bucket"]["stage"] == "parse" and "no-such-bucket-sphinx-x" in by_id["bucket"]["detail"]
    assert by_id["long"]["stage"] == "tokenize" and by_id["role"]["stage"] == "parse"
    assert all(r["detail"] for r in errs.to_pylist())

    # good rows decode back to the tiles models.tiling gives directly
    shards = _read(storage, "shards")
    assert shards.num_rows == m["rows_written"]
    assert [n for n in m["shards"]] == [f"part-{i:05d}.parquet" for i in range(len(m["shards"]))]
    tspec = TileSpec(grid=2, tile_size=shards.column("tile_size")[0].as_py(), mean_u8=tuple(m["tiling"]["mean_u8"]))
    rows = {r["id"]: r for r in shards.to_pylist()}
    for name in GOOD_IMAGES:
        r = rows[f"img-{name}"]
        t = load_and_tile(images[name], tspec, max_pixels=MAX_PIXELS)
        views = np.frombuffer(row_views(r["images"], r["plans"], r["kept"], tspec), np.uint8).reshape(t.views.shape)
        np.testing.assert_array_equal(views, t.views)
        assert r["kept"] == t.kept.tolist() and r["view_counts"] == [len(t.views)]
        assert r["image_tokens"] == r["input_ids"].count(4)  # <image> id
        assert r["num_tokens"] == len(r["input_ids"]) == len(r["labels"]) <= 512
    assert rows["img-pano.jpg"]["kept"] == [True, True, False, False]
    assert rows["img-exif.jpg"]["kept"] == [True, False, True, False]  # rotated: tall
    assert rows["text-1"]["images"] == [] and rows["text-1"]["image_tokens"] == 0
    assert [r["source"] for r in shards.to_pylist()] == sorted(
        [r["source"] for r in shards.to_pylist()], key=["mix", "arr", "wds", "pq"].index)

    # 2. a re-run (--force, through the CLI, on a simulated 2-node cluster) replaces the old
    #    shards, deletes stale ones and writes byte-identical files; a plain run then skips.
    #    The cluster lives in a child process: a Ray `Cluster` started and shut down in this
    #    worker left a GCS client behind that ended the worker ~60 s later ("Failed to connect
    #    to GCS within 60 seconds", BENCHMARKS.md), whichever test it was running then.
    import ray

    from child_python import last_line

    first = _files(storage, "shards")
    storage.write_bytes("shards/part-00099.parquet", b"stale")
    ray.shutdown()  # the session's Ray gives its CPUs to the two nodes
    spec2 = _spec(make_spec, root, "shards", max_quarantine_fraction=0.9)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec2.model_dump(mode="json"), "storage": spec.storage.model_dump(mode="json")}))
    two_nodes = f"""
import ray
from ray.cluster_utils import Cluster
from cluster.storage import embedded_worker_env
from pipelines.cli import main
cluster = Cluster()
try:
    cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={{"env_vars": embedded_worker_env({storage.endpoint_url!r})}})
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    rc = main(["preprocess", {str(path)!r}, "--force"])
finally:
    ray.shutdown()
    cluster.shutdown()
print("nodes", nodes, "rc", rc)
"""
    assert last_line(two_nodes, timeout=600) == "nodes 2 rc 0"
    assert _files(storage, "shards") == first
    loose = spec.model_copy(update={"data": spec2.data})  # spec's storage, spec2's limit
    assert preprocess.run_stage(loose)["skipped"] is True
    assert not preprocess.is_complete(spec)  # over spec's stricter limit: not complete there


def test_published_weights_bring_their_tokenizer_and_the_vocab_follows_it(ray_local, make_spec):
    """model.weights given: preprocess uses the weights' own tokenizer (a sentencepiece
    tokenizer.model here), never a freshly trained one; <image> is added, so it has one token more
    than the LLM's vocab (Llama: 32001 vs 32000), which is accepted: the vocab follows it."""
    import io as _io

    import sentencepiece as spm

    from cluster.connect import storage_for
    from models.weights.hf_llm import load_llm_tokenizer
    from pipelines.stages import preprocess

    texts = ["a cat on a mat", "the dog sat on the log", "hello world", " Human: Assistant: ###"] * 50
    out = _io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2, hard_vocab_limit=False)
    spec0 = make_spec()
    storage = storage_for(spec0)
    storage.write_bytes("weights/llm/tokenizer.model", out.getvalue())
    storage.write_bytes("weights/llm/tokenizer_config.json", json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}).encode())
    storage.write_bytes("weights/llm/model.safetensors", b"not read by preprocess")
    rows = [{"id": f"t{i}", "conversations": _turns(f"hello {w}", f"the {w} sat")} for i, w in enumerate(["cat", "dog"])]
    storage.write_bytes("src/rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir("weights/llm", tmp)
        expected = load_llm_tokenizer(tmp)
    n_spm = len(expected) - 1  # without the <image> load_llm_tokenizer adds
    spec = make_spec(storage=spec0.storage.model_dump(), data={"sources": [{"name": "t", "path": "src/rows.jsonl"}]},
                     model={"flavour": "debug", "weights": "weights", "overrides": {"llm": {"vocab_size": n_spm}}})
    summary = preprocess.run_stage(spec)
    assert summary["rows_written"] == 2 and summary["vocab_size"] == n_spm + 1
    shards = _read(storage, "shards")
    first = shards.to_pylist()[0]
    assert first["input_ids"] == tokenize_conversation(rows[0]["conversations"], expected, max_seq_len=512).input_ids


def _rows_of(storage, m: dict, prefix: str) -> list[dict]:
    return [r for name in m["shards"] for r in pq.read_table(io.BytesIO(storage.read_bytes(f"{prefix}/{name}"))).to_pylist()]


def test_a_killed_run_resumes_and_writes_what_an_uninterrupted_run_writes(ray_local, make_spec, tmp_path):
    """The driver is SIGKILLed (its Ray job and actors die with it) once a few blocks are done; a
    second run reuses those blocks, does the rest, and writes the same shards and manifest counts
    as an uninterrupted run, row for row (no row twice, none lost)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    from cluster.storage import open_storage
    from pipelines.stages import preprocess

    spec0 = make_spec()
    storage = open_storage(spec0.storage)
    records = []
    for i in range(40):  # one row per block: 40 blocks, each a large-ish image to decode
        storage.write_bytes(f"src/images/{i}.png", _png(_noise(640, 480 - 5 * i, seed=i)))
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": _turns("<image>\nWhat?", f"Thing {i}.")})
    records.append({"id": "bad", "image": "nope.png", "conversations": _turns("<image>\nWhat?", "x")})
    storage.write_bytes("src/rows.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())

    def spec_for(output):
        return make_spec(storage=spec0.storage.model_dump(), data={
            "sources": [{"name": "s", "path": "src/rows.jsonl", "image_root": "src/images"}],
            "output": output, "rows_per_shard": 1, "concurrency": 1, "max_quarantine_fraction": 0.5})

    whole = preprocess.run_stage(spec_for("whole"))
    assert whole["rows_reused"] == 0

    spec = spec_for(str(tmp_path / "resumed"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    child = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "preprocess", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    books = lambda: list((tmp_path / "resumed" / "_tmp").rglob("*.book.parquet"))  # noqa: E731
    deadline = time.monotonic() + 180
    try:
        while len(books()) < 4 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    done = len(books())
    assert 4 <= done < 41 and not (tmp_path / "resumed" / "_manifest.json").exists(), done

    again = preprocess.run_stage(spec)
    assert done <= again["rows_reused"] < again["rows_read"] == 41
    for key in ("rows_in", "rows_written", "rows_quarantined", "quarantined_by_reason", "tokens", "image_bytes",
                "shards", "error_shards"):
        assert again[key] == whole[key], key
    assert _rows_of(storage, again, str(tmp_path / "resumed")) == _rows_of(storage, whole, "whole")
    ids = [r["id"] for r in _rows_of(storage, again, str(tmp_path / "resumed"))]
    assert ids == [f"r{i}" for i in range(40)]
    assert not (tmp_path / "resumed" / "_tmp").exists()
    # --force redoes everything
    assert preprocess.run_stage(spec, force=True)["rows_reused"] == 0

    # a tiler actor killed mid-run: Ray Data restarts it, retries its block under the same name
    import threading

    from ray.util.state import list_actors

    spec = spec_for(str(tmp_path / "worker"))
    out: dict = {}
    run = threading.Thread(target=lambda: out.update(m=preprocess.run_stage(spec)))
    run.start()
    books = lambda: list((tmp_path / "worker" / "_tmp").rglob("*.book.parquet"))  # noqa: E731
    while len(books()) < 3 and run.is_alive():
        time.sleep(0.02)
    here = ray.get_runtime_context().gcs_address  # this session's Ray, not another on the machine
    tilers = [a for a in list_actors(address=here, filters=[("state", "=", "ALIVE")]) if "Tiler" in (a.class_name or "")
              or "MapWorker" in (a.class_name or "")]
    assert tilers, [a.class_name for a in list_actors(address=here)]
    os.kill(tilers[0].pid, signal.SIGKILL)
    run.join(300)
    # A block the killed actor had finished (its book written) but not yet handed back comes back
    # from its book on the retry, as after an interrupted run: at most the actor's blocks in flight
    # (Ray Data's default of 4 per actor). The shards are the same either way.
    assert not run.is_alive() and out["m"]["rows_reused"] <= 4, out.get("m")
    assert out["m"]["shards"] == whole["shards"] and out["m"]["rows_written"] == whole["rows_written"]
    assert _rows_of(storage, out["m"], str(tmp_path / "worker")) == _rows_of(storage, whole, "whole")


def test_duplicates_are_kept_once_within_and_across_sources_and_counted(ray_local, make_spec):
    from cluster.storage import open_storage
    from pipelines.stages import preprocess

    spec0 = make_spec()
    storage = open_storage(spec0.storage)
    x, y = _png(_noise(60, 40, seed=1)), _jpeg(_noise(40, 70, seed=2))
    for name, data in [("x.png", x), ("x-copy.png", x), ("y.jpg", y)]:
        storage.write_bytes(f"src/images/{name}", data)

    def jsonl(name, rows):
        storage.write_bytes(f"src/{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    ask = lambda q, a, img=None: {**({"image": img} if img else {}), "conversations": _turns(  # noqa: E731
        ("<image>\n" if img else "") + q, a)}
    jsonl("a", [{"id": "a1", **ask("What?", "A.", "x.png")}, {"id": "a2", **ask("What?", "A.", "x-copy.png")},
                {"id": "a3", **ask("Colour?", "Red.", "x.png")}, {"id": "a4", **ask("Hi", "Hello.")},
                {"id": "a5", **ask("Hi", "Hello.")}])
    jsonl("b", [{"id": "b1", **ask("Caption?", "Noise.", "x.png")}, {"id": "b2", **ask("What?", "A.", "y.jpg")},
                {"id": "b3", **ask("Caption?", "More noise.", "y.jpg")}])
    jsonl("c", [{"id": "c1", **ask("What?", "A.", "x.png")}, {"id": "c2", **ask("What?", "A.", "x.png")}])
    jsonl("d", [{"id": "d1", **ask("What?", "A.", "x.png")}, {"id": "d2", **ask("Hi", "Hello.")},
                {"id": "d3", **ask("New?", "Yes.", "y.jpg")}])
    src = lambda name, **kw: {"name": name, "path": f"src/{name}.jsonl", "image_root": "src/images", **kw}  # noqa: E731
    spec = make_spec(storage=spec0.storage.model_dump(), data={
        "sources": [src("a"), src("b", dedup="images"), src("c", dedup="off"), src("d", ratio=2)],
        "rows_per_shard": 2, "concurrency": 2})
    m = preprocess.run_stage(spec)
    s = m["sources"]
    assert (s["a"]["duplicate_samples"], s["a"]["rows_written"]) == (2, 3)  # a2 (same bytes), a5
    assert (s["b"]["duplicate_images"], s["b"]["duplicate_samples"], s["b"]["rows_written"]) == (2, 0, 1)  # b1, b3
    assert (s["c"]["duplicate_samples"], s["c"]["rows_written"]) == (0, 2)  # off: kept, still remembered
    assert (s["d"]["duplicate_samples"], s["d"]["rows_in"], s["d"]["rows_written"]) == (2, 2, 2)  # d1, d2; d3 twice
    assert (m["duplicate_samples"], m["duplicate_images"]) == (4, 2)
    records_in = 3 + 1 + 2 + 1  # d3 is one record written twice (ratio 2)
    assert m["rows_read"] == m["subsampled_out"] + m["duplicate_samples"] + m["duplicate_images"] + records_in == 13
    assert m["rows_in"] == m["rows_written"] == 3 + 1 + 2 + 2
    rows = _rows_of(storage, m, "shards")
    assert [r["id"] for r in rows] == ["a1", "a3", "a4", "b2", "c1", "c2", "d3", "d3"]
    assert "duplicates dropped: 4 samples, 2 by image" in preprocess.format_summary(m)
