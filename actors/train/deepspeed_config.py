"""The DeepSpeed config of a training run, generated from the spec's ``train`` section.

    >>> cfg = deepspeed_config(spec.train, flavour, world_size=2, total_steps=50)
    >>> cfg["train_batch_size"], cfg["zero_optimization"]["stage"], cfg["bf16"]["enabled"]
    (8, 2, False)

What comes from where (docs/architecture.md; the paper's recipe):

- batch: ``micro_batch`` per rank, ``grad_accum`` micro-batches per optimizer step, so the
  global batch is ``micro_batch × grad_accum × world_size`` (every rank is data parallel —
  expert-parallel ranks see different samples too);
- precision: ``auto`` is bf16 on GPU and fp32 on CPU; ``bf16`` / ``fp32`` force it;
- optimizer: AdamW with the spec's β (0.9, 0.95 by default), weight decay, built by DeepSpeed
  (``torch_adam``) so that AutoEP can put the expert parameters into their own groups;
- schedule: linear warm-up over ``warmup_ratio`` of the steps, then cosine to ``min_lr``
  (DeepSpeed ``WarmupCosineLR``, stepped once per optimizer step);
- memory: buckets and ZeRO-3 live parameters sized from the LLM width (``memory_bounds``);
- MoE flavours with ``expert_parallel > 1``: AutoEP on the HF Mixtral sparse blocks. SphinxX
  holds the Mixtral model as ``llm``, so the Mixtral preset's layer pattern is prefixed with
  ``llm.`` here (adapting from outside instead of bending the model code).
"""

from __future__ import annotations

import math
from typing import Any

from cluster.spec import TrainSection
from models.flavours import Flavour

# SphinxX keeps the HF causal LM as `.llm`; the Mixtral preset expects `model.layers.N.mlp` at the root.
MOE_LAYER_PATTERN = r"llm\.model\.layers\.\d+\.mlp"


def use_bf16(train: TrainSection) -> bool:
    """Precision ``auto`` means bf16 on GPU and fp32 on CPU."""
    if train.precision == "auto":
        return train.use_gpu
    return train.precision == "bf16"


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    """Linear warm-up over ``warmup_ratio`` of the steps, at least one step."""
    return max(1, math.ceil(train.warmup_ratio * total_steps))


def uses_autoep(train: TrainSection, flavour: Flavour) -> bool:
    return flavour.is_moe and train.expert_parallel > 1


def memory_bounds(train: TrainSection, flavour: Flavour) -> dict[str, Any]:
    """Bucket and live-parameter sizes from the LLM width ``d`` (transformers' "auto" rules:
    reduce bucket d², ZeRO-3 prefetch 0.9·d², persistence 10·d), plus for ZeRO-3 a live / reuse
    limit of about one decoder layer (8·d² parameters; a Llama layer with ffn 2.75·d is ~11·d²)
    and an optimizer sub-group of 4·d² (the step's temporaries — flattened fp32 gradients, Adam's
    denominators — exist per sub-group). DeepSpeed's defaults (5e8-element buckets, 1e9 live
    parameters, reuse distance and sub-group) keep a model under ~1 B parameters wholly gathered
    on every rank (measured: 8–9 GB per ZeRO-3 rank for 0.38 B in fp32), which is what ZeRO-3 is
    there to avoid. Measured on that model (``benchmarks/train_memory.py``, peak RSS per rank):
    24·d² live and sub-group 4.20 GiB, 24·d² live with a 4·d² sub-group 4.21, 8·d² live with it
    4.08, 4·d² live 4.08. Never below 2e6 (live, sub-group) / 5e5 (buckets) elements (the toy
    flavours)."""
    d = int(flavour.llm["hidden_size"])
    bucket = max(d * d, 500_000)
    out: dict[str, Any] = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if not train.use_gpu:
        out["overlap_comm"] = False  # no streams to overlap on CPU; its extra buffers only cost memory
    if train.zero_stage == 3:
        live = max(8 * d * d, 2_000_000)
        out.update({"stage3_prefetch_bucket_size": max(int(0.9 * d * d), 500_000),
                    "stage3_param_persistence_threshold": 10 * d,
                    "stage3_max_live_parameters": live, "stage3_max_reuse_distance": live,
                    # the optimizer steps its fp32 partition in sub-groups of this size, so its
                    # temporaries (fp32 gradients, Adam's denominators) stay per sub-group
                    "sub_group_size": max(4 * d * d, 2_000_000),
                    # the export gathers itself, parameter by parameter (actors.train.consolidate)
                    "stage3_gather_16bit_weights_on_model_save": False})
    return out


def deepspeed_config(train: TrainSection, flavour: Flavour, *, world_size: int, total_steps: int) -> dict[str, Any]:
    """A DeepSpeed config dict for ``deepspeed.initialize(config=...)``."""
    if world_size % train.expert_parallel:
        raise ValueError(f"expert_parallel {train.expert_parallel} must divide the world size {world_size}")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": use_bf16(train)},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                       "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup_steps(train, total_steps),
                       "warmup_min_ratio": 0.0, "cos_min_ratio": train.min_lr / train.lr,
                       "warmup_type": "linear"},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg["zero_optimization"].update(memory_bounds(train, flavour))
    if uses_autoep(train, flavour):
        cfg["expert_parallel"] = {
            "enabled": True,
            "autoep_size": train.expert_parallel,
            "preset_model": "mixtral",
            "moe_layer_pattern": MOE_LAYER_PATTERN,
            "top_k": int(flavour.llm.get("num_experts_per_tok", 2)),
            "use_grouped_mm": train.use_gpu,  # the grouped-mm kernels need a GPU
        }
    return cfg
