"""The training loop's loss weighting across ranks (two real gloo processes)."""

from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from models.flavours import from_name
from models.sphinx import SphinxX

IGNORE = -100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, counts: list, out) -> None:
    import torch.distributed as dist

    from actors.train_worker import token_share

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, token_share(counts[rank], 2, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_token_share_weighs_every_supervised_token_alike():
    counts = [1, 3]  # supervised target tokens on rank 0 and rank 1
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, counts, out)) for r in range(2)]
    for p in procs:
        p.start()
    shares = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
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
