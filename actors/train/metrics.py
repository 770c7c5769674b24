"""Rank 0's step history on the run's storage: ``metrics.jsonl`` (one JSON object per step) and,
at the end, ``loss.png`` (loss and LM loss against the step; a dotted line where a run was
restored from a checkpoint). The keys of a step are listed in ``actors.train.worker``."""

from __future__ import annotations

import io
import json

from cluster.layout import Layout


def write_metrics(storage, layout: Layout, history: list[dict], *, png: bool = False) -> None:
    storage.write_bytes(layout.metrics, "".join(json.dumps(m) + "\n" for m in history).encode())
    if png and history:
        storage.write_bytes(layout.loss_png, loss_png(history))


def loss_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [m["step"] for m in history]
    ax.plot(steps, [m["loss"] for m in history], label="loss")
    ax.plot(steps, [m["lm_loss"] for m in history], label="lm loss", alpha=0.7)
    for m in history:
        if m.get("restored_from") is not None and m["step"] == m["restored_from"] + 1:
            ax.axvline(m["restored_from"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
