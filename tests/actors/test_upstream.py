"""Why each workaround in actors/upstream.py is there: the upstream behaviour without it and the
behaviour with it, on tiny inputs. When an upgrade makes a "without" assertion fail, upstream
has changed: check whether the workaround is still needed.

The DeepSpeed checks run in a fresh process (one gloo rank): DeepSpeed and torch.distributed
keep process-wide state.
"""

from __future__ import annotations

import json

from child_python import last_line
from cluster.ports import free_port


def _one_rank(port: int) -> str:
    """Prelude: this process is rank 0 of a gloo world of 1, as DeepSpeed expects."""
    return f"""
import os, json, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from actors.upstream import no_cpu_shm_comm_build
no_cpu_shm_comm_build()
deepspeed.init_distributed()
"""


def test_no_cpu_shm_comm_build_keeps_init_distributed_from_compiling(tmp_path):
    """DeepSpeed 0.19.8 on CPU: the shared-memory allreduce op is one DeepSpeed builds (its builder
    exists and is compatible here, so ``init_distributed`` would compile it with g++); after
    no_cpu_shm_comm_build the comm backend starts without it and nothing is compiled. (The
    "without" side is not run: it is the ~30 s compile the workaround saves.)"""
    extensions = tmp_path / "torch_extensions"
    code = f"""
import os
os.environ["TORCH_EXTENSIONS_DIR"] = {str(extensions)!r}
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
would_build = builder is not None and deepspeed.ops.__compatible_ops__[builder.NAME]
""" + _one_rank(free_port()) + """
import deepspeed.comm.comm as cdb_module
print(json.dumps([would_build, cdb_module.cdb.shm_comm_op is None]))
"""
    would_build, skipped = json.loads(last_line(code))
    assert would_build, "DeepSpeed no longer builds deepspeed_shm_comm on CPU: drop no_cpu_shm_comm_build"
    assert skipped
    assert not extensions.exists() or not any(extensions.rglob("*.so")), "something was compiled"


def test_share_fp32_master_drops_deepspeeds_fp32_clone():
    """DeepSpeed 0.19.8, fp32 ZeRO-2 and ZeRO-3: the optimizer's fp32 master partition is a clone
    of the fp32 parameter partition (another 4 B per parameter); after share_fp32_master it is the
    partition's own memory, and two AdamW steps give the same parameters as with the clone."""
    code = _one_rank(free_port()) + """
from actors.upstream import share_fp32_master

def pairs(opt):
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return list(zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat))
    return [(opt.parallel_partitioned_bit16_groups[i][0], m) for i, m in enumerate(opt.single_partition_of_fp32_groups)]

def run(stage, share):
    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    shared = share_fp32_master(engine.optimizer) if share else 0
    same = all(lp.data_ptr() == hp.data_ptr() for lp, hp in pairs(engine.optimizer))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
    flat = torch.cat([lp.detach().flatten().clone() for lp, _ in pairs(engine.optimizer)])
    engine.destroy()
    return shared, same, flat

out = {}
for stage in (2, 3):
    n0, same0, want = run(stage, False)
    n1, same1, got = run(stage, True)
    out[stage] = [n0, same0, n1, same1, bool(torch.allclose(got, want, rtol=1e-6, atol=1e-7)), got.numel()]
print(json.dumps(out))
"""
    got = json.loads(last_line(code))
    params = 8 * 16 + 16 + 16 * 4 + 4
    for stage in ("2", "3"):
        without_n, without_same, with_n, with_same, same_values, numel = got[stage]
        assert (without_n, without_same) == (0, False), f"ZeRO-{stage}: DeepSpeed shares the master itself now"
        assert (with_n, with_same, numel) == (params, True, params)
        assert same_values  # the same training, one copy less


def test_bound_host_allocator_serves_a_megabyte_from_mmap():
    """glibc: a 2 MiB block comes from the heap once a 16 MiB block was freed (the freed mmap
    raised the default threshold above 2 MiB), so its memory stays resident after free. After
    bound_host_allocator it is its own mmap (glibc counts it in ``mallinfo2().hblks``) and goes
    back when freed."""
    code = """
import ctypes, sys
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena","ordblks","smblks","hblks","hblkhd","usmblks","fsmblks","uordblks","fordblks","keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI; libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def blocks_for(size):
    before = libc.mallinfo2().hblks; p = libc.malloc(size); during = libc.mallinfo2().hblks; libc.free(p)
    return during - before, libc.mallinfo2().hblks - before
libc.free(libc.malloc(16 << 20))  # raises the default threshold to 16 MiB
default = blocks_for(2 << 20)
from actors.upstream import bound_host_allocator
ok = bound_host_allocator()
print(default, blocks_for(2 << 20), ok)
"""
    assert last_line(code) == "(0, 0) (1, 0) True"  # default: from the heap; bounded: its own mmap, returned


def test_hf_init_is_lost_on_zero3_partitions_unless_deferred_and_gathered():
    """transformers 5.19 under deepspeed.zero.Init (no HfDeepSpeedConfig): post_init's weight
    init writes into 0-element partitions, so a Llama's embedding keeps torch's N(0, 1) instead of
    N(0, initializer_range=0.02). Deferred (hf_init_deferred) and run gathered (hf_init_gathered),
    the model gets its own init."""
    code = _one_rank(free_port()) + """
from transformers import LlamaConfig, LlamaForCausalLM
from actors.upstream import hf_init_deferred, hf_init_gathered

cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, initializer_range=0.02)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}

def embedding_std(model):
    weight = model.model.embed_tokens.weight
    with deepspeed.zero.GatheredParameters([weight]):
        return float(weight.detach().std())

torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds):
    plain = LlamaForCausalLM(cfg)
with hf_init_deferred(), deepspeed.zero.Init(config_dict_or_path=ds):
    fixed = LlamaForCausalLM(cfg)
hf_init_gathered([fixed])
print(json.dumps([embedding_std(plain), embedding_std(fixed)]))
"""
    without, with_ = json.loads(last_line(code))
    assert 0.8 < without < 1.2, f"transformers initialises ZeRO-3 partitions itself now (std {without})"
    assert 0.015 < with_ < 0.025


def test_cpu_engine_one_process_keeps_vllms_single_process_executor():
    """Without: vLLM's CPU platform turns a one-rank engine's ``uni`` executor into ``mp`` (a worker
    process of its own). With (threads unpinned, one rank): ``uni``; pinned threads or tensor
    parallelism: left alone. A fresh process: the variable is process-wide."""
    out = last_line("""
import os
os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
from vllm.config import VllmConfig
from actors.upstream import cpu_engine_one_process
without = VllmConfig().parallel_config.distributed_executor_backend
skipped = [cpu_engine_one_process(2)]
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
skipped.append(cpu_engine_one_process(1))
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
applied = cpu_engine_one_process(1)
print(without, skipped, applied, VllmConfig().parallel_config.distributed_executor_backend)
""")
    assert out == "mp [False, False] True uni", out


def test_zero_check_without_muon_keeps_torch_compile_unimported():
    """DeepSpeed 0.19.8: ``deepspeed.initialize`` with ZeRO imports Muon (and with it torch.compile's
    inductor) to check the optimizer; after zero_check_without_muon it does not, and the check still
    passes for the optimizer training builds. Two fresh processes: imports are process-wide."""
    def initialize(patch: bool) -> str:
        return last_line(_one_rank(free_port()) + f"""
import sys
from actors.upstream import zero_check_without_muon
patched = zero_check_without_muon() if {patch} else False
cfg = {{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {{"stage": 2}},
       "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-2, "torch_adam": True}}}}}}
model = torch.nn.Linear(8, 4)
engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
print(json.dumps([patched, zero_check_without_muon() if {patch} else False, type(engine.optimizer).__name__,
                  "torch._inductor.compile_fx" in sys.modules]))
""")

    assert json.loads(initialize(False)) == [False, False, "DeepSpeedZeroOptimizer", True], "DeepSpeed no longer imports Muon"
    assert json.loads(initialize(True)) == [True, False, "DeepSpeedZeroOptimizer", False]
