"""Mixture weights: how often each source's records are written, on top of ``ratio``.

A source's records are written ``epochs = ratio x weight x t`` times on average (``copies`` per
record: ``actors.data.rows.copies_for``, deterministic), where ``t`` is the temperature factor
over the sources' sizes (``data.mixture_temperature`` = T; 1 when it is off)::

    p_i = n_i^(1/T) / sum_j n_j^(1/T)        the share source i gets of the N = sum_j n_j draws
    t_i = p_i * N / n_i                      so T = 1 keeps every size (t = 1), T -> inf makes
                                             every source the same size (small ones repeated)

``n_i`` are the record counts the parse step reads (``pipelines.stages.preprocess`` counts them
first when T is set). The manifest records ``weight`` and ``epochs`` per source.

    >>> plan([("big", 1.0, 1.0), ("small", 1.0, 2.0)], {"big": 900, "small": 100}, None)
    {'big': 1.0, 'small': 2.0}
    >>> {k: round(v, 3) for k, v in plan([("big", 1.0, 1.0), ("small", 1.0, 1.0)],
    ...                                   {"big": 900, "small": 100}, 2.0).items()}
    {'big': 0.833, 'small': 2.5}
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from models.errors import UserError


def temperature_factors(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """``t_i`` for each source (a source of 0 records gets 1: it has nothing to repeat)."""
    if temperature <= 0:
        raise UserError(f"data.mixture_temperature must be > 0, got {temperature}")
    total = sum(sizes.values())
    mass = {k: n ** (1.0 / temperature) for k, n in sizes.items() if n > 0}
    norm = sum(mass.values())
    return {k: (mass[k] / norm * total / n if n > 0 else 1.0) for k, n in sizes.items()}


def plan(sources: Sequence[tuple[str, float, float]], sizes: Optional[Mapping[str, int]],
         temperature: Optional[float]) -> dict[str, float]:
    """``epochs`` per source from ``(name, ratio, weight)`` and, with a temperature, the sizes."""
    factors = {name: 1.0 for name, _, _ in sources}
    if temperature is not None:
        if sizes is None:
            raise UserError("data.mixture_temperature needs the sources' record counts")
        factors.update(temperature_factors({name: int(sizes.get(name, 0)) for name, _, _ in sources}, temperature))
    return {name: ratio * weight * factors[name] for name, ratio, weight in sources}
