"""The one model directory: written by export and convert, read by training init and serving.

A model directory (format_version 2)::

    config.json                 {"format": "sphinx-x", "format_version": 2, "flavour": {...every field...},
                                 "geometry": {grid, tile_size, canvas, mean_u8, pad, skip_tokens,
                                              tokens_per_view, max_image_tokens},
                                 "token_ids": {vocab_size, image_token_id, pad/bos/eos_token_id},
                                 "dtype": "bfloat16", "parts": {...}, "source": {...}?}
    llm/                        a Hugging Face causal-LM directory (LlamaForCausalLM / MixtralForCausalLM
                                save_pretrained: config.json with model_type, generation_config.json,
                                model.safetensors or model-0000K-of-0000N.safetensors + index) and its
                                tokenizer (tokenizer.json, tokenizer_config.json; <image> included):
                                AutoModelForCausalLM / AutoTokenizer load it unchanged
    convnext/                   ConvNextModel.save_pretrained (config.json + safetensors)
    dinov2/                     Dinov2Model.save_pretrained
    mm_projector.safetensors    projector.0.{weight,bias} (Linear), projector.1.{weight,bias} (LayerNorm),
                                start, end, skip [d_llm] — models.vision's own parameters

    >>> save_model_dir(model, tokenizer, "out/export", dtype=torch.bfloat16)   # models.weights.model_dir_writer
    >>> model, tokenizer = load_model_dir("out/export")                         # in the stored dtype
    >>> inspect_model_dir("out/export")["parts"]["llm"]["params"]               # headers only

Every part is written in one dtype (``dtype``, default the model's own: bf16 when trained in
bf16), sharded past ``max_shard_bytes`` (5 GB, as Hugging Face does) with an index.
``load_model_dir`` builds the model with its parameters on the meta device (no random init, no
second copy), loads the LLM with transformers' own loader (its on-disk layouts, e.g. Mixtral's
per-expert tensors) and the rest strictly; every missing, unexpected or mis-shaped key is a
CheckpointError naming the file and the key.

Training from published weights (LLM and encoder directories, or a model directory like this
one) is actors.train.initial_weights: it reads them one tensor at a time (models.weights.stream).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from models.errors import UserError
from models.flavours import Flavour
from models.sphinx import SphinxX
from models.tiling import TileSpec, image_token_count

FORMAT = "sphinx-x"
FORMAT_VERSION = 2
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LLM_DIR, CONVNEXT_DIR, DINO_DIR = "llm", "convnext", "dinov2"
PROJECTOR_FILE = "mm_projector.safetensors"
# each part → (where it lives in the directory, its prefix in SphinxX.state_dict())
PARTS = {"llm": (LLM_DIR, "llm."), "convnext": (CONVNEXT_DIR, "vision.convnext."),
         "dinov2": (DINO_DIR, "vision.dino."), "mm_projector": (PROJECTOR_FILE, "vision.")}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"

PathLike = Union[str, Path]


class CheckpointError(UserError):
    """A model directory or weights file that cannot be used as asked."""


# ---------------------------------------------------------------- save


def geometry(flavour: Flavour) -> dict[str, Any]:
    """What config.json records of the image geometry (models.tiling), derived from the flavour.
    ``max_image_tokens``: a square image's count (every tile kept; a 1×1 image scales to C×C)."""
    spec = TileSpec.from_flavour(flavour)
    n = flavour.tokens_per_view
    return {**spec.to_dict(), "tokens_per_view": n, "max_image_tokens": image_token_count(1, 1, spec, n)}


# strings whose ids a saved tokenizer must reproduce after AutoTokenizer.from_pretrained
_PROBES = ("Hello world", " Human: hi\n###", "  two  spaces", "digits 12345 and 6.7", "émoji ☃", "<s> x </s>")


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """Save so that AutoTokenizer loads the same tokenizer. Some classes rebuild their
    normaliser on load (transformers 5's LlamaTokenizer puts a Metaspace pre-tokenizer in
    place of sentencepiece's prepend-and-replace, which changes text after a leading space):
    such a tokenizer is stored as its backend, under the generic fast class."""
    tokenizer.save_pretrained(str(directory))
    if _reloads_same(tokenizer, directory):
        return
    from transformers import PreTrainedTokenizerFast

    generic = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map,
                                      extra_special_tokens=list(getattr(tokenizer, "extra_special_tokens", ()) or ()))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (directory / name).unlink(missing_ok=True)
    generic.save_pretrained(str(directory))
    if not _reloads_same(tokenizer, directory):
        raise CheckpointError(f"the tokenizer saved in {directory} does not load back as the same tokenizer "
                              f"({type(tokenizer).__name__})")


def _reloads_same(tokenizer, directory: Path) -> bool:
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if len(again) != len(tokenizer) or again.get_vocab() != tokenizer.get_vocab():
        return False
    for text in _PROBES:
        for kwargs in ({"add_special_tokens": True}, {"add_special_tokens": False, "split_special_tokens": True}):
            if again(text, **kwargs)["input_ids"] != tokenizer(text, **kwargs)["input_ids"]:
                return False
    return True


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state.items()}


def _own_vision_state(vision: nn.Module) -> dict[str, torch.Tensor]:
    """models.vision's parameters outside the two towers: projector, start, end, skip."""
    return {k: v for k, v in vision.state_dict().items() if not k.startswith(("convnext.", "dino."))}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- load


def read_config(directory: PathLike) -> dict[str, Any]:
    """config.json of a model directory, checked: format, version, flavour, geometry, token ids."""
    src = Path(directory)
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"not a sphinx-x model directory (no config.json): {src}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sphinx-x model config (format={config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')}; this code reads "
                              f"{FORMAT_VERSION} (re-export the model with this version)")
    for key in ("flavour", "token_ids", "geometry", "dtype"):
        if key not in config:
            raise CheckpointError(f"{path}: no {key!r}")
    try:
        flavour = Flavour.from_dict(config["flavour"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: bad flavour: {err}") from None
    derived = geometry(flavour)
    for key, value in config["geometry"].items():
        if derived.get(key) != value:
            raise CheckpointError(f"{path}: geometry.{key} is {value!r} but the flavour gives {derived.get(key)!r}")
    missing = sorted({"vocab_size", "image_token_id", "pad_token_id", "bos_token_id", "eos_token_id"}
                     - set(config["token_ids"]))
    if missing:
        raise CheckpointError(f"{path}: token_ids lacks {', '.join(missing)}")
    if not hasattr(torch, str(config["dtype"])):
        raise CheckpointError(f"{path}: unknown dtype {config['dtype']!r}")
    config["flavour"] = flavour
    return config


def load_model_dir(directory: PathLike, device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None) -> tuple[SphinxX, object]:
    """(model in eval mode, tokenizer) from a model directory; ``dtype`` None keeps the stored one."""
    src = Path(directory)
    config = read_config(src)
    flavour, ids = config["flavour"], config["token_ids"]
    dtype = dtype or getattr(torch, config["dtype"])
    model = skeleton(flavour, ids)
    _llm_config(src / LLM_DIR, flavour)
    for part, module in _hf_parts(model):
        part_dir = src / PARTS[part][0]
        _load_strict(module, _hf_state(part_dir, module, dtype), str(part_dir), assign=True)
    projector = src / PROJECTOR_FILE
    if not projector.is_file():
        raise CheckpointError(f"{projector} is missing")
    expected = _own_vision_state(model.vision)
    state = load_file(str(projector))
    _check_keys(expected, state, str(projector))
    model.vision.load_state_dict(_cast(state, dtype), strict=False, assign=True)
    left = sorted(name for name, p in model.named_parameters() if p.is_meta)
    if left:
        raise CheckpointError(f"{src}: no weights for {len(left)} parameter(s): {_shown(left)}")
    # parameters are in ``dtype`` already; buffers (rotary frequencies, pixel statistics) stay fp32
    model = model.to(device=device)
    model.set_vision_trainable(not flavour.freeze_vision)
    model.eval()
    return model, _load_tokenizer(src / LLM_DIR)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (rotary
    tables, normalisation constants are not in the weights). Patches nn.Module for the duration:
    build nothing else on another thread meanwhile."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def skeleton(flavour: Flavour, token_ids: dict[str, int]) -> SphinxX:
    """The flavour's SphinxX with every parameter on the meta device (shapes only, no memory)."""
    with _parameters_on_meta():
        return SphinxX(flavour, **{k: int(token_ids[k]) for k in
                                   ("vocab_size", "image_token_id", "pad_token_id", "bos_token_id", "eos_token_id")})


def _hf_parts(model: SphinxX) -> list[tuple[str, nn.Module]]:
    return [("llm", model.llm), ("convnext", model.vision.convnext), ("dinov2", model.vision.dino)]


def _hf_state(part_dir: Path, module: nn.Module, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """A Hugging Face part directory's tensors under ``module``'s state-dict names, read by
    transformers' own loader (it maps the on-disk layouts: Mixtral's per-expert tensors, DINOv2's
    legacy names). Any key it could not place is an error naming the file."""
    cls = type(module)
    if not (part_dir / "config.json").is_file():
        raise CheckpointError(f"{part_dir} is not a Hugging Face model directory (no config.json)")
    safetensors_files(part_dir)  # the index and every shard it names are there
    try:
        # mismatched shapes are reported in ``info`` (and raised below, naming the keys), not raised bare
        hf, info = cls.from_pretrained(str(part_dir), local_files_only=True, output_loading_info=True, dtype=dtype,
                                       ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"cannot load {cls.__name__} from {part_dir}: {err}") from None
    _raise_loading_info(info, part_dir)
    return hf.state_dict()


def _llm_config(llm_dir: Path, flavour: Flavour) -> dict[str, Any]:
    """llm/config.json, checked against the flavour's LLM settings (the flavour built the model)."""
    path = llm_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{llm_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    want = {"llama": "llama", "mixtral": "mixtral"}[flavour.llm_arch]
    if config.get("model_type") != want:
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r}, flavour "
                              f"{flavour.name!r} needs {want!r}")
    for key, value in flavour.llm.items():
        if key != "vocab_size" and key in config and config[key] != value:
            raise CheckpointError(f"{path}: {key} is {config[key]!r} but flavour {flavour.name!r} has {value!r}")
    return config


def _raise_loading_info(info: dict[str, Any], where: Path) -> None:
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    shapes = sorted(str(m) for m in info.get("mismatched_keys", ()))
    if missing or unexpected or shapes:
        raise CheckpointError(f"{_weights_named(where)} does not match the model: "
                              + _key_report(missing, unexpected, shapes))


def _weights_named(directory: Path) -> str:
    """The weight file(s) of an HF directory, for error messages."""
    if (directory / INDEX_FILE).is_file():
        return str(directory / INDEX_FILE)
    return str(directory / SINGLE_FILE)


def _load_tokenizer(src: Path):
    if not (src / "tokenizer_config.json").is_file() and not (src / "tokenizer.json").is_file():
        return None
    from models.conversation import load_tokenizer

    return load_tokenizer(src)


def safetensors_files(directory: PathLike) -> list[Path]:
    """The safetensors file(s) of a directory: ``model.safetensors`` or the shards its index names."""
    from models.weights.files import weight_files

    try:
        return weight_files(directory, layouts=((INDEX_FILE, SINGLE_FILE),))
    except CheckpointError:
        raise
    except UserError as err:
        raise CheckpointError(str(err)) from None


def part_files(directory: PathLike) -> dict[str, list[Path]]:
    """Each part's weight files (``PARTS`` gives its prefix in SphinxX names); for streaming readers."""
    src = Path(directory)
    read_config(src)
    return {name: ([src / path] if path.endswith(".safetensors") else safetensors_files(src / path))
            for name, (path, _) in PARTS.items()}


def _check_keys(expected: dict[str, torch.Tensor], state: dict[str, Any], what: str) -> None:
    """Exactly the expected keys with the expected shapes (``state`` values: tensors or shapes)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {list(_shape(state[k]))} != {list(expected[k].shape)}"
                    for k in set(expected) & set(state) if tuple(_shape(state[k])) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        raise CheckpointError(f"{what} does not match the model: " + _key_report(missing, unexpected, shapes))


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, *, assign: bool = False) -> None:
    _check_keys(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True, assign=assign)


def _shown(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _key_report(missing: list[str], unexpected: list[str], shapes: list[str] = ()) -> str:
    parts = [f"{label} ({len(keys)}): {_shown(list(keys))}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    return "; ".join(parts)


# ---------------------------------------------------------------- inspect (no tensors read)


def inspect_model_dir(directory: PathLike) -> dict[str, Any]:
    """What a model directory holds, from config.json and the safetensors headers alone.

    Returns ``{"path", "flavour", "geometry", "token_ids", "dtype", "tokenizer": {"size", ...},
    "parts": {part: {"files", "dtypes", "params", "tensors"}}, "params": {"llm", "vision",
    "projector", "total"}}``. Raises CheckpointError naming the file and the key for anything
    that would not load: a missing, unexpected or mis-shaped key, a dtype other than the
    recorded one, a tokenizer that does not fit the token ids."""
    src = Path(directory)
    config = read_config(src)
    flavour, ids = config["flavour"], config["token_ids"]
    model = skeleton(flavour, ids)
    parts: dict[str, Any] = {}
    llm_dir = src / LLM_DIR
    _llm_config(llm_dir, flavour)
    for part, module in _hf_parts(model):
        part_dir = src / PARTS[part][0]
        parts[part] = _headers(safetensors_files(part_dir))
        on_disk = parts[part].pop("shapes")
        # the names save_pretrained writes (transformers' reverse conversion, on meta tensors)
        if {k: tuple(v.shape) for k, v in revert_weight_conversion(module, module.state_dict()).items()} != on_disk:
            # another writer's layout (legacy names, another transformers): its loader decides, key by key
            _check_keys(module.state_dict(), _hf_state(part_dir, module, None), str(part_dir))
    projector = src / PROJECTOR_FILE
    if not projector.is_file():
        raise CheckpointError(f"{projector} is missing")
    parts["mm_projector"] = _headers([projector])
    _check_keys(_own_vision_state(model.vision), parts["mm_projector"].pop("shapes"), str(projector))
    for part, found in parts.items():
        other = sorted(set(found["dtypes"]) - {config["dtype"]})
        if other:
            raise CheckpointError(f"{src / PARTS[part][0]}: tensors in {', '.join(other)}, config.json says "
                                  f"{config['dtype']}")
    tokenizer = _load_tokenizer(llm_dir)
    tok = None
    if tokenizer is not None:
        from models.conversation import IMAGE

        tok = {"size": len(tokenizer), "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE),
               "class": type(tokenizer).__name__}
        if tok["size"] > ids["vocab_size"]:
            raise CheckpointError(f"{llm_dir}: the tokenizer has {tok['size']} tokens, more than the "
                                  f"vocab_size {ids['vocab_size']} of {src / 'config.json'}")
        for name, value in (("image_token_id", tok["image_token_id"]), ("bos_token_id", tokenizer.bos_token_id),
                            ("eos_token_id", tokenizer.eos_token_id)):
            if value != ids[name]:
                raise CheckpointError(f"{llm_dir}: the tokenizer's {name} is {value}, "
                                      f"{src / 'config.json'} says {ids[name]}")
    vision = parts["convnext"]["params"] + parts["dinov2"]["params"]
    return {"path": str(src), "format_version": config["format_version"], "flavour": flavour.name,
            "geometry": config["geometry"], "token_ids": ids, "dtype": config["dtype"], "tokenizer": tok,
            "parts": parts, "source": config.get("source"),
            "params": {"llm": parts["llm"]["params"], "vision": vision,
                       "projector": parts["mm_projector"]["params"],
                       "total": parts["llm"]["params"] + vision + parts["mm_projector"]["params"]}}


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}


def _headers(files: list[Path]) -> dict[str, Any]:
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    shapes[key] = tuple(piece.get_shape())
                    dtypes.add(_SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
        except Exception as err:  # a truncated or foreign file: one clear line
            raise CheckpointError(f"cannot read {f}: {type(err).__name__}: {err}") from None
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"files": [str(f) for f in files], "dtypes": sorted(dtypes), "params": params,
            "tensors": len(shapes), "shapes": shapes}
