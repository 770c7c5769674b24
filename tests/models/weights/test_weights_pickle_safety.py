"""Weight pickles are read without running code (models.weights.stream; docs/security.md,
"Checkpoint loads"): a pickle whose ``__reduce__`` would run ``os.system`` is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.errors import UserError
from models.weights.stream import LazyTensors, read_state_file


class Evil:
    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


@pytest.mark.parametrize("zipped", [True, False])
def test_a_malicious_weights_pickle_is_refused_and_runs_nothing(tmp_path, zipped):
    flag = tmp_path / "pwned"
    path = tmp_path / "consolidated.00.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Evil(flag)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UserError, match="cannot read weights file"):
        read_state_file(path)
    with pytest.raises(UserError, match="cannot read weights file"):
        LazyTensors.open([path])
    assert not flag.exists()


def test_a_plain_state_dict_still_loads(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"w": torch.ones(2, 3)}}, path)
    assert read_state_file(path)["w"].shape == (2, 3)
    assert LazyTensors.open([path]).read("w").sum() == 6
