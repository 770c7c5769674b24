"""Checkpoint loads run no code and only complete checkpoints are resumed from
(actors.train.checkpoints; docs/security.md, "Checkpoint loads" and "Atomic exports and checkpoints").

The DeepSpeed round trip runs in a fresh process (one gloo rank): DeepSpeed and torch.distributed
keep process-wide state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.train import checkpoints
from actors.train.checkpoints import incomplete, load_checkpoint, marker_name, weights_only_loads
from cluster.ports import free_port
from models.errors import UserError

ROOT = Path(__file__).parents[3]


class Evil:
    """Unpickling runs ``os.system``: what a planted checkpoint file would do."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def _evil_file(path: Path, flag: Path) -> Path:
    torch.save({"module": {"w": torch.zeros(2)}, "payload": Evil(flag)}, path)
    return path


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    flag = tmp_path / "pwned"
    evil = _evil_file(tmp_path / "mp_rank_00_model_states.pt", flag)
    with weights_only_loads("checkpoint x"), pytest.raises(UserError, match=r"refusing to load .*mp_rank_00"):
        torch.load(evil, map_location="cpu", weights_only=False)  # what DeepSpeed's engine asks for
    assert not flag.exists()
    assert torch.load is not None and torch.load.__module__.startswith("torch")  # restored after


def test_deepspeeds_own_classes_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "dyn": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False), "zero_stage": ZeroStageEnum.gradients,
                "state": {"exp_avg": torch.ones(3)}}, path)
    with weights_only_loads("checkpoint x"):
        out = torch.load(path, weights_only=False)
    assert out["zero_stage"] == ZeroStageEnum.gradients and isinstance(out["loss_scaler"], LossScaler)


class FakeEngine:
    """Loads every .pt under the tag the way DeepSpeed's TorchCheckpointEngine does."""

    def __init__(self):
        self.loaded = []

    def load_checkpoint(self, directory):
        tag = Path(directory, "latest").read_text().strip()
        for f in sorted(Path(directory, tag).glob("*.pt")):
            self.loaded.append(torch.load(f, map_location="cpu", weights_only=False))
        return directory, {"step": int(tag.removeprefix("step"))}


def _checkpoint(tmp_path: Path, world: int = 2, step: int = 4, evil_flag: Path | None = None) -> Path:
    d = tmp_path / "ckpt"
    tag = f"step{step:08d}"
    (d / tag).mkdir(parents=True)
    (d / "latest").write_text(tag)
    for rank in range(world):
        f = d / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if evil_flag is not None and rank == 1:
            _evil_file(f, evil_flag)
        else:
            torch.save({"optimizer_state_dict": {"x": torch.ones(2)}}, f)
        files = {"latest": 2, f"{tag}/{f.name}": f.stat().st_size}
        (d / marker_name(rank, world)).write_text(json.dumps({"rank": rank, "world": world, "files": files}))
    for rank in range(world):  # sizes as written
        m = d / marker_name(rank, world)
        obj = json.loads(m.read_text())
        obj["files"] = {k: (d / k).stat().st_size for k in obj["files"]}
        m.write_text(json.dumps(obj))
    return d


def test_a_complete_checkpoint_loads(tmp_path):
    engine = FakeEngine()
    assert load_checkpoint(engine, str(_checkpoint(tmp_path))) == (4, [])
    assert len(engine.loaded) == 2


def test_a_checkpoint_holding_a_malicious_pickle_is_refused(tmp_path):
    flag = tmp_path / "pwned"
    with pytest.raises(UserError, match=r"refusing to load .*zero_pp_rank_1"):
        load_checkpoint(FakeEngine(), str(_checkpoint(tmp_path, evil_flag=flag)))
    assert not flag.exists()


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / marker_name(1, 2)).unlink(), r"no marker from rank\(s\) \[1\] of 2"),
    (lambda d: [p.unlink() for p in d.glob("_rank*")], "no rank markers"),
    (lambda d: next(d.glob("step*/zero_pp_rank_1*")).unlink(), "listed by _rank00001-of-00002.json are missing"),
    (lambda d: next(d.glob("step*/zero_pp_rank_0*")).write_bytes(b"cut"), "bytes, _rank00000-of-00002.json says"),
    (lambda d: (d / "latest").write_text("../../../etc"), "not a step tag"),
])
def test_a_half_written_checkpoint_is_not_resumed_from(tmp_path, damage, why):
    d = _checkpoint(tmp_path)
    damage(d)
    engine = FakeEngine()
    with pytest.raises(UserError, match=rf"checkpoint .* is incomplete \(.*{why}"):
        load_checkpoint(engine, str(d))
    assert engine.loaded == []  # refused before anything was read


def test_incomplete_rules():
    m = lambda files: lambda name: json.dumps({"files": files}).encode()  # noqa: E731
    assert incomplete(["latest", "a.pt", "_rank00000-of-00001.json"], m({"a.pt": 1})) is None
    assert "several world sizes" in incomplete(["_rank00000-of-00001.json", "_rank00001-of-00002.json"], m({}))
    assert "unreadable marker" in incomplete(["_rank00000-of-00001.json"], lambda n: b"{")


def test_load_from_storage_refuses_dotdot_keys(s3, tmp_path):
    import uuid

    from cluster.spec import StorageSection
    from cluster.storage import open_storage

    storage = open_storage(StorageSection(uri=f"s3://sphinx-x-test/{uuid.uuid4().hex[:10]}"))
    key = f"{storage.root.key}/ckpt/../../../../escaped.pt"
    storage.client().put_object(Bucket=storage.bucket, Key=key, Body=b"x")
    storage.write_bytes("ckpt/latest", b"step00000001")
    with pytest.raises(UserError, match="refusing to download .*escaped.pt"):
        checkpoints.load_from_storage(FakeEngine(), storage, storage.uri_for("ckpt"))


DEEPSPEED_ROUND_TRIP = """
import os, sys, json, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from actors.train.checkpoints import save_checkpoint, load_checkpoint
from actors.upstream import no_cpu_shm_comm_build
no_cpu_shm_comm_build()  # as actors.train.engine does: else init compiles deepspeed_shm_comm (~60 CPU-s)

def engine(stage, bf16):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    cfg = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": stage}}, "bf16": {{"enabled": bf16}},
           "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-2, "torch_adam": True}}}},
           "scheduler": {{"type": "WarmupLR", "params": {{"warmup_num_steps": 2}}}}}}
    e, *_ = deepspeed.initialize(model=m, model_parameters=list(m.parameters()), config=cfg)
    return e

out = {{}}
for stage, bf16 in ((1, False), (2, True), (3, False)):
    a = engine(stage, bf16)
    x = torch.randn(1, 4).to(torch.bfloat16 if bf16 else torch.float32)
    for _ in range(2):
        a.backward(a(x).float().square().sum()); a.step()
    d = save_checkpoint(a, 2, [{{"step": 1}}, {{"step": 2}}], 0)
    b = engine(stage, bf16)
    step, hist = load_checkpoint(b, d)
    same = all(torch.equal(p.detach().float(), q.detach().float()) for p, q in zip(a.module.parameters(), b.module.parameters()))
    out[f"{{stage}}{{'bf16' if bf16 else ''}}"] = [step, len(hist), same, sorted(f for f in os.listdir(d) if f.startswith("_rank"))]
    a.destroy(); b.destroy()
print(json.dumps(out))
"""


def test_deepspeed_checkpoints_round_trip_with_weights_only_loads(tmp_path):
    code = DEEPSPEED_ROUND_TRIP.format(port=free_port())
    extensions = tmp_path / "torch_extensions"  # where a JIT-built DeepSpeed op would land
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not extensions.exists(), "a DeepSpeed op was compiled"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (step, hist, same, markers) in out.items():
        assert (step, hist, markers) == (2, 2, ["_rank00000-of-00001.json"]), name
