"""Weights for the vLLM model, read from a sphinx-x model directory (vLLM ``load_format="sphinx_x"``).

    >>> for name, tensor in iter_model_weights("out/export"):
    ...     name            # 'llm.model.layers.0.self_attn.q_proj.weight', 'vision.projector.0.weight', ...

Names are those of ``models.sphinx.SphinxX.state_dict()`` (``llm.`` + the HF causal-LM names,
``vision.`` + models.vision's), whatever the directory layout: :func:`iter_model_weights` is
the only function that knows the layout (through ``models.weights.model_dir.part_files`` / ``PARTS``),
so a change of the layout changes it alone. The LLM is read tensor by tensor (safetensors
``safe_open``), never as a whole state dict.
:func:`mixtral_to_vllm` renames one HF Mixtral weight for vLLM's MixtralForCausalLM (HF's fused
experts split per expert).

The loader registered as ``load_format="sphinx_x"`` reads the directory named by the config's
``model_dir`` (actors.serve.vllm.config), feeds that stream to
``SphinxXForConditionalGeneration.load_weights`` and fails, naming the keys, when a parameter
was left unloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Union

import torch

from transformers import ConvNextModel, Dinov2Model

from models.weights.model_dir import PARTS, CheckpointError, part_files

_TOWERS = {"convnext": ConvNextModel, "dinov2": Dinov2Model}  # parts stored by save_pretrained

# HF transformers >= 5 Mixtral: experts fused as 3-D tensors; vLLM loads the original per-expert layout
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$")


def mixtral_to_vllm(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF Mixtral weight → the names vLLM's MixtralForCausalLM loads (others pass through).

    ``mlp.experts.gate_up_proj [E, 2F, d]`` → ``block_sparse_moe.experts.e.w1`` (gate, rows :F) and
    ``.w3`` (up, rows F:); ``mlp.experts.down_proj [E, d, F]`` → ``.w2``; ``mlp.gate`` → the router."""
    if m := _ROUTER.match(name):
        yield f"{m[1]}block_sparse_moe.gate.weight", tensor
        return
    if m := _FUSED_EXPERTS.match(name):
        base = f"{m[1]}block_sparse_moe.experts"
        if m[2] == "gate_up_proj":
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{base}.{e}.w1.weight", tensor[e, :half]
                yield f"{base}.{e}.w3.weight", tensor[e, half:]
        else:
            for e in range(tensor.shape[0]):
                yield f"{base}.{e}.w2.weight", tensor[e]
        return
    yield name, tensor


def iter_model_weights(model_dir: Union[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(SphinxX state-dict name, tensor) for every weight of a model directory (models.weights.model_dir).

    ``llm/`` and ``mm_projector.safetensors`` stream tensor by tensor under their on-disk names
    (``llm.`` + HF names as save_pretrained wrote them: vLLM's decoders read HF checkpoints, and
    :func:`mixtral_to_vllm` covers Mixtral's fused layout too). The encoder parts (``convnext/``,
    ``dinov2/``, ~2 B params at full size) go through transformers' own ``from_pretrained``, which
    maps their on-disk names (e.g. DINOv2's legacy attention names) to the module's, one at a time.
    """
    from safetensors import safe_open

    src = Path(model_dir)
    files = part_files(src)  # checks config.json and that every part's files exist
    for part, (path, prefix) in PARTS.items():
        if part in _TOWERS:
            tower = _TOWERS[part].from_pretrained(str(src / path), local_files_only=True, dtype="auto")
            yield from ((prefix + k, v) for k, v in tower.state_dict().items())
            del tower
            continue
        for f in files[part]:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    yield prefix + key, handle.get_tensor(key)


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
            loaded = model.load_weights(iter_model_weights(src))
            missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
            if missing:
                shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
                raise CheckpointError(f"{src}: no weights for {len(missing)} parameter(s) of the "
                                      f"vLLM model: {shown}")

    return SphinxXModelLoader
