"""The training loop's two collectives: the token-weighted loss share and the step's sums.

Both take the engine's device (``engine.device``): NCCL takes only GPU tensors, gloo CPU ones;
the same code serves both.

    >>> share = token_share(output.num_tokens, world, engine.device)   # rank 0: 6, rank 1: 30 → 1/6, 5/6
    >>> lm_sum, aux_sum = all_reduce_sums([lm, aux], engine.device)
"""

from __future__ import annotations

import torch


def token_share(num_tokens: int, world: int, device) -> float:
    """This rank's share of the micro-batch's supervised tokens over all ranks (all_reduce);
    ``num_tokens`` is the model's own count (``SphinxOutput.num_tokens``).

    Each rank's ``lm_loss`` is a mean over its own supervised tokens, and DeepSpeed averages the
    ranks' gradients. Length grouping gives ranks very different rows (one rank the short
    word / chat rows with one answer each, the other the scene rows with three), so a plain
    average would weigh a token on a "short" rank several times more than one on a "long" rank.
    Scaling each rank's loss by ``share · world`` makes the step the mean over ALL supervised
    tokens of the global batch, as one process training on the whole batch would compute:

        rank 0: 6 tokens, rank 1: 30 tokens  ->  shares 1/6, 5/6  (plain average: 1/2, 1/2)
    """
    if world == 1:
        return 1.0
    total = all_reduce_sums([float(num_tokens)], device)[0]
    return num_tokens / total if total else 1.0 / world


def all_reduce_sums(values: list[float], device) -> list[float]:
    """Sum ``values`` over all ranks: one float64 all_reduce on ``device``."""
    import torch.distributed as dist

    sums = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums.tolist()
