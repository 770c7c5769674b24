"""transformers' Mixtral names → vLLM's ``MixtralForCausalLM`` names (vLLM loads the original
per-expert layout; transformers 5 fuses the experts into 3-D tensors).

    >>> dict(mixtral_to_vllm("model.layers.0.mlp.gate.weight", t))
    {'model.layers.0.block_sparse_moe.gate.weight': t}
    >>> [n for n, _ in mixtral_to_vllm("model.layers.0.mlp.experts.down_proj", t)]   # t: [E, d, F]
    ['model.layers.0.block_sparse_moe.experts.0.w2.weight', ..., '...experts.{E-1}.w2.weight']

The inverse of models.weights.hf_llm's Mixtral table. Llama names pass through unchanged.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

# one tensor → one, renamed
HF_TO_VLLM = [(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$", r"\1block_sparse_moe.gate.weight")]
# one fused tensor [E, ...] → per expert: the rows of each target along dim 1 (None: all of them)
FUSED_EXPERTS = {
    "gate_up_proj": (("w1", 0), ("w3", 1)),  # [E, 2F, d]: gate rows :F (w1), up rows F: (w3)
    "down_proj": (("w2", None),),  # [E, d, F]
}
_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")


def mixtral_to_vllm(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF Mixtral weight → the (name, tensor) pairs vLLM's MixtralForCausalLM loads (module
    docstring); views, no copy."""
    for pattern, target in HF_TO_VLLM:
        if re.match(pattern, name):
            yield re.sub(pattern, target, name), tensor
            return
    m = _FUSED.match(name)
    if m is None:
        yield name, tensor
        return
    parts = FUSED_EXPERTS[m[2]]
    for e in range(tensor.shape[0]):
        for w, half in parts:
            rows = tensor[e] if half is None else tensor[e].chunk(2, dim=0)[half]
            yield f"{m[1]}block_sparse_moe.experts.{e}.{w}.weight", rows
