"""Preprocess, terminal side: the one-screen summary and the quarantine error.

Both read the stage's summary: the manifest's keys (``actors.data.manifest.Manifest.to_dict``)
plus ``errors_uri`` and, for a run that found the output complete, ``skipped``.
"""

from __future__ import annotations

from actors.data.manifest import Manifest
from models.errors import UserError


class QuarantineError(UserError):
    """Too many rows were quarantined; the shards and manifest are written anyway."""

    def __init__(self, summary: dict, limit: float):
        self.summary = summary
        m = Manifest.from_dict(summary)
        share = m.counts.rows_quarantined / max(1, m.counts.rows_in)
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(m.counts.quarantined_by_reason.items()))
        super().__init__(
            f"{m.counts.rows_quarantined} of {m.counts.rows_in} rows ({share:.1%}) were quarantined, over "
            f"data.max_quarantine_fraction={limit:.1%} ({reasons}); see {summary['errors_uri']}")


def format_summary(summary: dict) -> str:
    """The one-screen summary printed at the end of the stage."""
    m = Manifest.from_dict(summary)
    c = m.counts
    if summary.get("skipped"):
        return f"preprocess: already complete ({c.rows_written} rows in {len(m.shards)} shards); --force to redo"
    tiling = m.tiling.tile
    lines = [
        f"preprocess: {m.flavour} (grid {tiling.grid}, tile {tiling.tile_size}) in {m.seconds:.1f}s",
        f"  rows in {c.rows_in}  written {c.rows_written}  quarantined {c.rows_quarantined}  "
        f"truncated {c.rows_truncated}  (read {c.rows_read}, subsampled out {c.subsampled_out})",
    ]
    for reason, n in c.quarantined_by_reason.items():
        lines.append(f"    {reason:<18} {n}")
    tok = m.tokens
    lines.append(f"  tokens {tok.total} (text {tok.text}, image {tok.image}); saved by skip tokens {tok.saved}")
    img = m.image_bytes
    if img.source:
        lines.append(f"  images stored in {img.stored / 1e6:.1f} MB ({img.codec}, lossless): "
                     f"{img.stored / img.source:.2f}x their {img.source / 1e6:.1f} MB of sources")
    if c.duplicate_samples + c.duplicate_images:
        lines.append(f"  duplicates dropped: {c.duplicate_samples} samples, {c.duplicate_images} by image")
    if m.rows_reused:
        lines.append(f"  resumed: {m.rows_reused} of {c.rows_read} rows came from blocks an earlier run finished")
    if m.mixture_temperature is not None:
        lines.append(f"  mixture temperature {m.mixture_temperature:g} (epochs scaled over the sources' sizes)")
    lines.append(f"  {'source':<20} {'in':>8} {'written':>8} {'quarantined':>11} {'duplicates':>10} {'ratio':>6} "
                 f"{'weight':>6} {'epochs':>7}  layout / prompt")
    for name, s in m.sources.items():
        lines.append(f"  {name:<20} {s.rows_in:>8} {s.rows_written:>8} {s.rows_quarantined:>11} "
                     f"{s.duplicate_samples + s.duplicate_images:>10} {s.ratio:>6g} {s.weight:>6g} {s.epochs:>7.3g}"
                     f"  {s.layout}" + (f" / {s.prompt} ({len(s.prompt_templates)} templates)" if s.prompt else ""))
    errors_uri = summary.get("errors_uri")
    lines.append(f"  {len(m.shards)} shard(s), {len(m.error_shards)} error shard(s)"
                 + (f" -> {errors_uri}" if errors_uri and m.error_shards else ""))
    return "\n".join(lines)
