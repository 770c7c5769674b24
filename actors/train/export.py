"""The trained model out of the engine: ``<train.output>/export`` plus its check, on every rank.

    >>> summary = export_model(engine, tokenizer, storage, layout, check_batch, rank)
    >>> summary.export, summary.export_max_abs_diff        # rank 0; None on the other ranks
    ('s3://b/run/train/export', 0.0)

The model is streamed parameter by parameter (``actors.train.consolidate.write_model_dir``:
rank 0 writes, in the training dtype, never holding the whole model) into a
``models.weights.model_dir`` directory, published atomically (``cluster.publish``: the old export
stays readable until the new one is complete; ``_SUCCESS`` is the switch); ``export_check.pt`` keeps a fixed
batch and the engine's logits so anyone can verify the export; ``export.json`` is an
``actors.train.summaries.ExportSummary``.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Optional

import torch

from actors.train.batching import model_inputs
from actors.train.summaries import ExportSummary
from cluster.layout import Layout
from cluster.publish import publish_dir

# the in-worker logits check of the export loads the written directory on rank 0: up to this size
EXPORT_CHECK_MAX_BYTES = 8 * 2**30


def export_dtype(engine) -> torch.dtype:
    """The export's dtype: bf16 when the engine trains in bf16, else fp32."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def export_model(engine, tokenizer, storage, layout: Layout, check_batch: Optional[dict], rank: int, *,
                 max_shard_bytes: Optional[int] = None) -> Optional[ExportSummary]:
    """Write ``<out>/export`` (``_SUCCESS`` last) streamed from the engine; rank 0 returns the
    summary (also written as ``export.json``), the other ranks None. Every rank must call it.

    The written directory is checked on rank 0: its safetensors headers against the model
    (``inspect_model_dir``: every key, shape and dtype), and, with a ``check_batch`` and for
    models up to ``EXPORT_CHECK_MAX_BYTES``, the logits of the directory reloaded against the
    engine's (``export_max_abs_diff``)."""
    from actors.train.consolidate import write_model_dir
    from models.weights.model_dir import inspect_model_dir, load_model_dir

    logits = None
    if check_batch is not None:  # every rank runs the forward (EP layers exchange tokens)
        engine.module.eval()
        with torch.no_grad():
            logits = engine(**model_inputs(check_batch, engine.device)).logits.float().cpu()
        engine.module.train()
    with tempfile.TemporaryDirectory(prefix="sx-export-") as tmp:
        written = write_model_dir(engine, tokenizer, tmp, dtype=export_dtype(engine), max_shard_bytes=max_shard_bytes)
        if rank != 0:
            return None
        info = inspect_model_dir(written)
        size = sum(Path(f).stat().st_size for part in info["parts"].values() for f in part["files"])
        max_abs_diff, check = None, None
        if check_batch is not None:
            buf = io.BytesIO()
            torch.save({"batch": dict(check_batch), "logits": logits}, buf)
            storage.write_bytes(layout.export_check, buf.getvalue())
            if size <= EXPORT_CHECK_MAX_BYTES:
                plain, _ = load_model_dir(written)
                with torch.no_grad():
                    mine = plain(**model_inputs(check_batch)).logits.float()  # on CPU, in the export dtype
                del plain
                max_abs_diff = float((mine - logits).abs().max())
            else:
                check = (f"headers only: {size / 2**30:.1f} GiB is over the in-worker logits check's "
                         f"{EXPORT_CHECK_MAX_BYTES / 2**30:.0f} GiB; {layout.export_check} holds the batch "
                         "and the engine's logits")
        # atomic: the old export stays readable until the new one is complete (cluster.publish)
        publish_dir(storage, written, layout.export)
    summary = ExportSummary(export=layout.export, export_params=int(info["params"]["total"]), export_bytes=size,
                            export_max_abs_diff=max_abs_diff, export_check=check)
    storage.write_bytes(layout.export_summary, summary.to_json().encode())
    return summary
