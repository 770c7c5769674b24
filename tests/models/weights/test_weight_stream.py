"""models.weights.stream: lazy files, recipes checked from headers, one target at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.errors import UserError
from models.weights.stream import LazyTensors, Recipe, load_recipes, materialise, stream


def _counting(files: LazyTensors) -> list[str]:
    reads: list[str] = []
    original = files.read
    files.read = lambda key: reads.append(key) or original(key)  # type: ignore[method-assign]
    return reads


def test_shapes_come_from_the_headers_and_a_shared_source_is_read_once(tmp_path):
    packed = torch.arange(24.0).reshape(6, 4)
    save_file({"wqkv": packed, "norm": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    files = LazyTensors.open([tmp_path / "a.safetensors"])
    reads = _counting(files)
    state = files.recipes()
    split = {f"{p}": state["wqkv"].then(lambda t, i=i: t[2 * i:2 * i + 2]) for i, p in enumerate("qkv")}
    split["norm"] = state["norm"]
    assert [r.shape for r in split.values()] == [(2, 4)] * 3 + [(4,)] and reads == []  # nothing read yet
    got = dict(stream(split))
    assert reads == ["wqkv", "norm"]  # wqkv once for q, k and v
    assert torch.equal(torch.cat([got["q"], got["k"], got["v"]]), packed)


def test_combine_and_constants():
    files = LazyTensors.from_state({f"e{i}": torch.full((2, 3), float(i)) for i in range(3)})
    state = files.recipes()
    stacked = Recipe.combine([state[f"e{i}"] for i in range(3)], lambda *t: torch.stack(t))
    assert stacked.shape == (3, 2, 3) and torch.equal(stacked.materialise()[2], torch.full((2, 3), 2.0))
    assert torch.equal(Recipe.constant(torch.zeros(2)).materialise(), torch.zeros(2))


def test_pickles_are_memory_mapped_and_repeated_keys_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(3, 2)}}, tmp_path / "a.pt")
    files = LazyTensors.open([tmp_path / "a.pt"])
    assert files.keys() == ["w"] and files.recipes()["w"].shape == (3, 2)
    torch.save({"w": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="repeats the key w"):
        LazyTensors.open([tmp_path / "a.pt", tmp_path / "b.pt"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="cannot read weights file .*bad.safetensors"):
        LazyTensors.open([tmp_path / "bad.safetensors"])


def test_load_is_strict_and_names_keys_and_shapes():
    module = nn.Linear(4, 3)
    good = LazyTensors.from_state({"weight": torch.ones(3, 4), "bias": torch.zeros(3)}).recipes()
    load_recipes(module, good, what="good")
    assert torch.equal(module.weight, torch.ones(3, 4))
    bad = LazyTensors.from_state({"weight": torch.ones(4, 4), "extra": torch.zeros(1)}).recipes()
    with pytest.raises(UserError, match=r"bad does not fit the model: shape mismatches .*weight \[4, 4\] != \[3, 4\].*"
                                        r"missing keys \(1\): bias.*unexpected keys \(1\): extra"):
        load_recipes(module, bad, what="bad")
    assert set(materialise(good)) == {"weight", "bias"}
