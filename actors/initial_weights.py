"""Training init from published weights (``model.weights``): what a training worker reads first.

A weights directory is either

- a sphinx-x model directory (``config.json`` + ``mm_projector.safetensors``: models.checkpoint),
  whose flavour settings and tokenizer (``llm/``) are its own; or
- published components, any of: ``llm/`` (an HF Llama / Mixtral / InternLM2 directory, read by
  models.pretrained_llm with its own tokenizer), ``convnext/`` or ``convnext.<ext>`` (open_clip /
  timm / HF ConvNeXt), ``dinov2/`` or ``dinov2.<ext>`` (HF or torch.hub DINOv2), read by
  models.pretrained_vision.

The sources carry settings the flavour must take before the model is built (vocab size, rope
theta, norm eps ...), so the order is: read → ``flavour`` with their overrides → build → load::

    >>> init = read_initial_weights(Path("weights/"), flavour)
    >>> model = SphinxX.from_flavour(init.flavour, init.tokenizer or shards_tokenizer)
    >>> init.load_into(model)        # strict per part; projector and start/end/skip stay as built
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from models.errors import UserError
from models.flavours import Flavour

ENCODER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class InitialWeights:
    flavour: Flavour  # the spec's flavour with the sources' settings applied
    tokenizer: Any  # the weights' own tokenizer (None: components without llm/)
    parts: dict[str, Any] = field(default_factory=dict)  # "llm" | "convnext" | "dino" -> loader objects
    model_dir: Optional[Path] = None  # a whole sphinx-x model directory instead of parts
    source: str = ""

    def load_into(self, model) -> list[str]:
        """Load every part into ``model`` (built from ``self.flavour``); returns the parts loaded."""
        if self.model_dir is not None:
            from models.checkpoint import import_weights_dir

            return import_weights_dir(model, self.model_dir)
        towers = {"llm": model.llm, "convnext": model.vision.convnext, "dino": model.vision.dino}
        for name, weights in self.parts.items():
            weights.load_into(towers[name])
        return sorted(self.parts)


def _encoder_source(src: Path, stem: str) -> Optional[Path]:
    if (src / stem).is_dir():
        return src / stem
    return next((src / f"{stem}{s}" for s in ENCODER_SUFFIXES if (src / f"{stem}{s}").is_file()), None)


def read_initial_weights(src: Path, flavour: Flavour) -> InitialWeights:
    """Read a weights directory (module docstring) for ``flavour``; a UserError names what is wrong."""
    from models.checkpoint import read_config
    from models.pretrained_llm import load_pretrained_llm
    from models.pretrained_vision import load_convnext_weights, load_dino_weights, with_encoder_overrides

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"model.weights: {src} is not a directory")
    if (src / "config.json").is_file() and (src / "mm_projector.safetensors").is_file():
        from models.pretrained_llm import load_llm_tokenizer

        saved = read_config(src)["flavour"]  # a Flavour
        own = {k: getattr(saved, k) for k in ("llm", "convnext", "dino")}
        return InitialWeights(flavour=replace(flavour, **own), tokenizer=load_llm_tokenizer(src / "llm"),
                              model_dir=src, source=str(src))
    parts: dict[str, Any] = {}
    tokenizer = None
    if (src / "llm").is_dir():
        llm = load_pretrained_llm(src / "llm", flavour)
        flavour = llm.apply_to(flavour)
        parts["llm"], tokenizer = llm, llm.tokenizer
    encoders = []
    conv = _encoder_source(src, "convnext")
    if conv is not None:
        parts["convnext"] = load_convnext_weights(conv, flavour)
        encoders.append(parts["convnext"])
    dino = _encoder_source(src, "dinov2")
    if dino is not None:
        parts["dino"] = load_dino_weights(dino, flavour)
        encoders.append(parts["dino"])
    if not parts:
        raise UserError(f"model.weights: {src} holds none of llm/, convnext[/|.safetensors|.bin|.pt|.pth], "
                        "dinov2[/|...] nor a sphinx-x model directory (config.json + mm_projector.safetensors)")
    return InitialWeights(flavour=with_encoder_overrides(flavour, *encoders), tokenizer=tokenizer, parts=parts,
                          source=str(src))


def check_tokenizer(weights_tokenizer, shards_tokenizer, source: str) -> None:
    """The shards must have been tokenized with the weights' tokenizer (preprocess does so)."""
    if weights_tokenizer is None:
        return
    probe = " Human: What colour is the square?\n### Assistant: red <image>"
    if len(weights_tokenizer) != len(shards_tokenizer) or weights_tokenizer.encode(probe) != shards_tokenizer.encode(probe):
        raise UserError(f"the shards were tokenized with another tokenizer than the weights' ({source}/llm: "
                        f"{len(weights_tokenizer)} tokens, shards: {len(shards_tokenizer)}); rerun "
                        "`sphinx-x preprocess SPEC --force` with model.weights set")
