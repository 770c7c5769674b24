"""Reading published weight files: safetensors or PyTorch pickles, whole or sharded.

    >>> state = read_state_file("open_clip_model.safetensors")        # {key: tensor}
    >>> state = read_state_dir("internlm2-7b/")                        # the shards an index names

A directory holds one of (first found wins)::

    model.safetensors.index.json + the shards it names    (Hugging Face, sharded)
    model.safetensors
    pytorch_model.bin.index.json + the shards it names    (older Hugging Face, sharded)
    pytorch_model.bin

Pickles are read with ``weights_only=True`` (no code runs); a ``{"state_dict": ...}`` or
``{"model": ...}`` wrapper (training checkpoints, LLaMA2-Accessory) is unwrapped. Every problem
is a UserError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from models.errors import UserError

PathLike = Union[str, Path]

_DIR_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_state_file(path: PathLike) -> dict[str, torch.Tensor]:
    """One .safetensors or PyTorch pickle (.bin/.pt/.pth) file → {key: tensor} (on CPU)."""
    src = Path(path)
    if not src.is_file():
        raise UserError(f"weights file not found: {src}")
    try:
        if src.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(src))
        else:
            state = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files: one clear line
        raise UserError(f"cannot read weights file {src}: {type(err).__name__}: {err}") from None
    return unwrap_state(state, src)


def unwrap_state(state, src: PathLike) -> dict[str, torch.Tensor]:
    """A loaded pickle → its state dict: a ``{"state_dict"|"model": ...}`` wrapper is unwrapped."""
    for wrapper in ("state_dict", "model"):  # a training checkpoint: tensors under one key
        if isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()) \
                and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{src} does not hold a state dict of tensors")
    return dict(state)


def weight_files(directory: PathLike, layouts: tuple[tuple[str, str], ...] = _DIR_LAYOUTS) -> list[Path]:
    """The weight files a Hugging Face style directory holds (see the module docstring):
    for each (index, single file) of ``layouts`` in turn, the shards the index names, or the file."""
    src = Path(directory)
    if not src.is_dir():
        raise UserError(f"weights directory not found: {src}")
    for index_name, single in layouts:
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{index} is not a weights index (needs a 'weight_map'): {err}") from None
            files = [src / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise UserError(f"{index} names {f.name}, which is missing")
            return files
        if (src / single).is_file():
            return [src / single]
    names = ", ".join(n for pair in layouts for n in pair)
    raise UserError(f"no weights in {src} (looked for {names})")


def read_state_dir(directory: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face style directory, shards merged (a key twice is an error)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        part = read_state_file(f)
        twice = sorted(set(part) & set(state))
        if twice:
            raise UserError(f"{f} repeats keys of an earlier shard: {', '.join(twice[:5])}")
        state.update(part)
    return state
