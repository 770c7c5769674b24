"""sphinx-x train on CPU with 2 workers: loss falls, MoE expert parallel export, resume, worker kill.

Shards come from pipelines/demo/synthetic_shards.py (small, learnable, written to the embedded S3 with
a manifest, as preprocess writes them).
"""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from cluster.layout import Layout
from models.errors import UserError
from pipelines.demo.synthetic_shards import write_shards

pytestmark = pytest.mark.slow


def _spec(make_spec, flavour="debug", max_seq_len=160, **train):
    """Packing on (the default): rows of at most 160 tokens pack the synthetic rows (48, 109 and
    145 tokens) about two to a row."""
    base = dict(workers=2, zero_stage=2, micro_batch=4, lr=2e-3, warmup_ratio=0.05, checkpoint_every=4,
                max_failures=0)
    return make_spec(model={"flavour": flavour}, train={**base, **train}, data={"max_seq_len": max_seq_len})


def _storage(spec):
    from cluster.connect import storage_for

    return storage_for(spec)


def _shards(storage, spec, flavour="debug", **kw):
    return write_shards(storage, Layout.from_spec(spec, storage.uri), flavour, **kw)


def _metrics(storage, spec):
    return [json.loads(x) for x in storage.read_bytes(f"{spec.train.output}/metrics.jsonl").decode().splitlines()]


def _export_matches_trained_logits(storage, spec):
    from models.weights.model_dir import load_model_dir

    out = spec.train.output
    assert storage.exists(f"{out}/export/_SUCCESS")
    check = torch.load(io.BytesIO(storage.read_bytes(f"{out}/export_check.pt")))
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model_dir(storage.download_dir(storage.uri_for(out, "export"), tmp))
    batch = check["batch"]
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                       views=batch.get("views"), kept=batch.get("kept"), position_ids=batch.get("position_ids")).logits
    torch.testing.assert_close(logits.float(), check["logits"], atol=2e-4, rtol=1e-4)


def test_dense_loss_falls_checkpoints_and_export_on_s3(ray_local, make_spec):
    from pipelines.stages.train import is_complete, list_checkpoints, run_stage

    spec = _spec(make_spec, steps=50, checkpoint_every=25)
    storage = _storage(spec)
    _shards(storage, spec, "debug", n_rows=32)
    summary = run_stage(spec)
    assert summary["step"] == 50 and summary["export_max_abs_diff"] < 1e-4
    history = _metrics(storage, spec)
    assert [m["step"] for m in history] == list(range(1, 51))
    first = sum(m["loss"] for m in history[:5]) / 5
    last = sum(m["loss"] for m in history[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert sum(m["saved_tokens"] for m in history) > 0 and all(m["lr"] >= 0 for m in history)
    assert storage.read_bytes(f"{spec.train.output}/loss.png")[:4] == b"\x89PNG"
    assert [s for s, _ in list_checkpoints(spec, storage)] == [25, 50]
    assert all(u.startswith("s3://") for _, u in list_checkpoints(spec, storage))
    assert is_complete(spec)
    _export_matches_trained_logits(storage, spec)
    assert run_stage(spec)["skipped"] is True  # complete: not trained again


@pytest.mark.parametrize("zero", [2, 3])
def test_moe_expert_parallel_trains_and_export_equals_full_model(ray_local, make_spec, zero):
    from pipelines.stages.train import run_stage

    spec = _spec(make_spec, "debug-moe", steps=4, zero_stage=zero, expert_parallel=2)
    storage = _storage(spec)
    _shards(storage, spec, "debug-moe", n_rows=16)
    summary = run_stage(spec)
    assert summary["step"] == 4 and summary["expert_parallel"] == 2
    history = _metrics(storage, spec)
    assert all(m["loss"] == m["loss"] for m in history)  # finite, not NaN
    # train.aux_loss_weight (0.01) is the load-balancing coefficient, and the experts' router
    # loss reaches the loss under expert parallel
    assert all(m["aux_loss"] > 0 for m in history)
    assert all(abs(m["loss"] - m["lm_loss"] - 0.01 * m["aux_loss"]) < 1e-5 for m in history)
    _export_matches_trained_logits(storage, spec)
    # on demand from a checkpoint, too
    exported = run_stage(spec, export_from="latest")
    assert exported["step"] == 4 and storage.exists(f"{spec.train.output}/export/_SUCCESS")


def _run_with_kill(spec, at_step):
    """Train; SIGKILL rank 0's worker once it reports ``at_step`` (the driver's progress feed)."""
    from pipelines.stages.train import run_stage

    killed: list = []

    def on_step(item):
        if not killed and item["step"] >= at_step:
            os.kill(item["pid"], signal.SIGKILL)
            killed.append((item["pid"], item["step"]))

    try:
        return run_stage(spec, export=False, on_step=on_step), killed
    finally:
        assert killed, "the worker was never killed"


def test_worker_killed_mid_run_completes_from_last_checkpoint(ray_local, make_spec):
    # enough steps that the kill (polled every 0.1 s) lands mid-run at several steps/s, with
    # checkpoints well before it: Ray Train registers a reported checkpoint asynchronously, so
    # the newest one may not be restorable yet when a worker dies a second after saving it
    spec = _spec(make_spec, steps=60, checkpoint_every=10, max_failures=1)
    storage = _storage(spec)
    _shards(storage, spec, "debug", n_rows=16)
    summary, killed = _run_with_kill(spec, at_step=35)
    assert killed and summary["step"] == 60
    assert killed[0][1] < 60, f"the kill came after the last step: {killed}"
    history = _metrics(storage, spec)
    assert [m["step"] for m in history] == list(range(1, 61))  # no gap, no repeat
    restored = history[-1]["restored_from"]
    assert restored in (10, 20, 30, 40, 50) and restored <= killed[0][1], (killed, restored)


def test_resume_after_a_stop_continues_step_count_and_curve_under_zero3(ray_local, make_spec):
    """A run stopped by a killed worker (no retries left) is resumed by the next run: the step
    count and the loss curve go on. Under ZeRO-3, which partitions every parameter (frozen encoders
    too) and gathers it in its module's own forward: ranks with and without images in a
    micro-batch must still run the same modules, and the export equals the full model."""
    from pipelines.stages.train import run_stage

    spec = _spec(make_spec, steps=8, zero_stage=3, checkpoint_every=3, max_failures=0)
    storage = _storage(spec)
    _shards(storage, spec, "debug", n_rows=16)
    with pytest.raises(Exception):
        _run_with_kill(spec, at_step=4)  # the run stops: no retries left
    before = _metrics(storage, spec)
    stopped = before[-1]["step"]
    assert stopped in (3, 6) and [m["step"] for m in before] == list(range(1, stopped + 1))
    summary = run_stage(spec)
    assert summary["resumed_from"] == stopped and summary["step"] == 8
    assert summary["export_max_abs_diff"] < 1e-4
    after = _metrics(storage, spec)
    assert [m["step"] for m in after] == list(range(1, 9))
    assert all(m["loss"] == m["loss"] for m in after)  # no NaN
    assert after[:stopped] == before  # the curve continues, the first part unchanged
    assert all(m["restored_from"] == stopped for m in after[stopped:])
    _export_matches_trained_logits(storage, spec)


def test_shards_for_another_model_are_refused_on_the_driver(make_spec):
    from pipelines.stages.train import run_stage

    spec = make_spec(model={"flavour": "debug", "overrides": {"grid": 3}}, train={"workers": 2, "steps": 2})
    storage = _storage(spec)
    _shards(storage, spec, "debug", n_rows=8)
    with pytest.raises(UserError, match=r"grid: shards 2 vs model 3"):
        run_stage(spec)  # before any Ray: this test has no Ray fixture


def test_no_manifest_is_a_clear_error(make_spec):
    from pipelines.stages.train import run_stage

    with pytest.raises(UserError, match="no preprocess manifest .* run `sphinx-x preprocess SPEC` first"):
        run_stage(make_spec())


def test_absolute_and_s3_outputs_are_taken_as_given_through_preprocess_and_train(ray_local, make_spec, tmp_path):
    """data.output an absolute local path and train.output an s3:// URI outside storage.uri: every
    file lands where the setting says (cluster.layout's one rule), none under the storage root."""
    from pipelines.demo import synthetic
    from pipelines.stages import preprocess
    from pipelines.stages.train import run_stage

    where = synthetic.write(synthetic.generate(12, 0, seed=5), tmp_path / "src")
    spec = make_spec(data={"sources": [{"name": "syn", "path": where["train"], "image_root": where["image_root"]}],
                           "output": str(tmp_path / "shards"), "rows_per_shard": 6, "concurrency": 1},
                     model={"flavour": "debug"})
    elsewhere = f"s3://sphinx-x-test/elsewhere-{os.getpid()}-{tmp_path.name}"
    spec = make_spec(**{**spec.model_dump(mode="json"), "train": {
        "workers": 1, "steps": 2, "checkpoint_every": 2, "micro_batch": 2, "max_failures": 0,
        "output": elsewhere, "packing": False}})  # 12 rows would pack into one 2048-token row
    storage = _storage(spec)
    summary = preprocess.run_stage(spec)
    assert summary["rows_written"] > 0
    assert (tmp_path / "shards" / "_manifest.json").exists() and (tmp_path / "shards" / "tokenizer").is_dir()
    assert sorted(p.name for p in (tmp_path / "shards").glob("part-*.parquet")) == summary["shards"]
    trained = run_stage(spec)
    assert trained["step"] == 2 and trained["export"] == f"{elsewhere}/export"
    assert storage.exists(f"{elsewhere}/export/_SUCCESS") and storage.exists(f"{elsewhere}/summary.json")
    assert storage.list("") == []  # nothing under the storage root itself


def test_shards_without_the_release_resampling_are_refused_by_name():
    """Shards tiled before a release flavour resampled as the release does carry no ``resample``: training
    names the difference instead of failing on the missing key (no Ray)."""
    from dataclasses import replace

    from actors.data.manifest import Manifest, Tiling
    from models.flavours import from_name
    from pipelines.stages.train import check_manifest

    release = from_name("sphinx-moe-1k")
    m = Manifest.from_json(_manifest_json(Tiling.from_flavour(replace(release, resample="project"))))
    with pytest.raises(UserError, match=r"tiled for another model .*resample: shards None vs model 'release'"):
        check_manifest(m, release, "s3://b/shards", weights=True)


def _manifest_json(tiling) -> str:
    from actors.data.manifest import (SHARD_FORMAT, Counts, ImageBytes, Manifest, QuarantineGate, TokenizerFacts,
                                      Tokens)

    counts = Counts(rows_read=1, subsampled_out=0, duplicate_samples=0, duplicate_images=0, rows_in=1, rows_written=1,
                    rows_quarantined=0, rows_truncated=0, quarantined_by_reason={})
    return Manifest(flavour="sphinx-moe-1k", shard_format=SHARD_FORMAT, shards=("part-00000.parquet",),
                    error_shards=(), tiling=tiling, tokenizer=TokenizerFacts(path="tokenizer", vocab_size=400,
                                                                              image_token_id=4),
                    max_seq_len=4096, overflow="truncate", max_image_pixels=64_000_000, counts=counts, rows_reused=0,
                    tokens=Tokens(text=1, image=1, saved=0), image_bytes=ImageBytes(source=1, stored=1, codec="webp"),
                    sources={}, code_version="0", seconds=0.0, quarantine_gate=QuarantineGate(0.5, True)).to_json()


def test_the_progress_thread_is_out_of_ray_when_training_ends():
    """The progress feed's thread is joined, not left waiting in a queue ``get``, when the stage's
    block ends: the caller may call ``ray.shutdown`` next, and a thread inside Ray's core worker then
    ends the process (pipelines.upstream.fit_interruptibly). A slow ``get`` (a starved queue actor:
    3 s) is waited for (no Ray)."""
    import threading
    import time

    from ray.util.queue import Empty

    from pipelines.stages.train import _follow

    class SlowQueue:
        actor = None

        def get(self, timeout):
            time.sleep(3)
            raise Empty

    with _follow(SlowQueue(), total=1, on_step=None) as follow:
        time.sleep(0.2)  # the thread is inside its first get
    assert not follow.thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "train-progress"]
