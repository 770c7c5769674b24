"""Write a model directory (``models.weights.model_dir``'s layout) one tensor at a time.

    >>> writer = ModelDirWriter("out/export", skeleton(flavour, token_ids), tokenizer, dtype=torch.bfloat16)
    >>> for name, tensor in tensors:      # SphinxX state-dict names (llm.*, vision.*), model order
    ...     writer.add(name, tensor)      # kept only until its shard is written
    >>> writer.close()                    # last shards, indexes, HF configs, tokenizer, config.json
    >>> save_model_dir(model, tokenizer, "out/m", dtype=torch.bfloat16)  # a model in memory, the same way

``model`` gives the names, shapes and Hugging Face configs; its parameters may be on the meta
device (``models.weights.model_dir.skeleton``), so the writer never needs the model in memory. The
export of a ZeRO-3 run feeds it the gathered parameters one by one (``actors.train.consolidate``).

Each Hugging Face part (``llm/``, ``convnext/``, ``dinov2/``) receives exactly what
``save_pretrained`` writes: transformers' reverse weight conversion (Mixtral's fused
``experts.gate_up_proj [E, 2f, d]`` → per-expert ``w1``/``w3``; DINOv2's ``gate_proj`` +
``up_proj`` → ``weights_in``) applied to one *block* at a time — the keys sharing a numbered
layer prefix (``model.layers.3.``, ``encoder.stages.1.layers.2.``), reverted once all of them
have arrived; a key without a layer number is a block of its own (the tests check on every
flavour that no conversion spans blocks). Tensors fill shards of at most ``max_shard_bytes``,
each written as soon as it is full, named and indexed as Hugging Face does. Memory: one block
plus one shard.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from models.weights.model_dir import (CONVNEXT_DIR, DEFAULT_MAX_SHARD_BYTES, DINO_DIR, FORMAT, FORMAT_VERSION, INDEX_FILE,
                               LLM_DIR, PARTS, PROJECTOR_FILE, SINGLE_FILE, CheckpointError, _dtype_name,
                               _own_vision_state, _save_tokenizer, geometry)
from models.sphinx import SphinxX

PathLike = Union[str, Path]
_NUMBERED = re.compile(r"^(.*\.\d+\.)")  # greedy: the prefix through the last numbered component


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """On the host, floating point in the directory's dtype, contiguous (as safetensors wants)."""
    return tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype).contiguous()


def block_of(key: str) -> str:
    """The block a part-local key belongs to: ``model.layers.3.mlp.gate.weight`` → ``model.layers.3.``;
    a key without a layer number (embeddings, final norm, head) is a block of its own."""
    found = _NUMBERED.match(key)
    return found.group(1) if found else key


class _PartWriter:
    """One Hugging Face part: blocks reverted with transformers' rules, shards written as they fill."""

    def __init__(self, directory: Path, module: nn.Module, dtype: torch.dtype, max_shard_bytes: int):
        self.dir, self.module, self.dtype, self.max_bytes = directory, module, dtype, max_shard_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.known = set(module.state_dict())
        self.waiting: dict[str, set[str]] = {}  # block → keys not yet added
        for key in self.known:
            self.waiting.setdefault(block_of(key), set()).add(key)
        self.blocks: dict[str, dict[str, torch.Tensor]] = {}
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = self.params = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        block = block_of(key)
        left = self.waiting.get(block, set())
        if key not in left:
            what = "given twice" if key in self.known else "the model has no such key"
            raise CheckpointError(f"{self.dir.name}/{key}: {what}")
        left.remove(key)
        self.params += tensor.numel()
        self.blocks.setdefault(block, {})[key] = tensor
        if not left:
            del self.waiting[block]
            for name, value in revert_weight_conversion(self.module, self.blocks.pop(block)).items():
                self._put(name, value)

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        tensor = _stored(tensor, self.dtype)
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self._flush()
        self.shard[name] = tensor
        self.shard_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self.files):05d}.partial"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.files.append((path, sorted(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> dict[str, Any]:
        missing = sorted(k for keys in self.waiting.values() for k in keys)
        if missing:
            raise CheckpointError(f"{self.dir.name}: no tensor given for {len(missing)} key(s): "
                                  + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if self.shard or not self.files:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.dir / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_parameters": self.params, "total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = self.module.config
        config.architectures = [type(self.module).__name__]
        config.dtype = _dtype_name(self.dtype)  # what from_pretrained(dtype="auto") loads
        config.save_pretrained(str(self.dir))
        if self.module.can_generate():
            self.module.generation_config.save_pretrained(str(self.dir))
        return {"class": type(self.module).__name__, "model_type": config.model_type, "params": self.params}


class ModelDirWriter:
    """A model directory written tensor by tensor (module docstring). ``add`` takes SphinxX
    state-dict names; ``close`` checks every key was given and writes config.json last."""

    def __init__(self, directory: PathLike, model: SphinxX, tokenizer, *, dtype: torch.dtype,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source: Optional[dict[str, Any]] = None):
        self.out = Path(directory)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in [self.out / LLM_DIR, self.out / CONVNEXT_DIR, self.out / DINO_DIR]:
            if stale.is_dir():
                shutil.rmtree(stale)
        for stale in [self.out / PROJECTOR_FILE, self.out / "config.json", self.out / SINGLE_FILE,
                      self.out / INDEX_FILE, *self.out.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
        self.model, self.tokenizer, self.dtype, self.source = model, tokenizer, dtype, source
        vision = model.vision
        self.parts = {name: _PartWriter(self.out / PARTS[name][0], module, dtype, max_shard_bytes)
                      for name, module in (("llm", model.llm), ("convnext", vision.convnext), ("dinov2", vision.dino))}
        self.own_keys = {f"vision.{k}" for k in _own_vision_state(vision)}
        self.own: dict[str, torch.Tensor] = {}  # projector, start, end, skip: small, written at close

    def add(self, name: str, tensor: torch.Tensor) -> None:
        for part, (_, prefix) in PARTS.items():
            if part != "mm_projector" and name.startswith(prefix):
                return self.parts[part].add(name[len(prefix):], tensor)
        if name not in self.own_keys or name in self.own:
            raise CheckpointError(f"{name}: " + ("given twice" if name in self.own else "the model has no such key"))
        self.own[name] = _stored(tensor, self.dtype)

    def close(self) -> Path:
        parts = {name: {"path": PARTS[name][0], **writer.close()} for name, writer in self.parts.items()}
        missing = sorted(self.own_keys - set(self.own))
        if missing:
            raise CheckpointError(f"{PROJECTOR_FILE}: no tensor given for {', '.join(missing)}")
        own = {k[len("vision."):]: v for k, v in self.own.items()}
        save_file(own, str(self.out / PROJECTOR_FILE), metadata={"format": "pt"})
        parts["mm_projector"] = {"path": PROJECTOR_FILE, "params": sum(v.numel() for v in own.values()),
                                 "keys": sorted(own)}
        if self.tokenizer is not None:
            _save_tokenizer(self.tokenizer, self.out / LLM_DIR)
        model = self.model
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "flavour": model.flavour.to_dict(),
                  "geometry": geometry(model.flavour), "token_ids": model.token_ids(),
                  "dtype": _dtype_name(self.dtype), "parts": parts,
                  "tokenizer": {"path": LLM_DIR, "size": len(self.tokenizer)} if self.tokenizer is not None else None}
        if self.source:
            config["source"] = self.source
        (self.out / "config.json").write_text(json.dumps(config, indent=2))
        return self.out


def save_model_dir(model: SphinxX, tokenizer, directory: PathLike, *,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Optional[torch.dtype] = None,
                   source: Optional[dict[str, Any]] = None) -> Path:
    """A model in memory as a model directory (``models.weights.model_dir``'s layout) in ``dtype``
    (default: the LLM's own), through ``ModelDirWriter`` as the training export's tensors go.

    ``tokenizer`` goes to ``llm/``; ``source`` (e.g. what convert read) is recorded in config.json."""
    writer = ModelDirWriter(directory, model, tokenizer, dtype=dtype or model.llm.get_input_embeddings().weight.dtype,
                            max_shard_bytes=max_shard_bytes, source=source)
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor)
    return writer.close()
