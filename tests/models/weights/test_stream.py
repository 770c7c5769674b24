"""models.weights.stream: weight files whole or sharded, lazy files, recipes checked from headers,
rename tables, one target at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.errors import UserError
from models.weights.stream import (LazyTensors, Recipe, load_recipes, materialise, read_state_dir, read_state_file,
                                   rename, stream, weight_files)


def test_files_and_wrappers(tmp_path):
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pt")  # a training checkpoint
    torch.save({"model": state}, tmp_path / "consolidated.00-of-01.model.pth")  # LLaMA2-Accessory
    for name in ("w.safetensors", "ckpt.pt", "consolidated.00-of-01.model.pth"):
        got = read_state_file(tmp_path / name)
        assert sorted(got) == ["a", "b"] and torch.equal(got["a"], state["a"])
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(UserError, match=r"nothing\.pt does not hold a state dict"):
        read_state_file(tmp_path / "nothing.pt")


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_directories(tmp_path, kind):
    shards = {f"model-0000{i}-of-00002.{kind}": {f"k{i}": torch.full((2,), float(i))} for i in (1, 2)}
    for name, part in shards.items():
        save_file(part, str(tmp_path / name)) if kind == "safetensors" else torch.save(part, tmp_path / name)
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"weight_map": {k: n for n, part in shards.items() for k in part}}))
    assert [f.name for f in weight_files(tmp_path)] == sorted(shards)
    assert sorted(read_state_dir(tmp_path)) == ["k1", "k2"]
    (tmp_path / sorted(shards)[1]).unlink()
    with pytest.raises(UserError, match=f"{index} names model-00002-of-00002.{kind}, which is missing"):
        read_state_dir(tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(UserError, match="no weights in"):
        weight_files(tmp_path)
    with pytest.raises(UserError, match="weights directory not found"):
        weight_files(tmp_path / "nope")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="is not a weights index"):
        weight_files(tmp_path)


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


def test_rename_tables_rename_split_and_report_the_rest():
    state = LazyTensors.from_state({"layers.0.attention.wo.weight": torch.ones(2, 2),
                                    "blocks.1.attn.qkv.weight": torch.arange(12.0).reshape(6, 2),
                                    "other": torch.zeros(1)}).recipes()
    table = [(r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
             (r"^blocks\.(\d+)\.attn\.qkv\.", tuple(rf"layer.\1.{p}." for p in "qkv"))]
    out, left = rename(state, table, "src")
    assert sorted(out) == ["layer.1.k.weight", "layer.1.q.weight", "layer.1.v.weight",
                           "model.layers.0.self_attn.o_proj.weight"] and left == ["other"]
    assert torch.equal(out["layer.1.k.weight"].materialise(), torch.arange(4.0, 8.0).reshape(2, 2))
    assert "other" in rename(state, table, "src", keep_unmatched=True)[0]
    with pytest.raises(UserError, match=r"src: blocks.1.attn.qkv.weight \[6, 2\] does not split into 4"):
        rename(state, [(r"qkv", ("a", "b", "c", "d"))], "src")
