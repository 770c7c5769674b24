"""The two extra branches of the four-branch SPHINX releases, as LLaMA2-Accessory saves them → models.vision's towers.

    >>> clip = clip_from_open_clip(ckpt.take("clip."), flavour, source="consolidated.00-of-02.model.pth")
    >>> qformer = qformer_from_blip2(ckpt.take("qformer."), flavour, source="...")
    >>> clip.tensors()["encoder.layers.0.self_attn.q_proj.weight"].shape        # CLIPVisionModel names

CLIP ViT-L/14 (``clip.*``: open_clip's ``CLIP`` with ``transformer = None``, llama_ens.py:296-301) →
``CLIPVisionModel``. The release runs ``clip_encode_image`` (llama_ens.py:352-375): ``visual.conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, the resblocks and ``ln_post`` on every token;
``visual.proj`` and the text side that stays in the state dict (``token_embedding``, ``positional_embedding``,
``ln_final``, ``text_projection``, ``logit_scale``) are read and ignored. The only surgery: open_clip's
packed ``attn.in_proj_weight`` / ``in_proj_bias`` [3d, ...] split into q / k / v (nn.MultiheadAttention's order).

The Q-Former (``qformer.*``: transformers' ``Blip2Model`` with ``language_projection`` and
``language_model`` set to None, llama_ens.py:284-293) → models.qformer.QFormerBranch, which keeps
``Blip2Model``'s names (``vision_model.*``, ``qformer.*``, ``query_tokens``). Two differences from the
transformers this project runs, both from the transformers the release was saved with (4.27 era):
the vision attention stored ``self_attn.q_bias`` and ``v_bias`` (the qkv bias is ``[q_bias, 0, v_bias]``;
a checkpoint that already has ``qkv.bias`` is taken as it is), and every Q-Former layer also held the
text-only feed-forward ``intermediate.*`` / ``output.*`` that query tokens never use (read and ignored).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from models.flavours import Flavour
from models.qformer import QFormerBranch
from models.vision import build_clip
from models.weights.encoders import EncoderWeights
from models.weights.stream import Recipe, RenameTable, as_recipes, check_fits, rename

_L = r"^transformer\.resblocks\.(\d+)\."
_H = r"encoder.layers.\1."
OPEN_CLIP_VIT: RenameTable = [
    (r"^conv1\.weight$", "embeddings.patch_embedding.weight"),
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    (_L + r"ln_1\.", _H + "layer_norm1."),
    (_L + r"ln_2\.", _H + "layer_norm2."),
    (_L + r"attn\.in_proj_weight$", tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv")),
    (_L + r"attn\.in_proj_bias$", tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv")),
    (_L + r"attn\.out_proj\.", _H + "self_attn.out_proj."),
    (_L + r"mlp\.c_fc\.", _H + "mlp.fc1."),
    (_L + r"mlp\.c_proj\.", _H + "mlp.fc2."),
    (r"^ln_post\.", "post_layernorm."),
]
# open_clip CLIP keys the release keeps but never runs (the text tower's leftovers, the image projection)
_CLIP_UNUSED = (r"^visual\.proj$", r"^token_embedding\.", r"^positional_embedding$", r"^ln_final\.",
                r"^text_projection$", r"^logit_scale$", r"^attn_mask$")
# Blip2QFormerLayer's text feed-forward (transformers 4.27), unused by query tokens
_QFORMER_TEXT_FFN = r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\."


def _meta_state(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _split(state: dict[str, Recipe], patterns: tuple[str, ...]) -> tuple[dict[str, Recipe], tuple[str, ...]]:
    import re

    drop = [re.compile(p) for p in patterns]
    kept = {k: v for k, v in state.items() if not any(d.search(k) for d in drop)}
    return kept, tuple(sorted(set(state) - set(kept)))


def clip_from_open_clip(state: dict[str, Union[torch.Tensor, Recipe]], flavour: Flavour, *,
                        source: str) -> EncoderWeights:
    """The release's ``clip.*`` keys (prefix stripped) → ``CLIPVisionModel`` weights of ``flavour.clip``."""
    state, ignored = _split(as_recipes(state, source), _CLIP_UNUSED)
    foreign = sorted(k for k in state if not k.startswith("visual."))
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    out, unmatched = rename(visual, OPEN_CLIP_VIT, source)
    with torch.device("meta"):
        expected = _meta_state(build_clip(flavour))
    check_fits(expected, out, f"CLIP weights {source} (open_clip layout)", f"flavour {flavour.name!r}",
               unexpected_extra=foreign + [f"visual.{k}" for k in unmatched])
    ignored = tuple(f"clip.{k}" for k in ignored)
    return EncoderWeights("clip", "open_clip", out, {}, source, ignored)  # type: ignore[arg-type]


def qformer_from_blip2(state: dict[str, Union[torch.Tensor, Recipe]], flavour: Flavour, *,
                       source: str) -> EncoderWeights:
    """The release's ``qformer.*`` keys (prefix stripped) → models.qformer.QFormerBranch weights."""
    state, ignored = _split(as_recipes(state, source), (_QFORMER_TEXT_FFN,))
    notes = []
    out = dict(state)
    q_bias = sorted(k for k in state if k.endswith(".self_attn.q_bias"))
    for q_key in q_bias:
        layer = q_key[: -len("q_bias")]
        v_key = layer + "v_bias"
        if v_key not in out:
            continue  # reported below as unexpected (q_bias without v_bias)
        q, v = out.pop(q_key), out.pop(v_key)
        out[layer + "qkv.bias"] = Recipe.combine([q, v], lambda q, v: torch.cat([q, torch.zeros_like(q), v]))
    if q_bias:
        notes.append(f"vision qkv bias built as [q_bias, 0, v_bias] in {len(q_bias)} layer(s)")
    with torch.device("meta"):
        expected = _meta_state(QFormerBranch(flavour.qformer, flavour.qformer_input))
    check_fits(expected, out, f"Q-Former weights {source} (Blip2Model layout)", f"flavour {flavour.name!r}")
    ignored = tuple(f"qformer.{k}" for k in ignored)
    return EncoderWeights("qformer", "blip2", out, {}, source, ignored, tuple(notes))  # type: ignore[arg-type]
