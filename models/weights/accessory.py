"""Reading LLaMA2-Accessory checkpoints: the official SPHINX releases → a model directory.

    llama_type            release                      flavour
    llama_ens_light       SPHINX-Tiny                  sphinx-tiny
    llama_ens5_light      SPHINX-Tiny-1k               sphinx-tiny-1k
    llama_ens             SPHINX                       sphinx
    llama_ens5            SPHINX-1k, SPHINX-v2-1k      sphinx-1k (--flavour sphinx-v2-1k: the same model)
    mixtral_sparse_ens    SPHINX-MoE                   sphinx-moe
    mixtral_sparse_ens5   SPHINX-MoE-1k                sphinx-moe-1k

    >>> ckpt = read_accessory("SPHINX-Tiny-1k/")        # merges the model-parallel shards
    >>> ckpt.llama_type, ckpt.mp_size, ckpt.flavour.name
    ('llama_ens5_light', 2, 'sphinx-tiny-1k')
    >>> report = convert_accessory("SPHINX-Tiny-1k/", "out/sphinx-tiny-1k")   # models.weights.model_dir layout

A release directory (as ``MetaModel.from_pretrained`` reads it)::

    consolidated.00-of-02.model.pth   {"model": state dict}, keys prefixed "llma."; one file per
    consolidated.01-of-02.model.pth   model-parallel rank (fairscale), merged here
    tokenizer.model                   sentencepiece (TinyLlama's; n_words = the embedding rows)
    config.json                       the LLM's ModelArgs: dim, n_layers, n_heads, n_kv_heads,
                                      multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, ...
    meta.json                         {"llama_type": one of the table above}

Model-parallel merge (accessory/util/tensor_parallel.py: ColumnParallelLinear weight/bias on
dim 0, RowParallelLinear weight on dim 1 (bias replicated), ParallelEmbedding on dim 1): in
``llama_ens*`` the column-parallel layers are ``attention.wq/wk/wv``,
``feed_forward.w1/w3`` and ``output``; the row-parallel ones ``attention.wo`` and
``feed_forward.w2``; ``tok_embeddings`` is the parallel embedding. In ``mixtral_sparse_ens*`` the
experts are three parameters per layer, ``feed_forward.w1/w2/w3`` [E·f/mp, d] on each rank, each
expert's rows split over the ranks: merged as the release's ``_sparse_expert_merge``
(mixtral_sparse_ens.py:214-218: view [E, f/mp, d], concatenate on dim 1); the router
``feed_forward.gate`` is replicated. Everything else (norms, the encoders, ``visual_proj``,
``qformer_proj``, ``start_img``/``end_img``) is replicated: shard 0's copy is taken and
the largest difference between replicas is reported.

Weights:
  - LLM (Meta layout) → ``LlamaForCausalLM`` by models.weights.meta_llama's table
    (``layers.N.attention.wq`` → ``model.layers.N.self_attn.q_proj``, ``feed_forward.w1`` →
    ``mlp.gate_proj``, ``output`` → ``lm_head``, ...), ``wq/wk`` permuted from Meta's interleaved
    rotary pairs to transformers' rotate-half halves.
    The Mixtral LLM (``mixtral_sparse_ens*``) → ``MixtralForCausalLM``: attention and norms by the same
    table, ``feed_forward.gate`` → ``mlp.gate``, each expert e's ``w1[e]`` [f, d] and ``w3[e]`` →
    ``mlp.experts.gate_up_proj[e]`` = [w1[e]; w3[e]] [2f, d], ``w2[e]`` [f, d] (the release multiplies by it
    untransposed) → ``mlp.experts.down_proj[e]`` = w2[e]ᵀ [d, f].
    ``<image>`` joins the tokenizer: one more row in ``embed_tokens`` / ``lm_head`` (the mean row;
    the image token's embedding is always replaced, so only its logit is new).
  - ``openclip_convnext_xxl.*``: open_clip's timm trunk (``head.norm`` included; SPHINX sets
    ``head.global_pool`` / ``head.flatten`` to Identity) → models.weights.encoders.convnext_from_timm.
  - ``dinov2_vitg14.*``: the torch.hub layout → models.weights.encoders.dino_from_hub (positions
    resampled once to the flavour's grid, as the hub model does at its input size).
  - four-branch releases: ``clip.*`` and ``qformer.*`` → models.weights.four_branch (CLIPVisionModel and
    the Q-Former's towers); ``qformer_proj.0/1`` → ``qformer_proj.0/1``; ``visual_proj.0`` takes
    [CLIP | ConvNeXt | DINOv2] channels (5632 at full size) in the release's order.
  - ``visual_proj.0/1`` (Linear, LayerNorm) → ``projector.0/1``; ``start_img`` / ``end_img``
    [1, 1, d] → ``start`` / ``end`` [d]. The release has no skip token: ``skip`` is zeros, and the
    flavour has ``skip_tokens`` false, so it is never used.

The flavour is the release's (models.flavours, the table above: centred padding, no skip tokens, image
after <s>) with the LLM's keys from config.json. Any key left
unread, missing, or of a shape the flavour does not take is an error naming the file and the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch

from models.errors import UserError
from models.flavours import Flavour, from_name
from models.weights.meta_llama import from_meta

PathLike = Union[str, Path]
PREFIX = "llma."
LLAMA_TYPES = {"llama_ens_light": "sphinx-tiny", "llama_ens5_light": "sphinx-tiny-1k", "llama_ens": "sphinx",
               "llama_ens5": "sphinx-1k", "mixtral_sparse_ens": "sphinx-moe", "mixtral_sparse_ens5": "sphinx-moe-1k"}
RELEASES = {"llama_ens_light": "SPHINX-Tiny", "llama_ens5_light": "SPHINX-Tiny-1k", "llama_ens": "SPHINX",
            "llama_ens5": "SPHINX-1k, SPHINX-v2-1k", "mixtral_sparse_ens": "SPHINX-MoE",
            "mixtral_sparse_ens5": "SPHINX-MoE-1k"}
MOE_TYPES = ("mixtral_sparse_ens", "mixtral_sparse_ens5")
_EXPERTS = re.compile(r"^layers\.\d+\.feed_forward\.w[123]$")  # mixtral_sparse_ens*'s MoE parameters
_SHARD = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")
# fairscale model-parallel layers of llama_ens*_light → the dim their shards are concatenated on;
# every other key is replicated
MODEL_PARALLEL_SPLIT = [
    (r"^layers\.\d+\.attention\.w[qkv]\.(weight|bias)$", 0),  # ColumnParallelLinear
    (r"^layers\.\d+\.feed_forward\.w[13]\.(weight|bias)$", 0),
    (r"^output\.(weight|bias)$", 0),
    (r"^layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight$", 1),  # RowParallelLinear (bias replicated)
    (r"^tok_embeddings\.weight$", 1),  # ParallelEmbedding
]
_MODEL_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_batch_size", "max_seq_len", "rope_scaling",
               "load_pretrained_visual_encoder", "trainable_mode",
               "hidden_dim", "head_dim", "moe", "load_balancing_weight"}  # the last four: mixtral_sparse_ens*
_ENCODERS = {"convnext": "openclip_convnext_xxl.", "dino": "dinov2_vitg14.", "clip": "clip.", "qformer": "qformer."}


class AccessoryError(UserError):
    """A LLaMA2-Accessory checkpoint that cannot be read as asked."""


def split_dim(key: str) -> Optional[int]:
    """The dim a model-parallel weight (``llma.`` stripped) is split on; None when replicated."""
    return next((dim for pattern, dim in MODEL_PARALLEL_SPLIT if re.match(pattern, key)), None)


@dataclass
class AccessoryCheckpoint:
    """A release directory read and merged (see the module docstring)."""

    directory: Path
    llama_type: str
    args: dict[str, Any]  # config.json
    files: list[Path]  # the shards, rank order
    state: dict[str, torch.Tensor]  # merged, "llma." stripped
    where: dict[str, str]  # key → the shard file it was read from (for messages)
    replica_max_diff: dict[str, float] = field(default_factory=dict)  # replicated keys that differ

    @property
    def mp_size(self) -> int:
        return len(self.files)

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        """Remove and return the keys under ``prefix`` (prefix stripped)."""
        keys = [k for k in self.state if k.startswith(prefix)]
        return {k[len(prefix):]: self.state.pop(k) for k in keys}


def read_accessory(directory: PathLike) -> AccessoryCheckpoint:
    """A release directory → its merged state dict, model args and llama_type."""
    from models.weights.stream import read_state_file

    src = Path(directory)
    if not src.is_dir():
        raise AccessoryError(f"LLaMA2-Accessory checkpoint directory not found: {src}")
    meta = _read_json(src / "meta.json")
    llama_type = meta.get("llama_type")
    if llama_type not in LLAMA_TYPES:
        known = "; ".join(f"{t} ({RELEASES[t]})" for t in LLAMA_TYPES)
        raise AccessoryError(f"{src / 'meta.json'}: llama_type {llama_type!r} is not supported; supported: {known}")
    args = _read_json(src / "config.json")
    unknown = sorted(set(args) - _MODEL_ARGS)
    if unknown:
        raise AccessoryError(f"{src / 'config.json'}: unknown model argument(s) {', '.join(unknown)} "
                             f"(ModelArgs of {llama_type})")
    files = _shard_files(src)
    shards = []
    for f in files:
        state = read_state_file(f)
        foreign = sorted(k for k in state if not k.startswith(PREFIX))
        if foreign:
            raise AccessoryError(f"{f}: keys without the {PREFIX!r} prefix: {_shown(foreign)}")
        shards.append({k[len(PREFIX):]: v for k, v in state.items()})
    experts = int((args.get("moe") or {}).get("num_experts", 8)) if llama_type in MOE_TYPES else 0
    state, where, diffs = _merge(shards, files, experts)
    return AccessoryCheckpoint(src, llama_type, args, files, state, where, diffs)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AccessoryError(f"{path} is missing (a LLaMA2-Accessory checkpoint has meta.json, config.json, "
                             "tokenizer.model and consolidated.NN-of-MM.model.pth)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AccessoryError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AccessoryError(f"{path} must hold a JSON object")
    return data


def _shard_files(src: Path) -> list[Path]:
    found = {}
    for f in sorted(src.iterdir()):
        m = _SHARD.match(f.name)
        if m:
            found[f] = (int(m[1]), int(m[2]))
        elif f.name.startswith("consolidated."):
            raise AccessoryError(f"{f}: not a consolidated.NN-of-MM.model.pth shard (diff and Meta-original "
                                 "checkpoints are not supported)")
    if not found:
        raise AccessoryError(f"no consolidated.NN-of-MM.model.pth files in {src}")
    sizes = {mm for _, mm in found.values()}
    if len(sizes) != 1:
        raise AccessoryError(f"{src}: shards of different model-parallel sizes {sorted(sizes)}")
    size = sizes.pop()
    by_rank = {nn: f for f, (nn, _) in found.items()}
    missing = [f"consolidated.{r:02d}-of-{size:02d}.model.pth" for r in range(size) if r not in by_rank]
    if missing:
        raise AccessoryError(f"{src}: missing shard(s) {', '.join(missing)}")
    return [by_rank[r] for r in range(size)]


def _merge(shards: list[dict[str, torch.Tensor]], files: list[Path], experts: int = 0
           ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
    """Model-parallel shards → one state dict (split weights concatenated, replicas checked); ``experts``:
    E of a mixtral_sparse_ens* checkpoint, whose expert parameters merge per expert."""
    keys = set(shards[0])
    for shard, f in zip(shards[1:], files[1:]):
        if set(shard) != keys:
            only = sorted(set(shard) ^ keys)
            raise AccessoryError(f"{f} and {files[0]} hold different keys: {_shown([PREFIX + k for k in only])}")
    merged, where, diffs = {}, {}, {}
    for key in sorted(keys):
        parts = [s.pop(key) for s in shards]
        dim = split_dim(key)
        where[key] = str(files[0])
        if experts and _EXPERTS.match(key):
            merged[key] = merge_experts(parts, experts, f"{files[0]}: {PREFIX}{key}")
            continue
        if dim is not None:
            merged[key] = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
            continue
        for part, f in zip(parts[1:], files[1:]):
            if part.shape != parts[0].shape:
                raise AccessoryError(f"{f}: {PREFIX}{key} {list(part.shape)} != {list(parts[0].shape)} in "
                                     f"{files[0]} (a replicated weight)")
        diff = max((float((p.float() - parts[0].float()).abs().max()) for p in parts[1:] if p.numel()), default=0.0)
        if diff > 0:
            diffs[key] = diff
        merged[key] = parts[0]
    return merged, where, diffs


def merge_experts(parts: list[torch.Tensor], experts: int, what: str) -> torch.Tensor:
    """Each rank's [E·f/mp, d] → [E·f, d], expert by expert (the release's _sparse_expert_merge)."""
    if any(p.dim() != 2 or p.shape[0] % experts for p in parts):
        raise AccessoryError(f"{what} {list(parts[0].shape)} is not {experts} experts' rows (moe.num_experts "
                             "in config.json)")
    return torch.cat([p.view(experts, -1, p.shape[-1]) for p in parts], dim=1).reshape(-1, parts[0].shape[-1])


def _shown(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------- the LLM


def ffn_size(args: dict[str, Any]) -> int:
    """FeedForward's hidden size in llama_ens*_light: 2/3 · 4·dim, times ffn_dim_multiplier, rounded up
    to multiple_of."""
    hidden = int(2 * 4 * int(args["dim"]) / 3)
    if args.get("ffn_dim_multiplier") is not None:
        hidden = int(float(args["ffn_dim_multiplier"]) * hidden)
    m = int(args.get("multiple_of", 256))
    return m * ((hidden + m - 1) // m)


def llm_config(args: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """ModelArgs → LlamaConfig keyword arguments (flavour.llm)."""
    heads = int(args.get("n_heads", 40))
    kv = int(args.get("n_kv_heads") or heads)
    out = dict(hidden_size=int(args.get("dim", 5120)), num_hidden_layers=int(args.get("n_layers", 40)),
               num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn_size({"dim": 5120, **args}),
               vocab_size=vocab_size, rms_norm_eps=float(args.get("norm_eps", 1e-5)),
               rope_theta=float(args.get("rope_theta", 10000.0)),
               # MetaModel.from_pretrained's max_seq_len (its rotary table covers twice that)
               max_position_embeddings=int(args.get("max_seq_len") or 4096), tie_word_embeddings=False)
    if args.get("rope_scaling") is not None:  # positions · s in Accessory = positions / factor in transformers
        out["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / float(args["rope_scaling"])}
    return out


def mixtral_config(args: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """mixtral_sparse_ens* ModelArgs → MixtralConfig keyword arguments (their defaults: mixtral_sparse_ens.py:50-72;
    the head size is dim / n_heads there, :87)."""
    heads = int(args.get("n_heads", 32))
    moe = args.get("moe") or {}
    out = dict(hidden_size=int(args.get("dim", 4096)), num_hidden_layers=int(args.get("n_layers", 32)),
               num_attention_heads=heads, num_key_value_heads=int(args.get("n_kv_heads") or heads),
               intermediate_size=int(args.get("hidden_dim", 16384)), vocab_size=vocab_size,
               num_local_experts=int(moe.get("num_experts", 8)), num_experts_per_tok=int(moe.get("num_experts_per_tok", 2)),
               rms_norm_eps=float(args.get("norm_eps", 1e-5)), rope_theta=float(args.get("rope_theta", 1e6)),
               max_position_embeddings=int(args.get("max_seq_len") or 4096), tie_word_embeddings=False)
    if args.get("rope_scaling") is not None:
        out["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / float(args["rope_scaling"])}
    return out


def mixtral_to_hf(ckpt: AccessoryCheckpoint, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The Meta-layout Mixtral (taken out of ``ckpt.state``) → MixtralForCausalLM keys: attention, norms,
    embeddings and head by models.weights.meta_llama's table; the router and the experts fused as
    transformers holds them (see the module docstring)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from models.weights.meta_llama import meta_name, permute_rotary

    vocab = ckpt.state.get("tok_embeddings.weight", torch.empty(0)).shape[0]  # the release's rows (resized later)
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**dict(config, vocab_size=vocab)))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, f, e = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    cfg_file = ckpt.directory / "config.json"

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in ckpt.state:
            raise AccessoryError(f"{ckpt.files[0]}: {PREFIX}{key} is missing")
        value = ckpt.state.pop(key)
        if tuple(value.shape) != tuple(shape):
            raise AccessoryError(f"{ckpt.where[key]}: {PREFIX}{key} is {list(value.shape)}, {cfg_file} gives "
                                 f"{list(shape)} (dim {d}, hidden_dim {f}, {e} experts, n_heads {heads}, "
                                 f"n_kv_heads {kv})")
        return value

    out: dict[str, torch.Tensor] = {}
    for hf, shape in shapes.items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$", hf)
        if m is None:
            meta = meta_name(hf)
            value = take(meta, shape)
            if meta.endswith("attention.wq.weight"):
                value = permute_rotary(value, heads)
            elif meta.endswith("attention.wk.weight"):
                value = permute_rotary(value, kv)
            out[hf] = value
            continue
        p = f"layers.{m[1]}.feed_forward."
        if m[2] == "gate.weight":
            out[hf] = take(p + "gate.weight", shape)
        elif m[2] == "experts.gate_up_proj":
            w1, w3 = take(p + "w1", (e * f, d)).view(e, f, d), take(p + "w3", (e * f, d)).view(e, f, d)
            out[hf] = torch.cat([w1, w3], dim=1)  # [E, 2f, d]: gate rows, then up rows
        else:
            out[hf] = take(p + "w2", (e * f, d)).view(e, f, d).transpose(1, 2)  # [E, d, f]
    extra = sorted(k for k in ckpt.state if k.startswith("layers."))
    if extra:
        raise AccessoryError(f"{ckpt.where[extra[0]]}: LLM weights beyond n_layers {config['num_hidden_layers']} "
                             f"of {cfg_file} or not in {ckpt.llama_type}: {_shown([PREFIX + k for k in extra])}")
    return {k: v.contiguous() for k, v in out.items()}


def llama_to_hf(ckpt: AccessoryCheckpoint, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The Meta-layout LLM weights (taken out of ``ckpt.state``) → LlamaForCausalLM keys, through
    models.weights.meta_llama's one table (``wq`` / ``wk`` permuted to rotate-half)."""
    d, n, ffn = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    cfg_file = ckpt.directory / "config.json"

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in ckpt.state:
            raise AccessoryError(f"{ckpt.files[0]}: {PREFIX}{key} is missing")
        value = ckpt.state.pop(key)
        if tuple(value.shape) != shape:
            raise AccessoryError(f"{ckpt.where[key]}: {PREFIX}{key} is {list(value.shape)}, {cfg_file} gives "
                                 f"{list(shape)} (dim {d}, n_heads {heads}, n_kv_heads {kv}, ffn {ffn})")
        return value

    vocab = ckpt.state.get("tok_embeddings.weight", torch.empty(0, d)).shape[0]
    out = from_meta(take, dict(config, vocab_size=vocab), interleaved_rotary=True)
    extra = sorted(k for k in ckpt.state if k.startswith("layers."))
    if extra:
        raise AccessoryError(f"{ckpt.where[extra[0]]}: LLM weights beyond n_layers {n} of {cfg_file} or not in "
                             f"{ckpt.llama_type}: {_shown([PREFIX + k for k in extra])}")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- the whole model


def convert_accessory(directory: PathLike, out: PathLike, *, flavour: Union[str, Flavour, None] = None,
                      dtype: Optional[torch.dtype] = None, max_shard_bytes: Optional[int] = None) -> dict[str, Any]:
    """Read a release directory and write it as a model directory (models.weights.model_dir); returns
    ``{"source": what was read, "model_dir": models.weights.model_dir.inspect_model_dir(out)}``.

    ``flavour``: the base flavour (default by llama_type, ``LLAMA_TYPES``; its encoders and geometry; the
    LLM's keys come from config.json). ``dtype``: default the
    checkpoint's own (its LLM weights')."""
    from models.weights.model_dir import DEFAULT_MAX_SHARD_BYTES, inspect_model_dir, save_model_dir, skeleton
    from models.weights.hf_llm import load_llm_tokenizer, resize_vocab
    from models.weights.encoders import convnext_from_timm, dino_from_hub, with_encoder_overrides
    from models.weights.four_branch import clip_from_open_clip, qformer_from_blip2

    ckpt = read_accessory(directory)
    src = ckpt.directory
    base = flavour if isinstance(flavour, Flavour) else from_name(flavour or LLAMA_TYPES[ckpt.llama_type])
    stored = ckpt.state["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in ckpt.state else torch.float32
    dtype = dtype or stored
    tokenizer = load_llm_tokenizer(src)
    n_words = ckpt.state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in ckpt.state else 0
    vocab = max(len(tokenizer), n_words)
    source = {"from": "accessory", "path": str(src), "llama_type": ckpt.llama_type, "mp_size": ckpt.mp_size,
              "files": [str(f) for f in ckpt.files], "dtype": str(stored).replace("torch.", ""),
              "tensors": len(ckpt.state), "tokenizer_words": n_words, "tokenizer_size": len(tokenizer),
              "replica_max_diff": ckpt.replica_max_diff}
    if base.is_moe != (ckpt.llama_type in MOE_TYPES):
        llm = "a Mixtral" if ckpt.llama_type in MOE_TYPES else "a Llama"
        raise AccessoryError(f"{src / 'meta.json'}: {ckpt.llama_type} ({RELEASES[ckpt.llama_type]}) has {llm} LLM but "
                             f"flavour {base.name!r} is {'MoE' if base.is_moe else 'dense'}; use "
                             f"--flavour {LLAMA_TYPES[ckpt.llama_type]}")
    if ckpt.llama_type in MOE_TYPES:
        config = mixtral_config(ckpt.args, vocab)
        llm_state = resize_vocab(mixtral_to_hf(ckpt, config), vocab)
    else:
        config = llm_config(ckpt.args, vocab)
        llm_state = resize_vocab(llama_to_hf(ckpt, config), vocab)
    # the encoders, through the published-layout readers (they check every key and shape)
    where = {name: next((ckpt.where[k] for k in ckpt.where if k.startswith(p)), str(ckpt.files[0]))
             for name, p in _ENCODERS.items()}
    conv = convnext_from_timm(ckpt.take(_ENCODERS["convnext"]), base,
                              source=f"{where['convnext']} ({PREFIX}{_ENCODERS['convnext']}*)")
    dino = dino_from_hub(ckpt.take(_ENCODERS["dino"]), base,
                         source=f"{where['dino']} ({PREFIX}{_ENCODERS['dino']}*)")
    towers = {"convnext": conv, "dino": dino}
    if base.clip is not None:
        towers["clip"] = clip_from_open_clip(ckpt.take(_ENCODERS["clip"]), base,
                                             source=f"{where['clip']} ({PREFIX}{_ENCODERS['clip']}*)")
    if base.qformer is not None:
        towers["qformer"] = qformer_from_blip2(ckpt.take(_ENCODERS["qformer"]), base,
                                               source=f"{where['qformer']} ({PREFIX}{_ENCODERS['qformer']}*)")
    flav = replace(with_encoder_overrides(base, conv, dino), llm={**base.llm, **config})
    d = config["hidden_size"]
    own = {"projector.0.weight": ("visual_proj.0.weight", None), "projector.0.bias": ("visual_proj.0.bias", None),
           "projector.1.weight": ("visual_proj.1.weight", None), "projector.1.bias": ("visual_proj.1.bias", None),
           "start": ("start_img", (1, 1, d)), "end": ("end_img", (1, 1, d))}
    if base.qformer is not None:  # the query tokens came with the Q-Former's tower
        own.update({f"qformer_proj.{i}.{w}": (f"qformer_proj.{i}.{w}", None) for i in (0, 1) for w in ("weight", "bias")})
    if ckpt.state:
        left = sorted(k for k in ckpt.state if k not in {v[0] for v in own.values()})
        if left:
            raise AccessoryError(f"{ckpt.where[left[0]]}: weights {ckpt.llama_type} does not have: "
                                 f"{_shown([PREFIX + k for k in left])}")
    tok_ids = {"vocab_size": vocab, "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
               "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    model = skeleton(flav, tok_ids)
    vision_state = {}
    for target, (key, shape) in own.items():
        expected = model.vision.state_dict()[target].shape
        if key not in ckpt.state:
            raise AccessoryError(f"{ckpt.files[0]}: {PREFIX}{key} is missing")
        value = ckpt.state.pop(key)
        if tuple(value.shape) != tuple(shape or expected):
            raise AccessoryError(f"{ckpt.where[key]}: {PREFIX}{key} is {list(value.shape)}, flavour "
                                 f"{flav.name!r} needs {list(shape or expected)}")
        vision_state[target] = value.reshape(expected)
    vision_state["skip"] = torch.zeros(d, dtype=stored)  # the release has none; skip_tokens is false
    with torch.no_grad():
        model.llm.load_state_dict(llm_state, strict=True, assign=True)
        for name, tower in towers.items():
            vision_state.update({f"{name}.{k}": v for k, v in tower.tensors().items()})
        model.vision.load_state_dict(vision_state, strict=True, assign=True)
    source["encoders"] = {name: {"ignored": list(t.ignored), "notes": list(t.notes)} for name, t in towers.items()}
    save_model_dir(model, tokenizer, out, dtype=dtype, source=source,
                   max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    return {"source": source, "model_dir": inspect_model_dir(out)}
