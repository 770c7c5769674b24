"""InternLM2 as published (remote code, never executed) → a Llama state dict and LlamaConfig keys.

InternLM2's weights are Meta's Llama names under ``model.`` (the head, ``output``, excepted), so
after :data:`INTERNLM2_TO_META` models.weights.meta_llama's one table places them; the only
surgery is the packed attention:

    model.layers.N.attention.wqkv [(H + 2K)·D, d]  →  layers.N.attention.wq [H·D, d], wk [K·D, d], wv [K·D, d]

``wqkv`` holds, per KV head h: its G = H/K query heads, its key, its value, D rows each
(``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=G + 2)``), so query head h·G + g uses KV head
h, which is Llama's grouping (``repeat_kv``). Its RoPE already rotates halves (no permute).

    >>> recipes, llama_kwargs = internlm2_to_llama(files.recipes(), config, source="internlm2-7b/")
    >>> recipes["model.layers.0.self_attn.k_proj.weight"].shape      # [K·D, d], still unread
"""

from __future__ import annotations

from typing import Any, Union

import torch

from models.errors import UserError
from models.weights.meta_llama import HEAD, EMBED, from_meta
from models.weights.stream import Recipe, as_recipes, rename, shown

# InternLM2 name → Meta name (then models.weights.meta_llama.META_TO_HF)
INTERNLM2_TO_META = [(r"^model\.", "")]


def _internlm2_name(meta: str) -> str:
    """The inverse of INTERNLM2_TO_META, for messages."""
    return meta if meta.startswith("output.") else f"model.{meta}"


def llama_kwargs(config: dict[str, Any], source: str) -> dict[str, Any]:
    """InternLM2's config.json → LlamaConfig keyword arguments (``bias`` → ``attention_bias``,
    ``rope_scaling {"type", "factor"}`` → ``{"rope_type", "factor"}``)."""
    try:
        d, h = int(config["hidden_size"]), int(config["num_attention_heads"])
        kwargs = dict(vocab_size=int(config["vocab_size"]), hidden_size=d, num_hidden_layers=int(config["num_hidden_layers"]),
                      num_attention_heads=h, intermediate_size=int(config["intermediate_size"]))
    except KeyError as err:
        raise UserError(f"{source}/config.json: InternLM2 config lacks {err}") from None
    k = int(config.get("num_key_value_heads") or h)
    if h % k or d % h:
        raise UserError(f"{source}/config.json: num_attention_heads {h} must divide hidden_size {d} and be a "
                        f"multiple of num_key_value_heads {k}")
    kwargs.update(num_key_value_heads=k, hidden_act=config.get("hidden_act", "silu"),
                  max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                  rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(config.get("rope_theta", 10000)),
                  attention_bias=bool(config.get("bias", False)), tie_word_embeddings=False)
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("linear", "dynamic"):
            raise UserError(f"{source}/config.json: rope_scaling type {kind!r} (InternLM2 has linear, dynamic)")
        kwargs["rope_scaling"] = {"rope_type": kind, "factor": float(scaling["factor"])}
    return kwargs


def _split_wqkv(meta: dict[str, Recipe], kwargs: dict[str, Any], source: str) -> dict[str, Recipe]:
    """Every ``layers.N.attention.wqkv.{weight,bias}`` → ``wq`` / ``wk`` / ``wv`` (module docstring)."""
    d, h, k = kwargs["hidden_size"], kwargs["num_attention_heads"], kwargs["num_key_value_heads"]
    hd, g = d // h, h // k
    out = {}
    for key, packed in meta.items():
        layer, dot, name = key.partition(".attention.wqkv.")
        if not dot:
            out[key] = packed
            continue
        rows = (h + 2 * k) * hd
        want = (rows, d) if name == "weight" else (rows,)
        if tuple(packed.shape) != want:
            raise UserError(f"{source}: {_internlm2_name(key)} {list(packed.shape)} != {list(want)} expected from "
                            "its config.json")
        for proj, rows_of, n_heads in (("q", slice(0, g), h), ("k", g, k), ("v", g + 1, k)):
            out[f"{layer}.attention.w{proj}.{name}"] = packed.then(
                lambda t, r=rows_of, n=n_heads: t.reshape(k, g + 2, hd, *t.shape[1:])[:, r]  # [K, G + 2, D, (d)]
                .reshape(n * hd, *t.shape[1:]).contiguous())
    return out


def internlm2_to_llama(state: dict[str, Union[torch.Tensor, Recipe]], config: dict[str, Any], *,
                       source: str) -> tuple[dict[str, Recipe], dict[str, Any]]:
    """InternLM2 (published layout) → (LlamaForCausalLM recipes, LlamaConfig keyword arguments);
    every weight used exactly once, each shape checked against the config (a mismatch, a missing
    or a leftover weight is a UserError naming it)."""
    kwargs = llama_kwargs(config, source)
    meta, _ = rename(as_recipes(state, source), INTERNLM2_TO_META, source, keep_unmatched=True)
    remaining = _split_wqkv(meta, kwargs, source)

    def take(key: str, shape: tuple[int, ...]) -> Recipe:
        if key == "output.weight" and key not in remaining and config.get("tie_word_embeddings"):
            return out_embed[0]
        if key not in remaining:
            extra = " (and tie_word_embeddings is false)" if key == "output.weight" else ""
            raise UserError(f"{source}: missing InternLM2 weight {_internlm2_name(key)}{extra}")
        value = remaining.pop(key)
        if tuple(value.shape) != shape:
            raise UserError(f"{source}: {_internlm2_name(key)} {list(value.shape)} != {list(shape)} expected from "
                            "its config.json")
        if key == "tok_embeddings.weight":
            out_embed.append(value)
        return value

    out_embed: list[Recipe] = []  # the embedding, the head when the config ties them
    out = from_meta(take, kwargs, interleaved_rotary=False)
    assert EMBED in out and HEAD in out
    if remaining:
        left = sorted(_internlm2_name(k) for k in remaining)
        raise UserError(f"{source}: unexpected InternLM2 weights ({len(left)}): {shown(left)}")
    return out, kwargs
