import pytest

from actors.train.deepspeed_config import MOE_LAYER_PATTERN, deepspeed_config, use_bf16, warmup_steps
from cluster.spec import TrainSection
from models.flavours import from_name


def _train(**kw):
    return TrainSection(**kw)


def test_dense_zero2_fp32_on_cpu():
    train = _train(workers=2, micro_batch=4, grad_accum=3, zero_stage=2, lr=1e-4, min_lr=1e-5, warmup_ratio=0.1,
                   grad_clip=0.5)
    cfg = deepspeed_config(train, from_name("debug"), world_size=2, total_steps=100)
    assert cfg["train_batch_size"] == 24 == train.global_batch
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"]["enabled"] is False  # auto on CPU
    assert cfg["gradient_clipping"] == 0.5
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["betas"] == [0.9, 0.95] and opt["params"]["torch_adam"]
    sched = cfg["scheduler"]["params"]
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    assert sched["total_num_steps"] == 100 and sched["warmup_num_steps"] == 10
    assert sched["cos_min_ratio"] == pytest.approx(0.1) and sched["warmup_type"] == "linear"
    assert "expert_parallel" not in cfg


@pytest.mark.parametrize("precision,gpu,bf16", [("auto", False, False), ("auto", True, True),
                                                ("bf16", False, True), ("fp32", True, False)])
def test_precision(precision, gpu, bf16):
    train = _train(precision=precision, use_gpu=gpu)
    assert use_bf16(train) is bf16
    assert deepspeed_config(train, from_name("debug"), world_size=2, total_steps=10)["bf16"]["enabled"] is bf16


def test_moe_autoep_on_nested_mixtral():
    train = _train(workers=4, expert_parallel=2, zero_stage=3)
    cfg = deepspeed_config(train, from_name("debug-moe"), world_size=4, total_steps=10)
    ep = cfg["expert_parallel"]
    assert ep["enabled"] and ep["autoep_size"] == 2 and ep["preset_model"] == "mixtral"
    assert ep["moe_layer_pattern"] == MOE_LAYER_PATTERN == r"llm\.model\.layers\.\d+\.mlp"
    assert ep["top_k"] == 2 and ep["use_grouped_mm"] is False
    assert cfg["zero_optimization"]["stage"] == 3


def test_warmup_is_at_least_one_step_and_ep_must_divide_world():
    assert warmup_steps(_train(warmup_ratio=0.0), 50) == 1
    assert warmup_steps(_train(warmup_ratio=0.01), 1000) == 10
    with pytest.raises(ValueError, match="must divide"):
        deepspeed_config(_train(workers=2, expert_parallel=2), from_name("debug-moe"), world_size=3, total_steps=5)


def test_buckets_and_zero3_live_parameters_follow_the_llm_width():
    """DeepSpeed's defaults (5e8 buckets, 1e9 live / reuse) would keep a sub-1B model wholly
    gathered on every ZeRO-3 rank; the limits scale with d instead (tiny: d 2048)."""
    tiny = from_name("tiny")
    z3 = deepspeed_config(_train(workers=2, zero_stage=3, use_gpu=True), tiny, world_size=2, total_steps=10)
    zo = z3["zero_optimization"]
    d = 2048
    assert zo["reduce_bucket_size"] == d * d and zo["stage3_prefetch_bucket_size"] == int(0.9 * d * d)
    assert zo["stage3_max_live_parameters"] == zo["stage3_max_reuse_distance"] == 8 * d * d < 1e9
    assert zo["sub_group_size"] == 4 * d * d
    assert zo["stage3_param_persistence_threshold"] == 10 * d and "overlap_comm" not in zo
    z2 = deepspeed_config(_train(workers=2, zero_stage=2), from_name("debug"), world_size=2, total_steps=10)
    assert z2["zero_optimization"]["reduce_bucket_size"] == 500_000  # the toy floor
    assert z2["zero_optimization"]["overlap_comm"] is False and "stage3_max_live_parameters" not in z2["zero_optimization"]
