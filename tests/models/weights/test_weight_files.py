"""Reading weight files and directories: safetensors / pickles, whole or sharded."""

import json

import pytest
import torch
from safetensors.torch import save_file

from models.errors import UserError
from models.weights.files import read_state_dir, read_state_file, weight_files


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
