"""Reading weights: files and directories, lazily, one target tensor at a time.

    >>> files = LazyTensors.open(weight_files("llm/"))     # headers only: keys, shapes, dtypes
    >>> state = files.recipes()                            # {key: Recipe} — nothing read yet
    >>> state["model.norm.weight"].shape                   # from the header
    (2048,)
    >>> q = state["wqkv"].then(lambda t: t[:2048])         # a slice of a packed tensor, still unread
    >>> state, left = rename(state, [(r"^norm\.", "model.norm.")], "llm/")   # a rename table applied
    >>> load_recipes(model.llm, state, what="llm/")        # strict; one tensor read at a time
    >>> read_state_file("open_clip_model.safetensors")     # {key: tensor}: small files, read whole

A directory holds one of (first found wins; :func:`weight_files`)::

    model.safetensors.index.json + the shards it names    (Hugging Face, sharded)
    model.safetensors
    pytorch_model.bin.index.json + the shards it names    (older Hugging Face, sharded)
    pytorch_model.bin

Pickles are read with ``weights_only=True`` (no code runs); a ``{"state_dict": ...}`` or
``{"model": ...}`` wrapper (training checkpoints, LLaMA2-Accessory) is unwrapped.

A :class:`Recipe` names the source tensors a target is made of and how (``build(*tensors)``): a
rename (one source, identity), a slice of a packed tensor (InternLM2's ``wqkv``, DINOv2's
``qkv``), a stack (Mixtral's per-expert weights → fused experts), a resample (DINOv2 positions),
extra vocabulary rows, a constant. Each foreign format is one adapter module of models.weights (a
literal rename table applied by :func:`rename`, plus the tensor surgery that needs code) turning
{source key: Recipe} into {model name: Recipe}; ``Recipe.shape`` runs the build on meta tensors
(headers only), so every shape check happens before a byte of weights is read.

:func:`stream` yields (name, tensor) one target at a time. A source tensor read for one target is
kept only until the last target that needs it is built (``wqkv`` → q, k, v), so memory holds one
target and its inputs: no state dict of the whole model exists anywhere. safetensors files are
read tensor by tensor (``safe_open``); PyTorch pickles are memory-mapped (``torch.load(mmap=True)``:
only the pages a tensor touches are read). Every problem is a UserError naming the file and the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from models.errors import UserError

PathLike = Union[str, Path]

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


# ---------------------------------------------------------------- files, read whole

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


# ---------------------------------------------------------------- lazy tensors and recipes


class LazyTensors:
    """The tensors of one or more weight files, by key; a tensor is read when asked for."""

    def __init__(self, name: str):
        self.name = name  # for error messages
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._readers: dict[str, Callable[[], torch.Tensor]] = {}

    @classmethod
    def open(cls, files: Sequence[PathLike]) -> "LazyTensors":
        """safetensors or PyTorch pickle files (shards of one state dict; a key twice is an error)."""
        files = [Path(f) for f in files]
        out = cls(str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)")
        for f in files:
            out._add_file(f)
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], name: str = "state dict") -> "LazyTensors":
        """Tensors already in memory (tests, small parts)."""
        out = cls(name)
        for key, value in state.items():
            out._add(key, tuple(value.shape), value.dtype, lambda v=value: v, name)
        return out

    def _add(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[], torch.Tensor],
             where: str) -> None:
        if key in self._readers:
            raise UserError(f"{where} repeats the key {key} of an earlier shard")
        self._shapes[key], self._dtypes[key], self._readers[key] = shape, dtype, read

    def _add_file(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt")
                for key in handle.keys():
                    part = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                    self._add(key, tuple(part.get_shape()), dtype, lambda k=key, h=handle: h.get_tensor(k), str(path))
                return
            state = _load_pickle(path)
        except UserError:
            raise
        except Exception as err:  # corrupt or foreign files: one clear line
            raise UserError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from None
        for key, value in state.items():
            self._add(key, tuple(value.shape), value.dtype, lambda v=value: v, str(path))

    def keys(self) -> list[str]:
        return list(self._readers)

    def __contains__(self, key: str) -> bool:
        return key in self._readers

    def recipes(self) -> dict[str, "Recipe"]:
        """{key: the identity Recipe of that tensor}, the starting point of every converter."""
        return {key: Recipe((Source(self, key),)) for key in self._readers}

    def read(self, key: str) -> torch.Tensor:
        return self._readers[key]()

    def meta(self, key: str) -> torch.Tensor:
        return torch.empty(self._shapes[key], dtype=self._dtypes[key], device="meta")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle, memory-mapped when it is a zip archive (torch.save's format), read
    without running code; a ``{"state_dict"|"model": ...}`` wrapper is unwrapped."""
    import zipfile

    import pickle

    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # an object a weights-only load refuses: nothing ran
        raise UserError(f"cannot read weights file {path}: it holds objects a weights-only load refuses "
                        f"({str(err).splitlines()[-1][:200] if str(err) else 'UnpicklingError'})") from None
    return unwrap_state(state, path)


@dataclass(frozen=True)
class Source:
    """One tensor of a LazyTensors."""

    files: LazyTensors
    key: str


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True, eq=False)
class Recipe:
    """A target tensor: ``build(*[read(s) for s in sources])``; nothing is read until asked."""

    sources: tuple[Source, ...]
    build: Callable[..., torch.Tensor] = _identity
    _shape: list = field(default_factory=list, repr=False)  # cache of the meta evaluation

    @classmethod
    def constant(cls, tensor: torch.Tensor) -> "Recipe":
        return cls((), lambda: tensor)

    @classmethod
    def combine(cls, parts: Sequence["Recipe"], build: Callable[..., torch.Tensor]) -> "Recipe":
        """One target from several recipes: ``build(*[part tensors])``."""
        sources = tuple(s for p in parts for s in p.sources)
        bounds, start = [], 0
        for p in parts:
            bounds.append((p, start, start + len(p.sources)))
            start += len(p.sources)

        def run(*tensors: torch.Tensor) -> torch.Tensor:
            return build(*[p.build(*tensors[a:b]) for p, a, b in bounds])

        return cls(sources, run)

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Recipe":
        """This target, then ``fn`` applied to it."""
        inner = self.build
        return Recipe(self.sources, lambda *tensors: fn(inner(*tensors)))

    @property
    def shape(self) -> tuple[int, ...]:
        """The target's shape, from the headers (the build run on meta tensors)."""
        if not self._shape:
            self._shape.append(tuple(self.build(*[s.files.meta(s.key) for s in self.sources]).shape))
        return self._shape[0]

    def materialise(self) -> torch.Tensor:
        return self.build(*[s.files.read(s.key) for s in self.sources])


def as_recipes(state: Mapping[str, Union[torch.Tensor, "Recipe"]], source: str) -> dict[str, "Recipe"]:
    """Converters take recipes, or tensors already in memory (models.weights.accessory, tests)."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    return {**state, **LazyTensors.from_state(tensors, source).recipes()} if tensors else dict(state)


def stream(recipes: Mapping[str, Recipe], names: Optional[Sequence[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for ``names`` (default: all, in order), one target at a time; a source
    tensor stays in memory only until the last target that needs it is built."""
    names = list(recipes) if names is None else list(names)
    left: dict[Source, int] = {}
    for name in names:
        for s in recipes[name].sources:
            left[s] = left.get(s, 0) + 1
    cache: dict[Source, torch.Tensor] = {}
    for name in names:
        recipe = recipes[name]
        inputs = []
        for s in recipe.sources:
            tensor = cache[s] if s in cache else s.files.read(s.key)
            left[s] -= 1
            if left[s] > 0:
                cache[s] = tensor
            else:
                cache.pop(s, None)
            inputs.append(tensor)
            del tensor
        yield name, recipe.build(*inputs)
        del inputs  # nothing of this target is kept while the next one is read


def materialise(recipes: Mapping[str, Recipe]) -> dict[str, torch.Tensor]:
    """Every target as a tensor: a whole state dict (for tests and small parts only)."""
    return {name: tensor.clone() if not tensor.is_contiguous() else tensor for name, tensor in stream(recipes)}


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def shape_errors(expected: Mapping[str, Any], got: Mapping[str, Any]) -> dict[str, list[str]]:
    """{"shape mismatches (source != expected)" | "missing keys" | "unexpected keys": [...]}, non-empty
    only. Values: tensors, recipes or shapes."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k} {list(_shape(got[k]))} != {list(_shape(expected[k]))}"
                    for k in set(expected) & set(got) if _shape(got[k]) != _shape(expected[k]))
    found = {"shape mismatches (source != expected)": shapes, "missing keys": missing, "unexpected keys": unexpected}
    return {label: keys for label, keys in found.items() if keys}


def shown(keys: Sequence[str], n: int = 8) -> str:
    """``a, b, ... (3 more)``: the first ``n`` keys of a list for an error message."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def report(errors: Mapping[str, Sequence[str]]) -> str:
    """shape_errors' result as one line: ``missing keys (1): skip; unexpected keys (1): extra``."""
    return "; ".join(f"{label} ({len(keys)}): {shown(keys)}" for label, keys in errors.items())


def check_fits(expected: Mapping[str, Any], got: Mapping[str, Any], what: str, against: str, *,
               unexpected_extra: Sequence[str] = ()) -> None:
    """UserError ``{what} does not fit {against}: ...`` unless ``got`` has exactly ``expected``'s
    keys and shapes (``unexpected_extra``: source keys no rule placed, reported as unexpected)."""
    errors = shape_errors(expected, got)
    if unexpected_extra:
        errors["unexpected keys"] = errors.get("unexpected keys", []) + list(unexpected_extra)
    if errors:
        raise UserError(f"{what} does not fit {against}: {report(errors)}")


# A rename table: (regex on the source key, its replacement) pairs, first match wins. A tuple of
# replacements splits the tensor in equal parts along dim 0 (packed projections: qkv, gate+up).
RenameTable = Sequence[tuple[str, Union[str, tuple[str, ...]]]]


def rename(state: Mapping[str, Recipe], table: RenameTable, source: str, *,
           keep_unmatched: bool = False) -> tuple[dict[str, Recipe], list[str]]:
    """Apply ``table`` to every key → (renamed recipes, keys no rule matched; kept as they are when
    ``keep_unmatched``). Example: ``[(r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj.")]``
    maps ``layers.3.attention.wo.weight`` to ``model.layers.3.self_attn.o_proj.weight``."""
    out: dict[str, Recipe] = {}
    unmatched = []
    compiled = [(re.compile(p), t) for p, t in table]
    for key, value in state.items():
        for pattern, target in compiled:
            if not pattern.search(key):
                continue
            if isinstance(target, str):
                out[pattern.sub(target, key)] = value
            else:
                if value.shape[0] % len(target):
                    raise UserError(f"{source}: {key} {list(value.shape)} does not split into "
                                    f"{len(target)} equal parts along dim 0")
                for i, t in enumerate(target):
                    out[pattern.sub(t, key)] = value.then(lambda v, i=i, n=len(target): v.chunk(n, dim=0)[i].contiguous())
            break
        else:
            if keep_unmatched:
                out[key] = value
            else:
                unmatched.append(key)
    return out, unmatched


def load_recipes(module: nn.Module, recipes: Mapping[str, Recipe], *, what: str, prefix: str = "") -> None:
    """Copy every ``prefix + name`` of ``module``'s state dict from ``recipes`` (strict: the
    same keys, the same shapes; a mismatch names them), one tensor read at a time."""
    own = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    mine = {k[len(prefix):]: v for k, v in recipes.items() if k.startswith(prefix)}
    check_fits(own, mine, what, "the model")
    with torch.no_grad():
        for name, tensor in stream(mine, list(own)):
            own[name].copy_(tensor)
            del tensor
