"""Training init from published weights (``model.weights``): what a training worker reads first.

A weights directory is either

- a sphinx-x model directory (``config.json`` + ``mm_projector.safetensors``: models.weights.model_dir),
  whose flavour settings and tokenizer (``llm/``) are its own; or
- published components, any of: ``llm/`` (an HF Llama / Mixtral / InternLM2 directory, read by
  models.weights.hf_llm with its own tokenizer), ``convnext/`` or ``convnext.<ext>`` (open_clip /
  timm / HF ConvNeXt), ``dinov2/`` or ``dinov2.<ext>`` (HF or torch.hub DINOv2), read by
  models.weights.encoders.

The sources carry settings the flavour must take before the model is built (vocab size, rope
theta, norm eps ...), so the order is: read → ``flavour`` with their overrides → build → load::

    >>> init = read_initial_weights(Path("weights/"), flavour)
    >>> model = SphinxX.from_flavour(init.flavour, init.tokenizer or shards_tokenizer)
    >>> init.load_into(model)        # strict per part; projector and start/end/skip stay as built

Nothing is read before ``load_into``: every part is {name: models.weights.stream.Recipe}, shapes
checked from the file headers, and loading reads one tensor at a time. ``recipes()`` is the same
under SphinxX names, which is what a ZeRO-3 model takes parameter by parameter
(actors.train.consolidate.scatter_recipes): no rank ever holds the weights as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from models.errors import UserError
from models.flavours import Flavour
from models.weights.stream import Recipe, load_recipes

# where each part's names go in SphinxX (models.weights.model_dir.PARTS)
PREFIXES = {"llm": "llm.", "convnext": "vision.convnext.", "dino": "vision.dino.", "projector": "vision."}

ENCODER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class InitialWeights:
    flavour: Flavour  # the spec's flavour with the sources' settings applied
    tokenizer: Any  # the weights' own tokenizer (None: components without llm/)
    # "llm" | "convnext" | "dino" -> {name in that tower: Recipe} (+ "projector" for a model directory)
    parts: dict[str, dict[str, Recipe]] = field(default_factory=dict)
    model_dir: Optional[Path] = None  # when the parts are a whole sphinx-x model directory
    source: str = ""

    def recipes(self) -> dict[str, Recipe]:
        """Every weight under its SphinxX name."""
        return {PREFIXES[part] + name: r for part, state in self.parts.items() for name, r in state.items()}

    def strict_prefixes(self) -> tuple[str, ...]:
        """The parts of the model whose every weight must come from here: the whole model for a
        model directory, else the towers given (the projector and start/end/skip stay as built)."""
        return ("",) if self.model_dir is not None else tuple(PREFIXES[p] for p in self.parts)

    def load_into(self, model) -> list[str]:
        """Load every part into ``model`` (built from ``self.flavour``), one tensor at a time;
        returns the parts loaded."""
        if self.model_dir is not None:
            load_recipes(model, self.recipes(), what=f"model directory {self.model_dir}")
        else:
            towers = {"llm": model.llm, "convnext": model.vision.convnext, "dino": model.vision.dino}
            for part, state in self.parts.items():
                load_recipes(towers[part], state, what=f"{part} weights {self.source}")
        return sorted(self.parts)


def _encoder_source(src: Path, stem: str) -> Optional[Path]:
    if (src / stem).is_dir():
        return src / stem
    return next((src / f"{stem}{s}" for s in ENCODER_SUFFIXES if (src / f"{stem}{s}").is_file()), None)


def read_initial_weights(src: Path, flavour: Flavour) -> InitialWeights:
    """Read a weights directory (module docstring) for ``flavour``; a UserError names what is wrong."""
    from models.weights.encoders import load_convnext_weights, load_dino_weights, with_encoder_overrides
    from models.weights.hf_llm import load_pretrained_llm

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"model.weights: {src} is not a directory")
    if (src / "config.json").is_file() and (src / "mm_projector.safetensors").is_file():
        return _model_dir(src, flavour)
    parts: dict[str, dict[str, Recipe]] = {}
    tokenizer = None
    if (src / "llm").is_dir():
        llm = load_pretrained_llm(src / "llm", flavour)
        flavour = llm.apply_to(flavour)
        parts["llm"], tokenizer = llm.state, llm.tokenizer
    encoders = []
    conv = _encoder_source(src, "convnext")
    if conv is not None:
        encoders.append(load_convnext_weights(conv, flavour))
        parts["convnext"] = encoders[-1].state
    dino = _encoder_source(src, "dinov2")
    if dino is not None:
        encoders.append(load_dino_weights(dino, flavour))
        parts["dino"] = encoders[-1].state
    if not parts:
        raise UserError(f"model.weights: {src} holds none of llm/, convnext[/|.safetensors|.bin|.pt|.pth], "
                        "dinov2[/|...] nor a sphinx-x model directory (config.json + mm_projector.safetensors)")
    return InitialWeights(flavour=with_encoder_overrides(flavour, *encoders), tokenizer=tokenizer, parts=parts,
                          source=str(src))


def _model_dir(src: Path, flavour: Flavour) -> InitialWeights:
    """A sphinx-x model directory: its own LLM / encoder settings and tokenizer, read by
    models.weights.model_dir.read_weights (the same read the vLLM loader streams)."""
    from models.weights.model_dir import read_weights

    weights = read_weights(src, flavour)
    parts = {"llm": weights.parts["llm"], "convnext": weights.parts["convnext"], "dino": weights.parts["dinov2"],
             "projector": weights.parts["mm_projector"]}
    return InitialWeights(flavour=weights.flavour, tokenizer=weights.tokenizer, parts=parts, model_dir=src,
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
