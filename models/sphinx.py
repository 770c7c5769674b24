"""SPHINX-X: the mixture of visual experts feeding a Llama (dense) or Mixtral (MoE) LLM.

    >>> model = SphinxX.from_flavour(from_name("debug"), tokenizer)
    >>> out = model(input_ids, attention_mask, labels, views=views, kept=kept)
    >>> out.loss, out.lm_loss, out.aux_loss, out.logits.shape      # logits [B, T, vocab]
    >>> model.generate([[1, 5, 9]], max_new_tokens=[8])             # [[...8 new ids...]]

Inputs (docs/interfaces.md, "Batches"):

    input_ids  long [B, T]   each image already expanded to image_tokens copies of image_token_id
    attention_mask   [B, T]  1 on real tokens, 0 on padding (left or right)
    position_ids long [B, T] optional: packed rows (several samples per row, training). Each
                             sample's positions restart at 0 (padding is one more "sample");
                             attention is then confined to each sample: the LLM gets no 2-D
                             mask, and transformers builds the block-diagonal causal mask from
                             the restarts (SDPA / eager) or runs flash-attention varlen on them.
                             A sample's first label must be -100 (actors.train.batching.collate does it)
                             so no sample predicts the next sample's first token.
    labels     long [B, T]   -100 everywhere except assistant answers
    views     uint8 [V, S, S, 3]  all images' views, in the order the images appear (sample by
                             sample, left to right); kept bool [I, G·G] one mask per image

The image embeddings (models.vision) replace the image_token_id positions in order; their
counts must match exactly. The loss is next-token cross entropy over labels != -100, plus
``router_aux_loss_coef · aux_loss`` (Mixtral load balancing) for MoE flavours.

Plain single-device nn.Module: DeepSpeed / Ray parallelism is applied from outside, and the
Mixtral sparse blocks stay HF's own classes so DeepSpeed AutoEP can replace them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from models.errors import UserError
from models.flavours import Flavour
from models.vision import MixtureOfVisualExperts

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass
class SphinxOutput:
    loss: Optional[torch.Tensor]  # lm_loss + coef · aux_loss; None without labels
    lm_loss: Optional[torch.Tensor]  # mean CE over supervised tokens; None without labels
    aux_loss: torch.Tensor  # router load balancing (0 for dense)
    logits: torch.Tensor  # [B, T, vocab]
    num_tokens: int = 0  # supervised target tokens in the batch (for token-weighted averaging)


def build_llm(flavour: Flavour, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> nn.Module:
    """LlamaForCausalLM / MixtralForCausalLM from the flavour's config kwargs (random init)."""
    kwargs = dict(flavour.llm, vocab_size=vocab_size, pad_token_id=pad_token_id,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if flavour.is_moe:
        config = MixtralConfig(**kwargs)
        config.output_router_logits = True
        config._attn_implementation = flavour.attn_implementation
        return MixtralForCausalLM(config)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = flavour.attn_implementation
    return LlamaForCausalLM(config)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 → positions counting real tokens only (left padding starts at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class SphinxX(nn.Module):
    def __init__(self, flavour: Flavour, *, vocab_size: int, image_token_id: int, pad_token_id: int,
                 bos_token_id: int, eos_token_id: int):
        super().__init__()
        if not 0 <= image_token_id < vocab_size:
            raise UserError(f"image_token_id {image_token_id} is outside the vocabulary (size {vocab_size})")
        self.flavour = flavour
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.llm = build_llm(flavour, vocab_size, pad_token_id, bos_token_id, eos_token_id)
        d_llm = self.llm.config.hidden_size
        self.vision = MixtureOfVisualExperts(flavour, d_llm)
        self.aux_loss_coef = float(flavour.llm.get("router_aux_loss_coef", 0.01)) if flavour.is_moe else 0.0

    @classmethod
    def from_flavour(cls, flavour: Flavour, tokenizer) -> "SphinxX":
        """Token ids from the tokenizer; vocab = the tokenizer's size (at least the LLM's for real flavours)."""
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add the special tokens first "
                            "(models.conversation)")
        vocab = len(tokenizer)
        if flavour.tokenizer is not None:  # a real LLM: keep its embedding rows, extra tokens go after
            vocab = max(vocab, int(flavour.llm["vocab_size"]))
        ids = {}
        for name in ("pad", "bos", "eos"):
            value = getattr(tokenizer, f"{name}_token_id")
            if value is None:
                raise UserError(f"the tokenizer has no {name} token")
            ids[f"{name}_token_id"] = value
        return cls(flavour, vocab_size=vocab, image_token_id=image_id, **ids)

    @property
    def is_moe(self) -> bool:
        return self.flavour.is_moe

    def token_ids(self) -> dict[str, int]:
        return dict(vocab_size=self.vocab_size, image_token_id=self.image_token_id, pad_token_id=self.pad_token_id,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)

    def set_vision_trainable(self, trainable: bool) -> None:
        """Unfreeze (True) or freeze (False) both visual encoders; projector/start/end/skip always train."""
        self.vision.set_encoders_trainable(trainable)

    # ------------------------------------------------------------------ embedding

    def embed(self, input_ids: torch.Tensor, views: Optional[torch.Tensor] = None,
              kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, T] → embeddings [B, T, d] with image embeddings at image_token_id positions.

        The vision module runs on every call, also without images (it then returns [0, d] that
        still depends on all its parameters: see models.vision)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        if views is None or kept is None or kept.shape[0] == 0:
            if n_slots:
                raise UserError(f"the batch has {n_slots} image tokens but no images (views/kept missing)")
            views = kept = None
        else:
            views, kept = views.to(input_ids.device), kept.to(input_ids.device)
        images = self.vision(views, kept)  # [Σ image tokens, d]
        if images.shape[0] != n_slots:
            per_image = self.vision.token_counts(kept)
            raise UserError(f"image token count mismatch: input_ids hold {n_slots} image tokens but the "
                            f"{len(per_image)} image(s) give {images.shape[0]} embeddings {per_image} "
                            "(was an image truncated, or tiled with another grid/flavour?)")
        embeds = embeds.clone()
        embeds[is_image] = images.to(embeds.dtype)
        return embeds

    # ------------------------------------------------------------------ training forward

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, views: Optional[torch.Tensor] = None,
                kept: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None) -> SphinxOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, views, kept)
        kwargs = dict(output_router_logits=True) if self.is_moe else {}
        if position_ids is None:
            mask, position_ids = attention_mask, position_ids_from_mask(attention_mask)
        else:  # packed: the restarts confine attention (see the module docstring)
            mask, position_ids = None, position_ids.to(input_ids.device)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                       use_cache=False, **kwargs)
        logits = out.logits
        aux = getattr(out, "aux_loss", None)
        if mask is None and torch.is_tensor(aux) and getattr(out, "router_logits", None):
            # packed: the LLM saw no mask, so count the load balancing over real tokens only, as unpacked
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux = load_balancing_loss_func(out.router_logits, self.llm.num_experts, self.llm.num_experts_per_tok,
                                           attention_mask)
        if not torch.is_tensor(aux):  # dense, or router logits not recorded (e.g. replaced blocks)
            aux = logits.new_zeros((), dtype=torch.float32)
        if labels is None:
            return SphinxOutput(loss=None, lm_loss=None, aux_loss=aux, logits=logits)
        targets = labels[:, 1:].to(logits.device)
        num_tokens = int((targets != IGNORE_INDEX).sum())
        if num_tokens:
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                      ignore_index=IGNORE_INDEX)
        else:  # nothing supervised: a zero that still backpropagates
            lm_loss = logits.sum().float() * 0.0
        loss = lm_loss + self.aux_loss_coef * aux.float()
        return SphinxOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux, logits=logits, num_tokens=num_tokens)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: Sequence[Sequence[int]], views: Optional[torch.Tensor] = None,
                 kept: Optional[torch.Tensor] = None, *, max_new_tokens: Union[int, Sequence[int]],
                 eos_token_id: Optional[int] = None, use_cache: bool = True) -> list[list[int]]:
        """Greedy decoding, batched: the new token ids of each sequence (the reference the served
        vLLM model is compared against, ``pipelines/demo/parity.py``).

        A sequence stops after its own ``max_new_tokens`` (an int for all, or one per sequence)
        or on ``eos_token_id`` (default: the tokenizer's), which is kept as its last token.
        Prompts are left-padded, so a sequence's tokens do not depend on its batch neighbours;
        the KV cache is used unless ``use_cache=False`` (full recompute, tests). Greedy only:
        sampling is vLLM's, in serving.
        """
        batch = len(input_ids)
        out: list[list[int]] = [[] for _ in range(batch)]
        max_new = _per_seq(max_new_tokens, batch, "max_new_tokens")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        if any(len(p) == 0 for p in input_ids):
            raise UserError("every prompt needs at least one token")
        finished = [m <= 0 for m in max_new]
        if all(finished):
            return out
        device = self.llm.get_input_embeddings().weight.device
        width = max(len(p) for p in input_ids)
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for i, prompt in enumerate(input_ids):
            ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        with torch.no_grad():
            embeds = self.embed(ids, views, kept)
            positions = position_ids_from_mask(mask)
            cache = DynamicCache(config=self.llm.config) if use_cache else None
            logits = self._last_logits(embeds, mask, positions, cache)
            while True:
                picks = logits.argmax(-1)  # [B]
                for i, token in enumerate(picks.tolist()):
                    if not finished[i]:
                        out[i].append(token)
                        finished[i] = token == eos or len(out[i]) >= max_new[i]
                if all(finished):
                    return out
                # every row takes its pick (a finished row's are never read): rows attend only to themselves
                new_embeds = self.llm.get_input_embeddings()(picks[:, None])
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
                positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
                if use_cache:
                    logits = self._last_logits(new_embeds, mask, positions[:, -1:], cache)
                else:
                    embeds = torch.cat([embeds, new_embeds], dim=1)
                    logits = self._last_logits(embeds, mask, positions, None)

    def _last_logits(self, embeds, mask, positions, cache) -> torch.Tensor:
        """Run the decoder on embeds [B, t, d] (after the cache); logits of the last position [B, V]."""
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=cache is not None).last_hidden_state
        return self.llm.lm_head(hidden[:, -1]).float()


def _per_seq(value, batch: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise UserError(f"{name} has {len(value)} entries for {batch} sequences")
        return list(value)
    return [value] * batch
