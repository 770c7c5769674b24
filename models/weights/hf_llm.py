"""Pretrained LLMs from Hugging Face causal-LM directories, each with its own tokenizer.

    >>> pre = load_pretrained_llm("TinyLlama-1.1B/", from_name("tiny"))
    >>> pre.layout, pre.source_vocab, pre.vocab_size, pre.added_tokens
    ('llama', 32000, 32001, ('<image>',))
    >>> flavour = pre.apply_to(from_name("tiny"))     # llm keys as the source has them (rope, eps, vocab)
    >>> model = SphinxX(flavour, **pre.token_ids())   # vocab, <image>, pad/bos/eos from pre.tokenizer
    >>> pre.load_into(model.llm)                      # strict; names key and both shapes on a mismatch

Layouts (``model_type`` in config.json):
  - ``llama``, ``mixtral``: Hugging Face checkpoints (safetensors or .bin; sharded or not). Llama's
    keys are the model's; Mixtral's per-expert ``block_sparse_moe.experts.E.w1/w2/w3`` become
    transformers 5's fused ``mlp.experts.gate_up_proj [E, 2F, d]`` (w1 then w3) and
    ``down_proj [E, d, F]``, ``block_sparse_moe.gate`` → ``mlp.gate`` (what transformers'
    conversion mapping does inside ``from_pretrained``); the keys must be exactly those of the
    config's model, checked on the meta device.
  - ``internlm2``: InternLM2 as published (remote code, never executed): its own config keys
    (``bias``, ``rope_scaling {"type", "factor"}``, ...) and weights ``model.tok_embeddings``,
    ``layers.N.attention.wqkv`` (packed per KV group: for each of the K key/value heads, its
    G = H/K query heads, then its key, then its value, head_dim rows each), ``attention.wo``,
    ``feed_forward.w1`` (gate) / ``w3`` (up) / ``w2`` (down), ``attention_norm``, ``ffn_norm``,
    ``model.norm``, ``output``. It is a Llama (rotate-half RoPE, RMSNorm, SwiGLU): converted to a
    Llama state dict and LlamaConfig keys (models.weights.internlm2).

Tokenizer: the directory's own, from ``tokenizer.json`` or a sentencepiece ``tokenizer.model``
(BPE, as Llama and InternLM2 ship it; read with the ``sentencepiece`` package and set up to encode
exactly as sentencepiece does). ``<image>`` (models.conversation.IMAGE) is added as a special
token, and a pad token when it has none (its unk, else eos: no new row).

Nothing is read until ``load_into``: ``state`` is {name: models.weights.stream.Recipe} (shapes from
the file headers), and loading reads one tensor at a time, so a 46.7 B Mixtral never exists as a
state dict (actors.train.worker streams the same recipes into a ZeRO-3 partitioned model).

Vocabulary: ``V = max(len(tokenizer), source rows)``; ``embed_tokens`` and ``lm_head`` get V rows,
the new ones initialised to the mean of the source rows. The flavour's shapes must be the
source's (hidden, layers, heads, KV heads, ffn, experts); a mismatch names the config keys and
the weights with both shapes. Every bad input raises models.errors.UserError naming the file.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from models.conversation import IMAGE
from models.errors import UserError
from models.flavours import Flavour
from models.sphinx import build_llm
from models.weights.internlm2 import internlm2_to_llama
from models.weights.meta_llama import EMBED, HEAD
from models.weights.stream import LazyTensors, Recipe, check_fits, load_recipes, report, shape_errors, weight_files

PathLike = Union[str, Path]
# config keys that set parameter shapes: a source must agree with the flavour on all of them
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim", "num_local_experts")
# config keys the source decides (how it was trained), carried into flavour.llm
_CARRIED = ("rms_norm_eps", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias",
            "num_experts_per_tok", "sliding_window")


@dataclass
class PretrainedLLM:
    """An LLM directory read into the flavour's Llama / Mixtral form (see the module docstring)."""

    arch: Literal["llama", "mixtral"]
    layout: str  # "llama" | "mixtral" | "internlm2"
    source: str
    state: dict[str, Recipe]  # LlamaForCausalLM / MixtralForCausalLM keys; vocab_size rows; unread
    tokenizer: Any
    llm_overrides: dict[str, Any]  # merge into flavour.llm (apply_to)
    source_vocab: int  # embedding rows in the source
    added_tokens: tuple[str, ...]  # tokens added to the source tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.state[EMBED].shape[0])

    def apply_to(self, flavour: Flavour) -> Flavour:
        """The flavour with the source's own LLM settings (vocab, rope, eps, ...)."""
        return replace(flavour, llm={**flavour.llm, **self.llm_overrides})

    def token_ids(self) -> dict[str, int]:
        """SphinxX keyword arguments: vocab_size, image_token_id, pad/bos/eos_token_id."""
        tok = self.tokenizer
        ids = dict(vocab_size=self.vocab_size, image_token_id=int(tok.convert_tokens_to_ids(IMAGE)))
        for name in ("pad", "bos", "eos"):
            value = getattr(tok, f"{name}_token_id")
            if value is None:
                raise UserError(f"the tokenizer of {self.source} has no {name} token")
            ids[f"{name}_token_id"] = int(value)
        return ids

    def load_into(self, llm: nn.Module) -> None:
        """Strict load into ``model.llm``, one tensor read at a time (a mismatch names the key
        and both shapes)."""
        load_recipes(llm, self.state, what=f"LLM weights {self.source}")


# ---------------------------------------------------------------- the entry point


def load_pretrained_llm(src_dir: PathLike, flavour: Flavour, *, dtype: Optional[torch.dtype] = None) -> PretrainedLLM:
    """A local HF causal-LM directory → weights, tokenizer and flavour overrides (module docstring).

    ``dtype``: the dtype to read the weights in (None: as stored)."""
    src = Path(src_dir)
    config = _read_json(src / "config.json", what="a Hugging Face model directory")
    layout = config.get("model_type")
    if layout not in ("llama", "mixtral", "internlm2"):
        raise UserError(f"{src / 'config.json'}: model_type {layout!r} is not supported "
                        "(llama, mixtral, internlm2)")
    arch = "mixtral" if layout == "mixtral" else "llama"
    if arch != flavour.llm_arch:
        raise UserError(f"{src} holds a {layout} model but flavour {flavour.name!r} is a {flavour.llm_arch}")
    files = LazyTensors.open(weight_files(src))  # headers only; a clear error when there are no weights
    tokenizer, added = _with_specials(_base_tokenizer(src))

    if layout == "internlm2":
        state, kwargs = internlm2_to_llama(files.recipes(), config, source=str(src))
    else:
        kwargs = _hf_config_kwargs(src, arch)
        state = hf_llm_recipes(files.recipes(), arch, kwargs, source=str(src))
    if dtype is not None:
        state = {k: v.then(lambda t: t.to(dtype)) for k, v in state.items()}
    source_vocab = int(kwargs["vocab_size"])
    vocab = max(len(tokenizer), source_vocab)
    overrides = _overrides(kwargs, vocab)
    _check_fits(arch, kwargs, flavour, overrides, vocab, str(src))
    if tuple(state[EMBED].shape) != (source_vocab, int(kwargs["hidden_size"])):
        raise UserError(f"{src}: {EMBED} {list(state[EMBED].shape)} does not match vocab_size {source_vocab} "
                        f"and hidden_size {kwargs['hidden_size']} of its config.json")
    state = resize_vocab(state, vocab)
    return PretrainedLLM(arch, layout, str(src), state, tokenizer, overrides, source_vocab, added)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"not {what} (no {path.name}): {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


# ---------------------------------------------------------------- Llama / Mixtral (transformers)


def _config_class(arch: str):
    from transformers import LlamaConfig, MixtralConfig

    return MixtralConfig if arch == "mixtral" else LlamaConfig


def _model_class(arch: str):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    return MixtralForCausalLM if arch == "mixtral" else LlamaForCausalLM


def _hf_config_kwargs(src: Path, arch: str) -> dict[str, Any]:
    try:
        config = _config_class(arch).from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot read {src / 'config.json'}: {err}") from None
    return config.to_dict()


# an HF Llama / Mixtral checkpoint's names → the modules' (transformers 5); first match wins, None drops
HF_LLM_TO_MODULE = [
    (r"\.rotary_emb\.inv_freq$", None),  # a buffer older checkpoints saved; recomputed
    (r"^(model\.layers\.\d+\.)block_sparse_moe\.gate\.", r"\1mlp.gate."),  # Mixtral's router
]
# Mixtral's per-expert weights, fused by stack_experts: (layer prefix, expert, w1 | w2 | w3)
_EXPERT = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def stack_experts(experts: dict[str, dict[str, dict[int, Recipe]]], n: int, source: str) -> dict[str, Recipe]:
    """{layer prefix: {w1|w2|w3: {expert: Recipe}}} → the fused ``mlp.experts.gate_up_proj [E, 2F, d]``
    (each expert's w1 rows then its w3 rows) and ``mlp.experts.down_proj [E, d, F]`` (w2)."""
    out = {}
    for layer, weights in experts.items():
        for w in ("w1", "w2", "w3"):
            if sorted(weights.get(w, {})) != list(range(n)):
                raise UserError(f"{source}: {layer}block_sparse_moe.experts.E.{w} exists for experts "
                                f"{sorted(weights.get(w, {}))}, its config.json has num_local_experts {n}")
        gate, up, down = ([weights[w][e] for e in range(n)] for w in ("w1", "w3", "w2"))
        out[f"{layer}mlp.experts.gate_up_proj"] = Recipe.combine(
            gate + up, lambda *t, n=n: torch.cat([torch.stack(t[:n]), torch.stack(t[n:])], dim=1))
        out[f"{layer}mlp.experts.down_proj"] = Recipe.combine(down, lambda *t: torch.stack(t))
    return out


def hf_llm_recipes(state: dict[str, Recipe], arch: str, kwargs: dict[str, Any], *, source: str) -> dict[str, Recipe]:
    """An HF Llama / Mixtral checkpoint's keys → LlamaForCausalLM / MixtralForCausalLM's
    (:data:`HF_LLM_TO_MODULE`, then :func:`stack_experts`), checked against the config's model on
    the meta device; ``lm_head`` is the embedding when the config ties them (sphinx-x keeps the
    two apart: they are resized and saved apart)."""
    out: dict[str, Recipe] = {}
    experts: dict[str, dict[str, dict[int, Recipe]]] = {}
    for key, recipe in state.items():
        if arch == "mixtral" and (m := _EXPERT.match(key)):
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = recipe
            continue
        target = next((re.sub(p, t, key) if t else None for p, t in HF_LLM_TO_MODULE if re.search(p, key)), key)
        if target is not None:
            out[target] = recipe
    out.update(stack_experts(experts, int(kwargs.get("num_local_experts", 0)), source))
    if HEAD not in out and EMBED in out and kwargs.get("tie_word_embeddings"):
        out[HEAD] = out[EMBED]
    cls = _model_class(arch)
    with torch.device("meta"):
        config = _config_class(arch).from_dict(dict(kwargs, tie_word_embeddings=False))
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    errors = shape_errors(expected, out)
    if errors:
        raise UserError(f"{source} does not match its own config.json ({cls.__name__}): {report(errors)}")
    return out


# ---------------------------------------------------------------- vocabulary and flavour checks


def resize_vocab(state: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """embed_tokens / lm_head (tensors or recipes) to ``vocab_size`` rows; new rows = the mean of
    the existing ones."""
    def grown(rows: torch.Tensor) -> torch.Tensor:
        mean = rows.float().mean(0, keepdim=True).to(rows.dtype)
        return torch.cat([rows, mean.expand(vocab_size - rows.shape[0], -1)], dim=0)

    for key in (EMBED, HEAD):
        rows = state[key]
        if rows.shape[0] > vocab_size:
            raise UserError(f"{key} has {rows.shape[0]} rows, more than the vocabulary ({vocab_size})")
        if rows.shape[0] < vocab_size:
            state[key] = rows.then(grown) if isinstance(rows, Recipe) else grown(rows)
    return state


def _overrides(kwargs: dict[str, Any], vocab: int) -> dict[str, Any]:
    out: dict[str, Any] = {"vocab_size": vocab, "tie_word_embeddings": False, "rope_scaling": None}
    out.update({k: kwargs[k] for k in _CARRIED if k in kwargs})
    rope = kwargs.get("rope_parameters")
    if rope:  # transformers' standardised form (Llama / Mixtral configs)
        out["rope_theta"] = float(rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta" and v is not None}
    else:  # InternLM2, converted
        out["rope_theta"] = float(kwargs.get("rope_theta", 10000.0))
        if kwargs.get("rope_scaling"):
            out["rope_scaling"] = dict(kwargs["rope_scaling"])
    if out.get("sliding_window") is None:
        out.pop("sliding_window", None)
    return out


def _check_fits(arch: str, kwargs: dict[str, Any], flavour: Flavour, overrides: dict[str, Any], vocab: int,
                source: str) -> None:
    """Shapes of the source (its config) against the flavour's, on the meta device (no weights read)."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        config = _config_class(arch).from_dict(dict(kwargs))
        config.vocab_size, config.tie_word_embeddings = vocab, False
        theirs = {k: tuple(v.shape) for k, v in _model_class(arch)(config).state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in build_llm(replace(flavour, llm={**flavour.llm, **overrides}), vocab,
                                                         **ids).state_dict().items()}
    theirs.setdefault(HEAD, theirs[EMBED])
    keys = [f"{k} {config.to_dict().get(k)} != {flavour.llm.get(k)}" for k in SHAPE_KEYS
            if k in flavour.llm and config.to_dict().get(k) != flavour.llm.get(k)]
    try:
        check_fits(mine, theirs, f"LLM {source}", f"flavour {flavour.name!r}")
    except UserError as err:
        detail = f" (config.json: {', '.join(keys)})" if keys else ""
        raise UserError(f"{err}{detail}") from None


# ---------------------------------------------------------------- tokenizers


def load_llm_tokenizer(src_dir: PathLike) -> Any:
    """The directory's own tokenizer + ``<image>`` (+ a pad token when missing).

    ``tokenizer.json`` is read exactly as written (``PreTrainedTokenizerFast``, whatever
    tokenizer class the config names: remote-code classes such as InternLM2's are never
    executed); a directory with only a sentencepiece ``tokenizer.model`` is read with
    :func:`sentencepiece_tokenizer`. Special tokens come from tokenizer_config.json /
    special_tokens_map.json."""
    return _with_specials(_base_tokenizer(Path(src_dir)))[0]


def _base_tokenizer(src: Path) -> Any:
    if not src.is_dir():
        raise UserError(f"tokenizer directory not found: {src}")
    cfg = _special_tokens(src)
    if (src / "tokenizer.json").is_file():
        # read as the file says: transformers' LlamaTokenizer class would rebuild its own Metaspace
        # pipeline and encode a leading space unlike Llama's tokenizer.json (and sentencepiece)
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), **cfg)
        except Exception as err:  # a foreign file: one clear line
            raise UserError(f"cannot load {src / 'tokenizer.json'}: {type(err).__name__}: {err}") from None
    if (src / "tokenizer.model").is_file():
        return sentencepiece_tokenizer(src / "tokenizer.model", cfg)
    raise UserError(f"no tokenizer in {src} (tokenizer.json, or a sentencepiece tokenizer.model)")


def _special_tokens(src: Path) -> dict[str, Any]:
    """bos/eos/unk/pad (and add_bos/eos_token) from tokenizer_config.json / special_tokens_map.json."""
    out: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if not (src / name).is_file():
            continue
        data = _read_json(src / name, "")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
        for key in ("add_bos_token", "add_eos_token"):
            if isinstance(data.get(key), bool):
                out[key] = data[key]
    return out


def _with_specials(tok: Any) -> tuple[Any, tuple[str, ...]]:
    """Add ``<image>`` when missing, and a pad token (an existing one: unk, else eos) → (tok, added)."""
    added = []
    if tok.convert_tokens_to_ids(IMAGE) in (None, tok.unk_token_id):
        tok.add_special_tokens({"extra_special_tokens": [IMAGE]}, replace_extra_special_tokens=False)
        added.append(IMAGE)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok, tuple(added)


def sentencepiece_tokenizer(model_file: PathLike, tokenizer_config: Optional[dict[str, Any]] = None) -> Any:
    """A BPE sentencepiece model (Llama, InternLM2) → a fast tokenizer that encodes exactly as
    ``SentencePieceProcessor.encode`` does: a ``▁`` before the text when the model has
    ``add_dummy_prefix``, every space → ``▁``, byte fallback (the normaliser Llama's own
    tokenizer.json carries; transformers' default Metaspace pre-tokenizer merges a leading space
    into the dummy prefix, which sentencepiece does not)."""
    path = Path(model_file)
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise UserError(f"reading {path} needs the sentencepiece package (pip install sentencepiece)") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # a foreign file: one clear line
        raise UserError(f"{path} is not a sentencepiece model: {err}") from None
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 BPE
        raise UserError(f"{path} is not a BPE sentencepiece model (model_type {proto.trainer_spec.model_type}); "
                        "provide a tokenizer.json")
    if (spec.name not in ("identity", "") and spec.precompiled_charsmap) or spec.remove_extra_whitespaces:
        raise UserError(f"{path} normalises text ({spec.name!r}, remove_extra_whitespaces="
                        f"{spec.remove_extra_whitespaces}), which only sentencepiece reproduces; provide a tokenizer.json")
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    cfg = dict(tokenizer_config or {})  # as _special_tokens reads it
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if isinstance(cfg.get(k), str)}
    pieces = [p.piece for p in proto.pieces]
    defaults = {"unk_token": pieces[proto.trainer_spec.unk_id]}
    for name, idx in (("bos_token", proto.trainer_spec.bos_id), ("eos_token", proto.trainer_spec.eos_id)):
        if 0 <= idx < len(pieces):
            defaults[name] = pieces[idx]
    with tempfile.TemporaryDirectory() as tmp:  # the model file alone: no tokenizer_config/auto_map read
        shutil.copyfile(path, Path(tmp) / "tokenizer.model")
        try:
            tok = LlamaTokenizer.from_pretrained(
                tmp, local_files_only=True, add_prefix_space=bool(spec.add_dummy_prefix), legacy=False,
                add_bos_token=cfg.get("add_bos_token", True), add_eos_token=cfg.get("add_eos_token", False),
                **{**defaults, **specials})
        except Exception as err:
            raise UserError(f"cannot build a tokenizer from {path}: {type(err).__name__}: {err}") from None
    backend = tok.backend_tokenizer  # vocab, merges, byte fallback, decoder, BOS post-processor
    steps = ([normalizers.Prepend("▁")] if spec.add_dummy_prefix else []) + [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    # a plain fast tokenizer: saved as tokenizer.json and read back as is (LlamaTokenizer would
    # rebuild its own Metaspace pipeline on load and lose the normaliser above)
    from transformers import PreTrainedTokenizerFast

    out = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                  unk_token=tok.unk_token, pad_token=tok.pad_token)
    if len(out) < len(pieces):
        raise UserError(f"{path}: the tokenizer built has {len(out)} tokens, the model {len(pieces)}")
    return out


# ---------------------------------------------------------------- saving a tokenizer

# strings whose ids a saved tokenizer must reproduce after AutoTokenizer.from_pretrained
_PROBES = ("Hello world", " Human: hi\n###", "  two  spaces", "digits 12345 and 6.7", "émoji ☃", "<s> x </s>")


def save_llm_tokenizer(tokenizer, directory: Path) -> None:
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
        raise UserError(f"the tokenizer saved in {directory} does not load back as the same tokenizer "
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
