"""actors.data.mixture: epochs = ratio x weight x the temperature factor over source sizes."""

from __future__ import annotations

import pytest

from actors.data.mixture import plan, temperature_factors
from actors.data.rows import copies_for
from models.errors import UserError


def test_weights_multiply_ratio_and_temperature_one_changes_nothing():
    sources = [("a", 0.5, 1.0), ("b", 1.0, 3.0), ("c", 2.0, 0.25)]
    assert plan(sources, None, None) == {"a": 0.5, "b": 3.0, "c": 0.5}
    assert plan(sources, {"a": 10, "b": 1000, "c": 3}, 1.0) == pytest.approx({"a": 0.5, "b": 3.0, "c": 0.5})


def test_temperature_flattens_the_mix_and_keeps_the_total():
    sizes = {"big": 10_000, "mid": 1_000, "small": 10, "empty": 0}
    t = temperature_factors(sizes, 3.0)
    assert sum(t[k] * n for k, n in sizes.items()) == pytest.approx(sum(sizes.values()))  # N draws in all
    assert t["big"] < 1 < t["mid"] < t["small"] and t["empty"] == 1.0
    flat = temperature_factors(sizes, 1e9)  # T -> inf: every (non-empty) source the same size
    drawn = {k: flat[k] * n for k, n in sizes.items() if n}
    assert max(drawn.values()) == pytest.approx(min(drawn.values()), rel=1e-6)
    with pytest.raises(UserError):
        plan([("a", 1.0, 1.0)], None, 2.0)


def test_epochs_are_what_copies_average_to():
    epochs = plan([("a", 1.0, 2.5)], None, None)["a"]
    keys = [f"a:{i}" for i in range(4000)]
    assert sum(copies_for(epochs, k) for k in keys) / len(keys) == pytest.approx(2.5, abs=0.05)
