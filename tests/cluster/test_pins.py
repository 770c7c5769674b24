"""cluster.pins: the one pinned node environment — exact pins only, the Ray every manifest names,
and the pip section a Ray Job brings to a stock cluster."""

from __future__ import annotations

import importlib.metadata

import pytest

from cluster import pins
from models.errors import UserError


def test_every_line_is_an_exact_pin_and_torch_comes_first():
    reqs = pins.requirements()
    assert reqs[0] == "torch==2.13.0"  # installed first everywhere (docs/architecture.md "Dependencies")
    assert all("==" in r for r in reqs)
    assert pins.pinned("Ray") == "ray[default,train,data,serve]==2.60.0"
    assert pins.ray_version() == importlib.metadata.version("ray")  # the Ray these tests run on


def test_the_pins_satisfy_the_projects_own_requirements():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        req = Requirement(line)
        name = req.name
        assert req.specifier.contains(pins.pinned_version(name)), (name, str(req.specifier))
        assert set(req.extras) <= set(Requirement(pins.pinned(name)).extras), name


def test_a_loose_line_or_a_missing_pin_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "requirements.txt"
    bad.write_text("torch==2.13.0\ntransformers>=5\n")
    monkeypatch.setattr(pins, "REQUIREMENTS", bad)
    pins.requirements.cache_clear()
    try:
        with pytest.raises(UserError, match=r"exact pin.*transformers>=5"):
            pins.requirements()
        bad.write_text("torch==2.13.0  # pinned\n\n")
        pins.requirements.cache_clear()
        assert pins.requirements() == ("torch==2.13.0",)
        with pytest.raises(UserError, match="no pin for 'ray'"):
            pins.ray_version()
    finally:
        pins.requirements.cache_clear()


def test_job_pip_is_the_pin_list_with_the_cache_kept():
    pip = pins.job_pip()
    assert pip["packages"] == list(pins.requirements())
    assert "--no-cache-dir" not in pip["pip_install_options"]
