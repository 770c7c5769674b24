"""The training worker: loss weighting across ranks, the collectives' device, ZeRO-3 building,
loading and export, the shared fp32 master (two real gloo processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cluster.ports import free_port
from models.flavours import from_name
from models.sphinx import SphinxX

IGNORE = -100


def _two_ranks(target, *args, timeout: float = 300) -> list:
    """``target(rank, port, *args, out)`` in 2 spawned processes (one gloo group on ``port``);
    returns what each rank put on ``out``."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


def _rank(rank: int, port: int, counts: list, out) -> None:
    import torch.distributed as dist

    from actors.train.collectives import token_share

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, token_share(counts[rank], 2, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_token_share_weighs_every_supervised_token_alike():
    counts = [1, 3]  # supervised target tokens on rank 0 and rank 1
    shares = dict(_two_ranks(_rank, counts, timeout=60))
    assert shares == {0: 0.25, 1: 0.75}


def test_weighted_rank_losses_equal_the_global_token_mean():
    """Σ_r lm_loss_r · share_r is the mean over all supervised tokens (what one process computes)."""
    from models.conversation import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a b c d e f"], 300)
    torch.manual_seed(0)
    model = SphinxX.from_flavour(from_name("debug"), tok).eval()
    ids = torch.randint(5, 200, (2, 12))
    labels = ids.clone()
    labels[0, :10] = IGNORE  # row 0: 2 targets; row 1: 11
    with torch.no_grad():
        whole = model(input_ids=ids, labels=labels).lm_loss
        parts = [model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]) for i in range(2)]
    n = [p.num_tokens for p in parts]  # what the train loop hands token_share
    assert n == [2, 11]
    weighted = sum(p.lm_loss * k / sum(n) for p, k in zip(parts, n))
    plain = sum(p.lm_loss for p in parts) / 2
    assert torch.allclose(weighted, whole, atol=1e-5)
    assert not torch.allclose(plain, whole, atol=1e-3)


class _Recorded(Exception):
    """Raised by the recording collectives once they have seen the tensor."""


def _recording_collectives(monkeypatch, seen: list):
    import torch.distributed as dist

    def record(name):
        def collective(*args, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)] + [t for a in args if isinstance(a, list)
                                                                   for t in a if torch.is_tensor(t)]
            seen.extend((name, t.device) for t in tensors)
            raise _Recorded(name)
        return collective

    monkeypatch.setattr(dist, "all_reduce", record("all_reduce"))
    monkeypatch.setattr(dist, "all_gather", record("all_gather"))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)


def test_every_collective_gets_the_engines_device(monkeypatch):
    """token_share, the step sums and the MoE export gathers hand the collective tensors on the
    engine's device. A device no CPU tensor is on (meta) stands in for cuda: a tensor built on
    the host (as NCCL would reject) shows up as cpu here."""
    import pytest

    from actors.train.consolidate import gather_experts
    from actors.train.collectives import all_reduce_sums, token_share

    device = torch.device("meta")
    seen: list = []
    _recording_collectives(monkeypatch, seen)
    for call in (lambda: token_share(5, 2, device), lambda: all_reduce_sums([1.0, 2.0, 3.0], device),
                 lambda: gather_experts(torch.ones(2, 3), None, device)):
        with pytest.raises(_Recorded):
            call()
    assert [name for name, _ in seen] == ["all_reduce", "all_reduce", "all_gather", "all_gather", "all_gather"]
    assert {d for _, d in seen} == {device}


def test_the_loop_reduces_on_the_engine_device():
    """The training loop hands every collective helper the engine's device (read from its source:
    the loop itself needs Ray Train; tests/pipelines/stages/test_train.py runs it)."""
    import ast
    import inspect

    from actors.train import worker as train_worker

    source = inspect.getsource(train_worker)
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", None)
             in {"all_reduce_sums", "token_share"}]
    assert len(calls) == 2
    for call in calls:
        assert ast.unparse(call.args[-1]) == "engine.device"
    assert "dist.all_reduce" not in source


def _zero3_rank(rank: int, port: int, out) -> None:
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from actors.train.consolidate import consolidated_state_dict, scatter_recipes
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import construct_model
        from cluster.spec import TrainSection
        from models.conversation import train_bpe_tokenizer

        tok = train_bpe_tokenizer(["a b c d e f"], 300)
        flavour = from_name("debug")
        train = TrainSection(workers=2, zero_stage=3, micro_batch=1, steps=2)
        model = construct_model(flavour, tok, train, deepspeed_config(train, flavour, world_size=2, total_steps=2))
        partitioned = all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in model.parameters())
        local = sum(p.ds_tensor.numel() for p in model.parameters())
        total = sum(p.ds_numel for p in model.parameters())
        source = None
        if rank == 0:
            torch.manual_seed(7)
            source = SphinxX.from_flavour(flavour, tok)
        from models.weights.stream import LazyTensors

        recipes = LazyTensors.from_state(source.state_dict()).recipes() if rank == 0 else None
        assert scatter_recipes(model, recipes, what="rank 0's model") == len(list(model.parameters()))
        engine = SimpleNamespace(module=model, device=torch.device("cpu"), zero_optimization_stage=lambda: 3)
        state = consolidated_state_dict(engine, dtype=torch.bfloat16)
        same = None
        if rank == 0:
            want = source.state_dict()
            same = all(torch.equal(state[k].float(), want[k].to(torch.bfloat16).float())
                       for k, _ in source.named_parameters()) and state["llm.lm_head.weight"].dtype == torch.bfloat16
        out.put((rank, partitioned, local / total, state is None, same))
    finally:
        dist.destroy_process_group()


def test_zero3_builds_partitioned_takes_rank0_weights_and_gathers_them_back():
    """ZeRO-3: built under zero.Init, every parameter is a partition from the start (about half
    of the elements per rank, no full tensor); rank 0's weights go in parameter by parameter and
    come back gathered on rank 0 only, in the export dtype."""
    results = {r[0]: r[1:] for r in _two_ranks(_zero3_rank)}
    for rank in (0, 1):
        partitioned, share, _, _ = results[rank]
        assert partitioned and 0.45 < share < 0.56
    assert results[0][2:] == (False, True)  # rank 0: the state, equal to its source
    assert results[1][2:] == (True, None)  # rank 1: nothing kept


def _published_llm(src) -> dict:
    """src/llm: an HF Llama of the debug shapes with its tokenizer (src/tok: the shards'); its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.conversation import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a b c d e f", " Human: hi\n### Assistant: red"] * 5, 300)
    tok.save_pretrained(str(src / "llm"))
    torch.manual_seed(3)
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in from_name("debug").llm.items() if k != "vocab_size"},
                                       vocab_size=len(tok), rope_theta=5e5, tie_word_embeddings=False))
    llm.save_pretrained(str(src / "llm"))
    tok.save_pretrained(str(src / "tok"))
    return {k: v.clone() for k, v in llm.state_dict().items()}


def _zero3_weights_rank(rank: int, port: int, src, out) -> None:
    """build_model under ZeRO-3 with published weights: the largest number of source tensors
    alive at once on this rank, the loaded LLM gathered on rank 0, and the error a bad flavour gets."""
    import os
    import weakref
    from dataclasses import replace
    from types import SimpleNamespace

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from actors.train.consolidate import consolidated_state_dict
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import build_model
        from actors.train.worker import TrainWorkerConfig
        from cluster.spec import TrainSection
        from models.errors import UserError
        from models.weights.stream import LazyTensors

        alive, peak, reads = [0], [0], [0]
        original = LazyTensors.read

        def counted(self, key):
            tensor = original(self, key)
            alive[0] += 1
            reads[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
            return tensor

        LazyTensors.read = counted
        train = TrainSection(workers=2, zero_stage=3, micro_batch=1, steps=2)
        flavour = from_name("debug")
        config = TrainWorkerConfig(train=train, storage=None, flavour=flavour, layout=None, total_steps=2,
                                   tokenizer_uri=str(src / "tok"), weights_uri=str(src))
        storage = SimpleNamespace(download_dir=lambda uri, tmp: uri)
        model, _ = build_model(config, storage, deepspeed_config(train, flavour, world_size=2, total_steps=2))
        engine = SimpleNamespace(module=model, device=torch.device("cpu"), zero_optimization_stage=lambda: 3)
        state = consolidated_state_dict(engine)
        same = None
        if state is not None:  # rank 0: the gathered LLM against the file (new vocabulary rows at the end)
            from safetensors.torch import load_file

            want = load_file(str(src / "llm" / "model.safetensors"))
            same = sorted(want) == sorted(k[4:] for k in state if k.startswith("llm.")) and all(
                torch.equal(state[f"llm.{k}"][: v.shape[0]], v) for k, v in want.items())
        wide = replace(config, flavour=from_name("debug", llm={"intermediate_size": 96}))
        try:
            build_model(wide, storage, deepspeed_config(train, wide.flavour, world_size=2, total_steps=2))
            error = None
        except UserError as err:
            error = str(err)
        out.put((rank, peak[0], reads[0], same, error))
    finally:
        dist.destroy_process_group()


def test_zero3_streams_published_weights_one_tensor_at_a_time(tmp_path):
    """ZeRO-3 with model.weights: rank 0 reads the files one tensor at a time straight into the
    partitioned model (never a plain copy), rank 1 reads nothing; the gathered LLM is the file's
    (vocabulary rows added at the end); a flavour the weights do not fit fails on both ranks."""
    n_tensors = len(_published_llm(tmp_path))
    results = {r[0]: r[1:] for r in _two_ranks(_zero3_weights_rank, tmp_path)}
    peak0, reads0, same, error0 = results[0]
    peak1, reads1, _, error1 = results[1]
    assert reads0 == n_tensors and peak0 == 1  # one tensor at a time, each read once
    assert reads1 == 0 and peak1 == 0
    assert same
    assert error0 == error1 and "intermediate_size" in error0


def _zero3_export_rank(rank: int, port: int, directory, out) -> None:
    """A partitioned ZeRO-3 model streamed into a model directory with small shards: the most
    bytes of gathered tensors alive at once on this rank, what was written, and a writer error
    raised on rank 0 only after every gather (rank 1 must not be left waiting)."""
    import os
    import weakref
    from types import SimpleNamespace

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import actors.train.consolidate as consolidate
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import construct_model
        from cluster.spec import TrainSection
        from models.weights.model_dir import load_model_dir
        from models.conversation import train_bpe_tokenizer
        from models.weights.model_dir import ModelDirWriter
        from models.weights.stream import LazyTensors

        tok = train_bpe_tokenizer(["a b c d e f"], 300)
        flavour = from_name("debug", llm={"num_hidden_layers": 6})  # a layer: ~1/8 of the model
        train = TrainSection(workers=2, zero_stage=3, micro_batch=1, steps=2)
        model = construct_model(flavour, tok, train, deepspeed_config(train, flavour, world_size=2, total_steps=2))
        source = None
        if rank == 0:
            torch.manual_seed(7)
            source = SphinxX.from_flavour(flavour, tok)
        consolidate.scatter_recipes(model, LazyTensors.from_state(source.state_dict()).recipes() if rank == 0
                                    else None, what="rank 0's model")
        engine = SimpleNamespace(module=model, device=torch.device("cpu"), zero_optimization_stage=lambda: 3)
        gathered, peak = [], [0]
        original = consolidate.consolidated_tensors

        def watched(*args, **kwargs):
            for name, tensor in original(*args, **kwargs):
                if tensor is not None:
                    gathered.append(weakref.ref(tensor))
                yield name, tensor
                peak[0] = max(peak[0], sum(r().numel() * r().element_size() for r in gathered if r() is not None))

        consolidate.consolidated_tensors = watched
        written = consolidate.write_model_dir(engine, tok, directory, dtype=torch.bfloat16, max_shard_bytes=50_000)
        same, shards = None, None
        if rank == 0:
            loaded, _ = load_model_dir(written)
            want = source.state_dict()
            same = all(torch.equal(p.data, want[k].to(torch.bfloat16)) for k, p in loaded.named_parameters())
            shards = len(list(Path(written, "llm").glob("model-*-of-*.safetensors")))
        real_add = ModelDirWriter.add

        def failing(self, name, tensor):
            if name.startswith("llm.model.layers.1."):
                raise ValueError(f"disk full at {name}")
            real_add(self, name, tensor)

        ModelDirWriter.add = failing
        try:
            consolidate.write_model_dir(engine, tok, Path(directory) / "again", dtype=torch.bfloat16)
            error = None
        except ValueError as err:
            error = str(err)
        out.put((rank, peak[0], written is None, same, shards, error))
    finally:
        dist.destroy_process_group()


def test_zero3_export_streams_into_small_shards_on_rank0_only(tmp_path):
    """The export gathers parameter by parameter and rank 0 writes shard by shard: at most one
    shard (50 kB here) and one layer of gathered tensors alive on rank 0, none on rank 1; the
    directory loads back equal to the weights; a write error on rank 0 leaves rank 1 free."""
    results = {r[0]: r[1:] for r in _two_ranks(_zero3_export_rank, tmp_path)}
    peak0, none0, same, shards, error0 = results[0]
    peak1, none1, _, _, error1 = results[1]
    from models.conversation import train_bpe_tokenizer

    torch.manual_seed(7)
    state = SphinxX.from_flavour(from_name("debug", llm={"num_hidden_layers": 6}),
                                 train_bpe_tokenizer(["a b c d e f"], 300)).state_dict()
    layer = sum(v.numel() * 2 for k, v in state.items() if k.startswith("llm.model.layers.0."))
    model_bytes = sum(v.numel() * 2 for v in state.values())
    assert 0 < peak0 <= 50_000 + layer < model_bytes / 4, (peak0, layer, model_bytes)
    assert peak1 == 0 and none1 and not none0
    assert same and shards > 5
    assert error0 and "disk full at llm.model.layers.1." in error0 and error1 is None


def _master_rank(rank: int, port: int, stage: int, out) -> None:
    """Two steps of the same fp32 model and batch, once through build_engine (master shared) and
    once through a bare deepspeed.initialize (DeepSpeed's own clone); the updated partitions."""
    import os

    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from actors.train.batching import collate
        from actors.train.deepspeed_config import deepspeed_config
        from actors.train.engine import build_engine, construct_model
        from cluster.spec import TrainSection
        from pipelines.demo.synthetic_shards import build_rows

        tok, rows = build_rows("debug", n_rows=2, seed=0)
        cols = {c: __import__("numpy").array([rows[rank][c], None], dtype=object)[:-1] for c in rows[rank]}
        batch = collate(cols, pad_token_id=tok.pad_token_id)
        flavour = from_name("debug")
        train = TrainSection(workers=2, zero_stage=stage, micro_batch=1, steps=2, lr=1e-3, precision="fp32")
        cfg = deepspeed_config(train, flavour, world_size=2, total_steps=2)
        results = []
        for shared in (True, False):
            model = construct_model(flavour, tok, train, cfg)
            if shared:
                engine = build_engine(train, model, 2, 2, cfg)
            else:
                trainable = [p for p in model.parameters() if p.requires_grad]
                engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
            opt = engine.optimizer
            if stage == 3:
                pairs = list(zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat))
            else:
                pairs = [(opt.parallel_partitioned_bit16_groups[i][rank], m)
                         for i, m in enumerate(opt.single_partition_of_fp32_groups)]
            same_memory = all(lp.data_ptr() == hp.data_ptr() and lp.dtype == torch.float32 for lp, hp in pairs)
            losses = []
            for _ in range(2):
                from actors.train.batching import model_inputs

                loss = engine(**model_inputs(batch, engine.device)).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            # numpy, not a tensor: a tensor crosses the queue as a shared-memory fd that is gone
            # once this process exits, which can be before the parent unpickles it
            results.append((same_memory, losses, torch.cat([lp.detach().clone() for lp, _ in pairs]).numpy()))
            engine.destroy()
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_fp32_master_shares_the_partition_and_trains_the_same(stage):
    """fp32 ZeRO-2/3 (the CPU case): the parameter partitions are fp32 (ZeRO-3's zero.Init too),
    build_engine makes the optimizer's fp32 master partition the parameter partition's own
    memory (DeepSpeed alone keeps a clone), and two AdamW steps give the same losses and updated
    partitions as DeepSpeed with its clone."""
    results = dict(_two_ranks(_master_rank, stage))
    for rank in (0, 1):
        (shared, losses, params), (cloned, want_losses, want) = results[rank]
        params, want = torch.from_numpy(params), torch.from_numpy(want)
        assert shared and not cloned
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert not torch.equal(params, torch.zeros_like(params))
        torch.testing.assert_close(params, want, rtol=1e-5, atol=1e-6)
