"""SPHINX-X as a vLLM model: our vision tower + vLLM's own Llama / Mixtral decoder.

    vision          models.vision.MixtureOfVisualExperts (both encoders, projector, start/end/skip),
                    the very module training uses, replicated on every tensor-parallel rank
    language_model  vllm LlamaForCausalLM (dense) / MixtralForCausalLM (MoE): paged attention,
                    tensor parallel, fused MoE with expert parallel

Per engine step vLLM calls, in order::

    embed_multimodal(views uint8 [ΣV, S, S, 3], kept bool [I, G·G], image_tokens long [I])
        -> I tensors [image_tokens_i, d]               (models.vision: (1 + kept)(N + 2) + skipped rows)
    embed_input_ids(input_ids [T], those tensors, is_multimodal=bool [T])
        -> [T, d], image rows scattered at the <image> positions (SupportsMultiModal's merge)
    forward(input_ids, positions [T], inputs_embeds=[T, d]) -> hidden [T, d]
    compute_logits(hidden) -> [T, vocab]

Weights: ``load_weights`` takes the SphinxX state-dict stream of actors.serve.vllm.loader
(``llm.*`` → vLLM's decoder, HF Mixtral's fused experts split into w1/w3/w2 per expert;
``vision.*`` → copied into the vision tower) and returns the names it filled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from actors.serve.vllm.config import SphinxXConfig, text_architecture
from actors.serve.vllm.processor import SphinxXDummyInputsBuilder, SphinxXMultiModalProcessor, SphinxXProcessingInfo
from models.weights.model_dir import CheckpointError
from models.weights.vllm_names import mixtral_to_vllm
from models.conversation import IMAGE
from models.vision import MixtureOfVisualExperts

@MULTIMODAL_REGISTRY.register_processor(SphinxXMultiModalProcessor, info=SphinxXProcessingInfo,
                                        dummy_inputs=SphinxXDummyInputsBuilder)
class SphinxXForConditionalGeneration(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE
        raise ValueError(f"SPHINX-X takes images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SphinxXConfig = vllm_config.model_config.hf_config
        self.config = config
        self.flavour = config.get_flavour()
        self.image_token_id = int(config.image_token_index)
        text = config.get_text_config()
        self.configure_mm_token_handling(vocab_size=text.vocab_size, mm_token_ids=[self.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision = MixtureOfVisualExperts(self.flavour, text.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text, prefix=maybe_prefix(prefix, "language_model"),
                architectures=[text_architecture(self.flavour)])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------------ images

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        views, kept, wanted = kwargs.get("views"), kwargs.get("kept"), kwargs.get("image_tokens")
        if views is None or kept is None:
            return []
        if isinstance(views, (list, tuple)):
            views = torch.cat(list(views))
        if isinstance(kept, (list, tuple)):
            kept = torch.stack(list(kept))
        device = self.vision.start.device
        embeds = self.vision(views.to(device), kept.to(device).bool())  # [Σ image tokens, d]
        counts = self.vision.token_counts(kept)
        if wanted is not None:
            wanted = [int(n) for n in (torch.stack(list(wanted)) if isinstance(wanted, (list, tuple)) else wanted)]
            if wanted != counts:
                raise ValueError(f"image token counts {wanted} from the processor != {counts} from the vision tower")
        return list(embeds.split(counts))

    # ------------------------------------------------------------------ decoder

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """SphinxX state-dict names (actors.serve.vllm.loader) → the names of the parameters filled."""
        vision = self.vision.state_dict(keep_vars=True)
        loaded: set[str] = set()
        unexpected: list[str] = []
        moe = self.flavour.is_moe

        def llm_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("llm."):
                    yield from (mixtral_to_vllm(name[4:], tensor) if moe else [(name[4:], tensor)])
                elif name.startswith("vision.") and name[7:] in vision:
                    target = vision[name[7:]]
                    if target.shape != tensor.shape:
                        raise CheckpointError(f"{name}: shape {list(tensor.shape)} != the model's {list(target.shape)}")
                    with torch.no_grad():
                        target.copy_(tensor)
                    loaded.add(name)
                else:
                    unexpected.append(name)

        stream = llm_weights()
        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(stream)}
        for _ in stream:  # whatever the decoder's loader left unread (vision weights after the LLM's)
            pass
        if unexpected:
            raise CheckpointError(f"unexpected weights for SPHINX-X ({len(unexpected)}): {', '.join(unexpected[:8])}")
        return loaded
