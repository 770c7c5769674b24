"""Meta's Llama layout → transformers' ``LlamaForCausalLM`` names: the one Meta→HF key map.

Meta's reference Llama (and everything derived from it: LLaMA2-Accessory's ``llama_ens*_light``,
models.weights.accessory; InternLM2 under its ``model.`` prefix, models.weights.internlm2) names a
layer's modules ``attention.wq``, ``feed_forward.w1``, ... where transformers has
``self_attn.q_proj``, ``mlp.gate_proj``, ...::

    >>> hf_name("layers.3.attention.wq.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> meta_name("lm_head.weight")
    'output.weight'
    >>> hf = from_meta(take, llama_kwargs, interleaved_rotary=True)   # {HF name: tensor | Recipe}

The only tensor surgery is the rotary layout: Meta's original checkpoints rotate interleaved
pairs (rows 0,1 | 2,3 | ... of a head), transformers rotates halves (rows 0..D/2 | D/2..D), so
``wq`` / ``wk`` rows are permuted per head (:func:`permute_rotary`). InternLM2 already uses
halves.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, TypeVar

import torch

# Meta module path → Hugging Face module path (".weight" / ".bias" follow unchanged)
META_TO_HF = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
}
# inside a layer: "layers.N." + Meta path ↔ "model.layers.N." + Hugging Face path
META_TO_HF_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Meta's q / k rows are interleaved rotary pairs (permute_rotary)
ROTARY = ("attention.wq", "attention.wk")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # resized to the tokenizer (models.weights.hf_llm)

_META = re.compile(r"^(?:layers\.(\d+)\.)?(.+)\.(weight|bias)$")
_HF = re.compile(r"^(?:model\.layers\.(\d+)\.)?(.+)\.(weight|bias)$")
T = TypeVar("T")


def _map(key: str, pattern: re.Pattern, top: dict[str, str], layer: dict[str, str], layer_prefix: str) -> str:
    m = pattern.match(key)
    if m is None:
        raise KeyError(key)
    index, path, kind = m.groups()
    if index is None:
        return f"{top[path]}.{kind}"
    return f"{layer_prefix}{index}.{layer[path]}.{kind}"


def hf_name(meta_key: str) -> str:
    """``layers.N.feed_forward.w1.weight`` → ``model.layers.N.mlp.gate_proj.weight`` (KeyError if not Meta's)."""
    return _map(meta_key, _META, META_TO_HF, META_TO_HF_LAYER, "model.layers.")


def meta_name(hf_key: str) -> str:
    """The inverse of :func:`hf_name`: ``lm_head.weight`` → ``output.weight``."""
    return _map(hf_key, _HF, {v: k for k, v in META_TO_HF.items()},
                {v: k for k, v in META_TO_HF_LAYER.items()}, "layers.")


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads·head_dim, d] in Meta's interleaved rotary layout → transformers' rotate-half layout
    (per head: rows (0, 1, 2, 3, ...) → (0, 2, ..., 1, 3, ...))."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_shapes(llama_kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of ``LlamaForCausalLM(LlamaConfig(**llama_kwargs))`` (lm_head included),
    from a model built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        # a deep copy: LlamaConfig standardises a rope_scaling dict in place
        model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(dict(llama_kwargs, tie_word_embeddings=False))))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def from_meta(take: Callable[[str, tuple[int, ...]], T], llama_kwargs: dict[str, Any], *,
              interleaved_rotary: bool) -> dict[str, T]:
    """{HF name: take(Meta name, the shape the config gives)} for every weight of the config's
    LlamaForCausalLM, in its order. ``take`` checks and returns the source tensor (or Recipe), so a
    missing or mis-shaped weight is reported by its source name; ``interleaved_rotary``: permute
    ``wq`` / ``wk`` (tensors directly, recipes lazily)."""
    heads = int(llama_kwargs["num_attention_heads"])
    kv = int(llama_kwargs.get("num_key_value_heads") or heads)
    out: dict[str, T] = {}
    for hf, shape in llama_shapes(llama_kwargs).items():
        meta = meta_name(hf)
        value = take(meta, shape)
        rotary = next((p for p in ROTARY if f".{p}.weight" in f".{meta}"), None)
        if interleaved_rotary and rotary:
            n = heads if rotary == "attention.wq" else kv
            value = (permute_rotary(value, n) if torch.is_tensor(value)
                     else value.then(lambda t, n=n: permute_rotary(t, n)))
        out[hf] = value
    return out
