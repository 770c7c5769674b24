"""DeepSpeed AutoEP's expert-parallel MoE layer → transformers' Mixtral names (the export's inverse
of AutoEP). The gathers themselves are collectives and stay in actors.train.consolidate.

AutoEP replaces each HF Mixtral sparse block ``P = llm.model.layers.N.mlp`` by a layer holding
this EP rank's experts in TorchTitan layout; once its experts are all-gathered (EP rank order =
expert order)::

    P.router.gate.weight [E, d]                       → P.gate.weight [E, d]
    P.experts.w1 [E, f, d] (gate), P.experts.w3 (up)  → P.experts.gate_up_proj [E, 2f, d]  (gate first)
    P.experts.w2 [E, d, f]                            → P.experts.down_proj [E, d, f]

    >>> dict(plain_moe("llm.model.layers.0.mlp", gathered))   # gathered: {AUTOEP_KEYS: tensor}
    {'llm.model.layers.0.mlp.gate.weight': ..., '...experts.gate_up_proj': ..., '...experts.down_proj': ...}

AutoEP's non-persistent routing counters (``tokens_per_expert``) are not model state.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch

# an AutoEP layer's parameters (relative to the layer) → the HF Mixtral name; the experts' w1 and
# w3 are fused into gate_up_proj (plain_moe)
AUTOEP_TO_HF = {
    "router.gate.weight": "gate.weight",
    "experts.w1": "experts.gate_up_proj",
    "experts.w3": "experts.gate_up_proj",
    "experts.w2": "experts.down_proj",
}
AUTOEP_KEYS = tuple(AUTOEP_TO_HF)


def plain_moe(prefix: str, got: Mapping[str, Optional[torch.Tensor]],
              keep: bool = True) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """One AutoEP layer's gathered tensors (``got``: AUTOEP_KEYS → tensor, or None off rank 0)
    under the HF Mixtral names; ``keep`` False (not rank 0): names with None."""
    leftover = sorted(k for k in got if k not in AUTOEP_TO_HF)
    if leftover:
        raise RuntimeError(f"AutoEP layer {prefix} has parameters the export does not map: {leftover}")
    yield f"{prefix}.{AUTOEP_TO_HF['router.gate.weight']}", got["router.gate.weight"]
    fused = torch.cat([got["experts.w1"], got["experts.w3"]], dim=1) if keep else None
    yield f"{prefix}.{AUTOEP_TO_HF['experts.w1']}", fused
    yield f"{prefix}.{AUTOEP_TO_HF['experts.w2']}", got["experts.w2"]
