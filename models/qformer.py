"""BLIP-2's Q-Former branch of the four-branch SPHINX releases: a ViT, then 32 learned queries reading it.

    >>> branch = QFormerBranch(flavour.qformer)          # {"vision": {...}, "qformer": {...}, "queries": 32}
    >>> branch(pixel_values).shape                       # pixel_values [V, 3, 224, 224], CLIP-normalised
    torch.Size([V, 32, 768])

It is transformers' ``Blip2Model`` without its language model and projection, as the release keeps it
(``self.qformer.language_projection = None; self.qformer.language_model = None``, then
``get_qformer_features(pixel_values).last_hidden_state``, LLaMA2-Accessory
accessory/model/LLM/llama_ens.py:285-293, :393): the submodules keep ``Blip2Model``'s names
(``vision_model``, ``qformer``, ``query_tokens``), so the release's ``qformer.*`` keys map one to one
(models.weights.blip2). Built from configs (random init; weights from the model directory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel


class QFormerBranch(nn.Module):
    """pixel_values [V, 3, S, S] → the queries' last hidden states [V, queries, qformer hidden]."""

    def __init__(self, config: dict[str, Any], image_size: int):
        super().__init__()
        vision = Blip2VisionConfig(**{**config["vision"], "image_size": image_size})
        qformer = Blip2QFormerConfig(**{**config["qformer"], "encoder_hidden_size": vision.hidden_size})
        self.vision_model = Blip2VisionModel(vision)
        self.qformer = Blip2QFormerModel(qformer)
        self.query_tokens = nn.Parameter(torch.zeros(1, int(config["queries"]), qformer.hidden_size))

    @property
    def hidden_size(self) -> int:
        return self.qformer.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state  # post-layernormed [V, P, Cv]
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image,
                            encoder_attention_mask=mask).last_hidden_state
