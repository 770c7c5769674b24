"""The vLLM weight loader for a sphinx-x model directory (vLLM ``load_format="sphinx_x"``).

The loader reads the directory named by the config's ``model_dir`` (actors.serve.vllm.config)
with ``models.weights.model_dir.stream_weights`` — the same read as training init, one tensor at
a time under SphinxX state-dict names (``llm.model.layers.0.self_attn.q_proj.weight``,
``vision.projector.0.weight``, ...) —, feeds it to ``SphinxXForConditionalGeneration.load_weights``
(which renames Mixtral's experts for vLLM: models.weights.vllm_names) and fails, naming the keys,
when a parameter was left unloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.weights.model_dir import CheckpointError, stream_weights


def make_model_loader():
    """vLLM's BaseModelLoader subclass for ``load_format="sphinx_x"`` (built lazily: vLLM is optional)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    def source(model_config) -> Path:
        src = Path(getattr(model_config.hf_config, "model_dir", "") or model_config.model)
        if not src.is_dir():
            raise CheckpointError(f"sphinx-x model directory not found: {src}")
        return src

    class SphinxXModelLoader(BaseModelLoader):
        def download_model(self, model_config) -> None:  # local directories only
            source(model_config)

        def load_weights(self, model: torch.nn.Module, model_config) -> None:
            src = source(model_config)
            loaded = model.load_weights(stream_weights(src))
            missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
            if missing:
                shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
                raise CheckpointError(f"{src}: no weights for {len(missing)} parameter(s) of the "
                                      f"vLLM model: {shown}")

    return SphinxXModelLoader
