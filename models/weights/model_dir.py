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
    clip/                       CLIPVisionModel.save_pretrained          } only the four-branch releases
    blip2_vision/               Blip2VisionModel.save_pretrained         } (flavour.clip / flavour.qformer:
    qformer/                    Blip2QFormerModel.save_pretrained        }  models.vision, models.qformer)
    mm_projector.safetensors    projector.0.{weight,bias} (Linear), projector.1.{weight,bias} (LayerNorm),
                                start, end, skip [d_llm] — models.vision's own parameters (four-branch:
                                also qformer_proj.0/1 and qformer.query_tokens [1, Q, 768])

    >>> save_model_dir(model, tokenizer, "out/export", dtype=torch.bfloat16)   # a model in memory
    >>> writer = ModelDirWriter("out/export", skeleton(flavour, token_ids), tokenizer, dtype=torch.bfloat16)
    >>> writer.add("llm.model.norm.weight", tensor)     # SphinxX names, one tensor at a time; close() last
    >>> model, tokenizer = load_model_dir("out/export")                         # in the stored dtype
    >>> weights = read_weights("out/export")                                    # unread: {part: {name: Recipe}}
    >>> inspect_model_dir("out/export")["parts"]["llm"]["params"]               # headers only

Write: every part in one dtype (``dtype``, default the model's own: bf16 when trained in bf16).
``ModelDirWriter`` takes the model's names, shapes and Hugging Face configs from a model whose
parameters may be on the meta device (:func:`skeleton`), so the training export (a ZeRO-3 run's
parameters gathered one by one, actors.train.consolidate) never holds the model. Each Hugging
Face part receives exactly what ``save_pretrained`` writes: transformers' reverse weight
conversion (Mixtral's fused ``experts.gate_up_proj [E, 2f, d]`` → per-expert ``w1``/``w3``;
DINOv2's ``gate_proj`` + ``up_proj`` → ``weights_in``) applied to one *block* at a time — the
keys sharing a numbered layer prefix (``model.layers.3.``, ``encoder.stages.1.layers.2.``), reverted
once all of them have arrived (:func:`block_of`; the tests check on every flavour that no
conversion spans blocks). Tensors fill shards of at most ``max_shard_bytes`` (5 GB, as Hugging
Face does), each written as soon as it is full, named and indexed as Hugging Face does. Memory:
one block plus one shard. config.json is written last.

Read: ``load_model_dir`` builds the model with its parameters on the meta device (no random
init, no second copy), loads each Hugging Face part with transformers' own loader (its on-disk
layouts) and the projector strictly; every missing, unexpected or mis-shaped key is a
CheckpointError naming the file and the key. ``read_weights`` is the streaming read (training
init, the vLLM loader): each part through its format's adapter (models.weights.hf_llm,
models.weights.encoders), nothing read until streamed (models.weights.stream).
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from models.errors import UserError
from models.flavours import Flavour
from models.sphinx import SphinxX
from models.tiling import TileSpec, image_token_count
from models.weights.hf_llm import save_llm_tokenizer
from models.weights.stream import LazyTensors, Recipe, report, shape_errors, shown, stream, weight_files

FORMAT = "sphinx-x"
FORMAT_VERSION = 2
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LLM_DIR, CONVNEXT_DIR, DINO_DIR = "llm", "convnext", "dinov2"
CLIP_DIR, BLIP2_VISION_DIR, QFORMER_DIR = "clip", "blip2_vision", "qformer"
PROJECTOR_FILE = "mm_projector.safetensors"
# each part → (where it lives in the directory, its prefix in SphinxX.state_dict()); the last three only
# where the flavour has the branch (parts_of)
PARTS = {"llm": (LLM_DIR, "llm."), "convnext": (CONVNEXT_DIR, "vision.convnext."),
         "dinov2": (DINO_DIR, "vision.dino."), "mm_projector": (PROJECTOR_FILE, "vision."),
         "clip": (CLIP_DIR, "vision.clip."), "blip2_vision": (BLIP2_VISION_DIR, "vision.qformer.vision_model."),
         "qformer": (QFORMER_DIR, "vision.qformer.qformer.")}
_BRANCH_PARTS = {"clip": ("clip",), "qformer": ("blip2_vision", "qformer")}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"
_NUMBERED = re.compile(r"^(.*\.\d+\.)")  # greedy: the prefix through the last numbered component

PathLike = Union[str, Path]


class CheckpointError(UserError):
    """A model directory or weights file that cannot be used as asked."""


# ---------------------------------------------------------------- config and write


def geometry(flavour: Flavour) -> dict[str, Any]:
    """What config.json records of the image geometry (models.tiling), derived from the flavour.
    ``max_image_tokens``: a square image's count (every tile kept; a 1×1 image scales to C×C)."""
    spec = TileSpec.from_flavour(flavour)
    n = flavour.tokens_per_view
    return {**spec.to_dict(), "tokens_per_view": n, "max_image_tokens": image_token_count(1, 1, spec, n)}


def parts_of(flavour: Flavour) -> dict[str, tuple[str, str]]:
    """The ``PARTS`` a flavour's model directory holds (CLIP and the Q-Former only where it has them)."""
    absent = {p for branch, names in _BRANCH_PARTS.items() if getattr(flavour, branch) is None for p in names}
    return {name: where for name, where in PARTS.items() if name not in absent}


_TOWERS = tuple(prefix[len("vision."):] for name, (_, prefix) in PARTS.items()
                if prefix.startswith("vision.") and name != "mm_projector")


def _own_vision_state(vision: nn.Module) -> dict[str, torch.Tensor]:
    """models.vision's parameters outside the towers: projector, start, end, skip (and the Q-Former's
    projection and query tokens)."""
    return {k: v for k, v in vision.state_dict().items() if not k.startswith(_TOWERS)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")



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
        for stale in [self.out / LLM_DIR, self.out / CONVNEXT_DIR, self.out / DINO_DIR, self.out / CLIP_DIR,
                      self.out / BLIP2_VISION_DIR, self.out / QFORMER_DIR]:
            if stale.is_dir():
                shutil.rmtree(stale)
        for stale in [self.out / PROJECTOR_FILE, self.out / "config.json", self.out / SINGLE_FILE,
                      self.out / INDEX_FILE, *self.out.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
        self.model, self.tokenizer, self.dtype, self.source = model, tokenizer, dtype, source
        vision = model.vision
        self.parts = {name: _PartWriter(self.out / PARTS[name][0], module, dtype, max_shard_bytes)
                      for name, module in _hf_parts(model)}
        self.own_keys = {f"vision.{k}" for k in _own_vision_state(vision)}
        self.own: dict[str, torch.Tensor] = {}  # projector, start, end, skip: small, written at close

    def add(self, name: str, tensor: torch.Tensor) -> None:
        for part, (_, prefix) in PARTS.items():
            if part in self.parts and name.startswith(prefix):
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
            save_llm_tokenizer(self.tokenizer, self.out / LLM_DIR)
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
    """A model in memory as a model directory (the layout above) in ``dtype``
    (default: the LLM's own), through ``ModelDirWriter`` as the training export's tensors go.

    ``tokenizer`` goes to ``llm/``; ``source`` (e.g. what convert read) is recorded in config.json."""
    writer = ModelDirWriter(directory, model, tokenizer, dtype=dtype or model.llm.get_input_embeddings().weight.dtype,
                            max_shard_bytes=max_shard_bytes, source=source)
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor)
    return writer.close()


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
    model.vision.load_state_dict({k: _stored(v, dtype) for k, v in state.items()}, strict=False, assign=True)
    left = sorted(name for name, p in model.named_parameters() if p.is_meta)
    if left:
        raise CheckpointError(f"{src}: no weights for {len(left)} parameter(s): {shown(left)}")
    # parameters are in ``dtype`` already; buffers (rotary frequencies, pixel statistics) stay fp32
    model = model.to(device=device)
    model.set_vision_trainable(not flavour.freeze_vision)
    model.eval()
    return model, _load_tokenizer(src / LLM_DIR)


@dataclass
class ModelDirWeights:
    """A model directory's weights, unread: {part (``PARTS``): {name in that module: Recipe}}."""

    flavour: Flavour  # the directory's LLM / encoder settings
    tokenizer: Any  # llm/'s, with <image>
    parts: dict[str, dict[str, Recipe]]

    def recipes(self) -> dict[str, Recipe]:
        """Every weight under its SphinxX state-dict name (``llm.model.norm.weight``, ``vision.start``)."""
        return {PARTS[part][1] + name: r for part, state in self.parts.items() for name, r in state.items()}


def read_weights(directory: PathLike, flavour: Optional[Flavour] = None) -> ModelDirWeights:
    """The one streaming read of a model directory (training init, the vLLM loader): each part
    through its format's adapter (models.weights.hf_llm for ``llm/`` — Mixtral's per-expert
    tensors fused —, models.weights.encoders for ``convnext/`` and ``dinov2/`` — DINOv2's legacy
    names —), the projector as saved; headers only, every shape checked. ``flavour``: a base
    whose ``llm`` / ``convnext`` / ``dino`` settings become the directory's (default: the
    directory's own flavour). A missing shard is a CheckpointError naming it."""
    from models.weights.encoders import load_convnext_weights, load_dino_weights
    from models.weights.hf_llm import load_pretrained_llm

    src = Path(directory)
    saved = read_config(src)["flavour"]
    part_files(src)  # every file each part names is there
    flavour = saved if flavour is None else replace(
        flavour, **{k: getattr(saved, k) for k in ("llm", "convnext", "dino", "clip", "qformer")})
    llm = load_pretrained_llm(src / LLM_DIR, flavour)
    parts = {"llm": llm.state, "convnext": load_convnext_weights(src / CONVNEXT_DIR, flavour).state,
             "dinov2": load_dino_weights(src / DINO_DIR, flavour).state,
             "mm_projector": LazyTensors.open([src / PROJECTOR_FILE]).recipes()}
    if flavour.clip is not None or flavour.qformer is not None:  # written by this version only: names as saved
        model = skeleton(flavour, read_config(src)["token_ids"])
        for part, module in _hf_parts(model)[3:]:
            recipes = LazyTensors.open(safetensors_files(src / PARTS[part][0])).recipes()
            _check_keys(module.state_dict(), recipes, str(src / PARTS[part][0]))
            parts[part] = recipes
    return ModelDirWeights(flavour, llm.tokenizer, parts)


def stream_weights(directory: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(SphinxX state-dict name, tensor) for every weight of a model directory, one at a time
    (:func:`read_weights` streamed)."""
    yield from stream(read_weights(directory).recipes())


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
    """(part, module) of each Hugging Face part the model has: llm, convnext, dinov2, then CLIP and the
    Q-Former's two where the flavour has them."""
    v = model.vision
    parts = [("llm", model.llm), ("convnext", v.convnext), ("dinov2", v.dino)]
    if v.clip is not None:
        parts.append(("clip", v.clip))
    if v.qformer is not None:
        parts += [("blip2_vision", v.qformer.vision_model), ("qformer", v.qformer.qformer)]
    return parts


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
    found = {"shape mismatches": sorted(str(m) for m in info.get("mismatched_keys", ())),
             "missing keys": sorted(info.get("missing_keys", ())),
             "unexpected keys": sorted(info.get("unexpected_keys", ()))}
    errors = {label: keys for label, keys in found.items() if keys}
    if errors:
        raise CheckpointError(f"{_weights_named(where)} does not match the model: {report(errors)}")


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
    try:
        return weight_files(directory, layouts=((INDEX_FILE, SINGLE_FILE),))
    except CheckpointError:
        raise
    except UserError as err:
        raise CheckpointError(str(err)) from None


def part_files(directory: PathLike) -> dict[str, list[Path]]:
    """Each part's weight files (``PARTS`` gives its prefix in SphinxX names); for streaming readers."""
    src = Path(directory)
    flavour = read_config(src)["flavour"]
    return {name: ([src / path] if path.endswith(".safetensors") else safetensors_files(src / path))
            for name, (path, _) in parts_of(flavour).items()}


def _check_keys(expected: dict[str, torch.Tensor], state: dict[str, Any], what: str) -> None:
    """Exactly the expected keys with the expected shapes (``state`` values: tensors or shapes)."""
    errors = shape_errors(expected, state)
    if errors:
        raise CheckpointError(f"{what} does not match the model: {report(errors)}")


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, *, assign: bool = False) -> None:
    _check_keys(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True, assign=assign)


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
    vision = sum(parts[p]["params"] for p in parts if p not in ("llm", "mm_projector"))
    return {"path": str(src), "format_version": config["format_version"], "flavour": flavour.name,
            "release": flavour.release, "encoders": [p for p in parts if p not in ("llm", "mm_projector")],
            "geometry": config["geometry"], "token_ids": ids, "dtype": config["dtype"], "tokenizer": tok,
            "parts": parts, "source": config.get("source"),
            "params": {"llm": parts["llm"]["params"], "vision": vision,
                       "projector": parts["mm_projector"]["params"],
                       "total": parts["llm"]["params"] + vision + parts["mm_projector"]["params"]}}


def _headers(files: list[Path]) -> dict[str, Any]:
    try:
        lazy = LazyTensors.open(files)  # headers only
    except UserError as err:  # a truncated or foreign file: one clear line
        raise CheckpointError(str(err)) from None
    meta = {key: lazy.meta(key) for key in lazy.keys()}
    return {"files": [str(f) for f in files], "dtypes": sorted({_dtype_name(t.dtype) for t in meta.values()}),
            "params": sum(t.numel() for t in meta.values()), "tensors": len(meta),
            "shapes": {k: tuple(t.shape) for k, t in meta.items()}}
