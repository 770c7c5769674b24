"""Model directories (save / load) and importing pretrained LLM and encoder weights.

A model directory, as written by :func:`save_model_dir`::

    config.json                       {"format": "sphinx-x", "format_version": 1,
                                       "flavour": {...every field, overrides included...},
                                       "token_ids": {vocab_size, image_token_id, pad/bos/eos}}
    model.safetensors                 the whole state dict, or, above ``max_shard_bytes``,
    model-00001-of-0000K.safetensors  HF-style shards + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, ...   (tokenizer.save_pretrained)

    >>> save_model_dir(model, tokenizer, "out/export")
    >>> model, tokenizer = load_model_dir("out/export", dtype=torch.bfloat16)

Pretrained weights (never from a hub; local directories or files only):

- :func:`import_llm_weights` — a local HF Llama / Mixtral directory (config.json + safetensors,
  sharded or not) into ``model.llm``; transformers' own loader handles its on-disk layouts
  (e.g. Mixtral's per-expert w1/w2/w3). Extra tokenizer rows (``<image>``) stay as initialised.
- :func:`import_encoder_weights` — a ConvNeXt or DINOv2 state dict (.safetensors or .bin, keys
  as in transformers' ConvNextModel / Dinov2Model, optionally prefixed ``convnext.`` /
  ``dinov2.``) into ``model.vision``.
- :func:`import_weights_dir` — a directory laid out as ``llm/``, ``convnext.safetensors|bin``,
  ``dinov2.safetensors|bin`` (any subset), as named by ``model.weights`` in the spec.

Every mismatch raises a UserError listing the missing / unexpected / mis-shaped keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.flavours import Flavour
from models.sphinx import SphinxX

FORMAT = "sphinx-x"
FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

PathLike = Union[str, Path]


class CheckpointError(UserError):
    """A model directory or weights file that cannot be used as asked."""


# ---------------------------------------------------------------- save / load


def save_model_dir(model: SphinxX, tokenizer, directory: PathLike, *,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write config.json, the weights (sharded above ``max_shard_bytes``) and the tokenizer."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _check_untied(state)
    shards = _split(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "flavour": model.flavour.to_dict(),
              "token_ids": model.token_ids(), "dtype": str(next(iter(state.values())).dtype).replace("torch.", "")}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_model_dir(directory: PathLike, device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None) -> tuple[SphinxX, object]:
    """(model, tokenizer) from a directory written by :func:`save_model_dir`."""
    src = Path(directory)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"not a sphinx-x model directory (no config.json): {src}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a sphinx-x model config (format={config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{src} has format_version {config.get('format_version')}; "
                              f"this code reads {FORMAT_VERSION}")
    try:
        flavour = Flavour.from_dict(config["flavour"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{config_path}: bad flavour: {err}") from None
    model = SphinxX(flavour, **config["token_ids"])
    state = read_safetensors_dir(src)
    _load_strict(model, state, f"model directory {src}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return model, _load_tokenizer(src)


def _load_tokenizer(src: Path):
    if not (src / "tokenizer_config.json").is_file() and not (src / "tokenizer.json").is_file():
        return None
    from models.conversation import load_tokenizer

    return load_tokenizer(src)


def _check_untied(state: dict[str, torch.Tensor]) -> None:
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            raise CheckpointError(f"{key} shares memory with {seen[ident]}: tied weights are not supported "
                                  "(set tie_word_embeddings false)")
        seen[ident] = key


def _split(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards of at most max_bytes each (a single larger tensor gets its own shard)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def read_safetensors_dir(directory: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by its index json."""
    src = Path(directory)
    if (src / INDEX_FILE).is_file():
        weight_map = json.loads((src / INDEX_FILE).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            if not (src / name).is_file():
                raise CheckpointError(f"{src / INDEX_FILE} names {name}, which is missing")
            state.update(load_file(str(src / name)))
        return state
    if (src / SINGLE_FILE).is_file():
        return load_file(str(src / SINGLE_FILE))
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {src}")


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {list(state[k].shape)} != {list(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{what} does not match the model: " + _key_report(missing, unexpected, shapes))
    module.load_state_dict(state, strict=True)


def _key_report(missing: list[str], unexpected: list[str], shapes: list[str] = ()) -> str:
    def part(label: str, keys) -> str:
        keys = list(keys)
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
        return f"{label} ({len(keys)}): {shown}"

    parts = [part(label, keys) for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    return "; ".join(parts)


# ---------------------------------------------------------------- importing pretrained weights


def import_llm_weights(model: SphinxX, hf_dir: PathLike) -> None:
    """Load a local HF Llama / Mixtral directory into ``model.llm`` (strict, with a clear error)."""
    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"not a Hugging Face model directory (no config.json): {src}")
    if not ((src / SINGLE_FILE).is_file() or (src / INDEX_FILE).is_file()):
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {src} (only safetensors are read)")
    cls = type(model.llm)
    try:
        hf, info = cls.from_pretrained(str(src), local_files_only=True, output_loading_info=True,
                                       dtype=model.llm.get_input_embeddings().weight.dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"cannot load {cls.__name__} weights from {src}: {err}") from None
    if info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise CheckpointError(f"{src} does not match {cls.__name__}: " + _key_report(
            sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ())),
            sorted(str(m) for m in info.get("mismatched_keys", ()))))
    theirs, own = hf.state_dict(), model.llm.state_dict()
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = []
    for key in sorted(set(own) & set(theirs)):
        a, b = theirs[key], own[key]
        vocab_rows = key.endswith(("embed_tokens.weight", "lm_head.weight")) and a.shape[1:] == b.shape[1:] \
            and a.shape[0] <= b.shape[0]
        if a.shape != b.shape and not vocab_rows:
            shapes.append(f"{key} {list(a.shape)} != {list(b.shape)}")
    if missing or unexpected or shapes:
        raise CheckpointError(f"{src} does not fit flavour {model.flavour.name!r}: "
                              + _key_report(missing, unexpected, shapes))
    with torch.no_grad():
        for key, value in theirs.items():  # extra vocab rows (<image>, pad) keep their init
            own[key][: value.shape[0]].copy_(value)


def import_encoder_weights(model: SphinxX, which: str, path: PathLike) -> None:
    """Load ConvNeXt (``which='convnext'``) or DINOv2 (``'dino'``) weights from .safetensors/.bin."""
    encoders = {"convnext": model.vision.convnext, "dino": model.vision.dino}
    if which not in encoders:
        raise CheckpointError(f"unknown encoder {which!r}; expected one of {sorted(encoders)}")
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"{which} weights file not found: {src}")
    try:
        if src.suffix == ".safetensors":
            state = load_file(str(src))
        else:
            state = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files: one clear line
        raise CheckpointError(f"cannot read {which} weights {src}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    prefixes = ("convnext.", "dinov2.", "model.", "vision_model.")
    state = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in state.items()}
    _load_strict(encoders[which], state, f"{which} weights {src}")


def import_weights_dir(model: SphinxX, directory: PathLike) -> list[str]:
    """Import whatever a weights directory holds (``llm/``, ``convnext.*``, ``dinov2.*``); returns what."""
    src = Path(directory)
    if not src.is_dir():
        raise CheckpointError(f"weights directory not found: {src}")
    done = []
    if (src / "llm").is_dir():
        import_llm_weights(model, src / "llm")
        done.append("llm")
    for which, stem in (("convnext", "convnext"), ("dino", "dinov2")):
        for suffix in (".safetensors", ".bin"):
            if (src / f"{stem}{suffix}").is_file():
                import_encoder_weights(model, which, src / f"{stem}{suffix}")
                done.append(which)
                break
    if not done:
        raise CheckpointError(f"{src} holds none of llm/, convnext.safetensors|bin, dinov2.safetensors|bin")
    return done

