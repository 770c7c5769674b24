"""A chat request as the PyTorch model takes it: the prompt ids with every image expanded, and the
views, through the same functions preprocess uses (models.tiling, models.conversation).

Serving runs vLLM (actors.serve.vllm); this is the reference it is compared against: the demo's
parity check (pipelines.demo.parity) and the replica's ``prepare`` (train == serve inputs).

    >>> p = prepare_chat([{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "Hi"}]}],
    ...                  [png_bytes], tokenizer, from_name("debug"), max_pixels=10**7)
    >>> p.views.shape, p.kept.shape, p.image_tokens       # ((V, S, S, 3), (1, G*G), [n])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass
class Prepared:
    """A request as the training code builds it: input_ids with images expanded, views uint8
    [V, S, S, 3], kept bool [I, G*G] (None without images), image_tokens per image."""

    input_ids: list[int]
    views: Optional[np.ndarray]
    kept: Optional[np.ndarray]
    image_tokens: list[int]


def prepare_chat(messages: list[dict], images: list[bytes], tokenizer: Any, flavour: Any, *,
                 max_pixels: int) -> Prepared:
    """OpenAI-style messages (image parts ``{"type": "image", "index": i}`` or ``image_url``) and
    the images' bytes → :class:`Prepared`, through the same functions preprocess uses."""
    from models.conversation import build_prompt
    from models.tiling import TileSpec, image_token_count, load_and_tile

    spec = TileSpec.from_flavour(flavour)
    tiled = [load_and_tile(data, spec, max_pixels=max_pixels) for data in images]
    image_tokens = [image_token_count(*t.original_size, spec, flavour.tokens_per_view) for t in tiled]
    input_ids = build_prompt(messages, tokenizer, image_tokens, image_position=flavour.image_position)
    if not tiled:
        return Prepared(input_ids, None, None, [])
    views = np.concatenate([t.views for t in tiled])
    kept = np.stack([t.kept for t in tiled])
    return Prepared(input_ids, views, kept, image_tokens)
