"""vLLM's multimodal processor for SPHINX-X: image → uint8 views + kept mask, and the prompt's
``<image>`` token → exactly ``image_token_count`` copies.

Before (one request)::

    prompt_token_ids = [..., 4, ...]          # ONE <image> id per image (build_prompt with image_tokens=[1, ...])
    multi_modal_data = {"image": [jpeg_bytes | PIL.Image | MediaWithBytes]}

After (what vLLM schedules and what SphinxXForConditionalGeneration.embed_multimodal gets)::

    prompt_token_ids = [..., 4, 4, ..., 4, ...]   # image_token_count(W, H, spec, N) copies per image
    views        uint8 [Σ(1 + kept), S, S, 3]   flat field: image i owns its 1 + kept_i views
    kept         bool  [I, G·G]                 batched field (G = 1: [I, 0])
    image_tokens long  [I]                      batched field, the count each placeholder got

Each image goes through ``models.tiling.load_and_tile`` — the function preprocess uses, so the
views are the training views bit for bit. Encoded bytes are decoded by it directly; for an image
that vLLM's media loader already decoded (``MediaWithBytes``, e.g. an OpenAI ``image_url``) the
original bytes are re-decoded the training way (EXIF, alpha on the mean colour), not vLLM's
(alpha on white). A PIL image is taken as is (``load_image`` still EXIF-transposes and converts
it to RGB). A bad image raises ValueError (vLLM answers 400), its cause the ``ImageError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media.base import MediaWithBytes
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate)

from models.conversation import IMAGE
from models.flavours import Flavour
from models.tiling import ImageError, TiledImage, TileSpec, image_token_count, load_and_tile


def tile_item(item: Any, spec: TileSpec, max_pixels: int) -> TiledImage:
    """One vLLM image item (bytes, MediaWithBytes, PIL image, HWC uint8 array) → its TiledImage."""
    if isinstance(item, MediaWithBytes):
        item = item.original_bytes
    elif isinstance(item, torch.Tensor):
        item = Image.fromarray(item.cpu().numpy())
    elif isinstance(item, np.ndarray):
        item = Image.fromarray(item)
    try:
        return load_and_tile(item, spec, max_pixels=max_pixels)
    except ImageError as err:
        raise ValueError(str(err)) from err


class SphinxXImageItems(ImageProcessorItems):
    """Images as the request gave them: the processor decodes them itself (see module docstring)."""

    def get_processor_data(self) -> Mapping[str, object]:
        return {"images": list(self.data)}

    def get_image_size(self, item_idx: int) -> ImageSize:
        item = self.data[item_idx]
        if isinstance(item, (bytes, bytearray, memoryview)):
            raise ValueError("the size of an encoded image is only known after decoding")
        return super().get_image_size(item_idx)


class SphinxXDataParser(MultiModalDataParser):
    """Accepts encoded image bytes besides vLLM's image types, and converts nothing."""

    def _parse_image_data(self, data):
        if data is None:
            return None
        if isinstance(data, (bytes, bytearray, memoryview, Image.Image, MediaWithBytes)):
            return SphinxXImageItems([data])
        if isinstance(data, (list, tuple)) and all(
                isinstance(d, (bytes, bytearray, memoryview, Image.Image, MediaWithBytes, np.ndarray)) for d in data):
            return SphinxXImageItems(list(data))
        return super()._parse_image_data(data)


class SphinxXProcessingInfo(BaseProcessingInfo):
    """Geometry from the model's SphinxXConfig (actors.serve.vllm.config): the flavour's tiling and N."""

    @cached_property
    def flavour(self) -> Flavour:
        return self.get_hf_config().get_flavour()

    @cached_property
    def tile_spec(self) -> TileSpec:
        return TileSpec.from_flavour(self.flavour)

    @property
    def max_pixels(self) -> int:
        return int(self.get_hf_config().max_image_pixels)

    @property
    def image_token_id(self) -> int:
        return int(self.get_hf_config().image_token_index)

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("SPHINX-X has no Hugging Face processor: models.tiling prepares its images")

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set()}

    def get_data_parser(self) -> MultiModalDataParser:
        return SphinxXDataParser(expected_hidden_size=self._get_expected_hidden_size(),
                                 allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return image_token_count(image_width, image_height, self.tile_spec, self.flavour.tokens_per_view)

    def get_image_size_with_most_features(self) -> ImageSize:
        side = self.tile_spec.canvas  # a square image keeps every tile
        return ImageSize(width=side, height=side)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()
        return {"image": self.get_num_image_tokens(image_width=size.width, image_height=size.height)}


class SphinxXDummyInputsBuilder(BaseDummyInputsBuilder[SphinxXProcessingInfo]):
    """Profiling inputs: one ``<image>`` per image, square canvas-sized images (most tokens)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0), overrides=overrides)}


class SphinxXMultiModalProcessor(BaseMultiModalProcessor[SphinxXProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """{"images": [...]} → views / kept / image_tokens (module docstring), through models.tiling."""
        spec, n = self.info.tile_spec, self.info.flavour.tokens_per_view
        tiled = [tile_item(item, spec, self.info.max_pixels) for item in hf_data.get("images", [])]
        gg = spec.grid * spec.grid if spec.grid > 1 else 0
        if not tiled:
            return BatchFeature({"views": torch.zeros((0, spec.tile_size, spec.tile_size, 3), dtype=torch.uint8),
                                 "kept": torch.zeros((0, gg), dtype=torch.bool),
                                 "image_tokens": torch.zeros(0, dtype=torch.long)})
        return BatchFeature({
            "views": torch.from_numpy(np.concatenate([t.views for t in tiled])),
            "kept": torch.from_numpy(np.stack([t.kept for t in tiled]).astype(bool)).reshape(len(tiled), gg),
            "image_tokens": torch.tensor([image_token_count(*t.original_size, spec, n) for t in tiled]),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        views_per_image = 1 + hf_inputs.get("kept", torch.zeros((0, 0), dtype=torch.bool)).sum(-1)
        return dict(views=MultiModalFieldConfig.flat_from_sizes("image", views_per_image),
                    kept=MultiModalFieldConfig.batched("image"),
                    image_tokens=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_id = self.info.image_token_id

        def replacement(item_idx: int) -> list[int]:
            count = int(out_mm_kwargs["image"][item_idx]["image_tokens"].data)
            return [image_id] * count

        return [PromptReplacement(modality="image", target=[image_id], replacement=replacement)]
