"""Which weights a serve member runs: a model directory (local or S3), the train export, or a
flavour with random weights.

    >>> directory, temporary = member_model_dir(MemberWeights(name="m", flavour="debug"), storage_section)

``MemberWeights.checkpoint_uri`` is resolved on the driver by ``cluster.layout`` (``@train`` is
the run's train export, which must hold ``_SUCCESS``; relative paths are under the storage root;
``s3://…`` and absolute paths as given). ``None`` builds ``flavour`` with seeded random weights
(identical on every replica) and, for the debug flavours, a BPE tokenizer trained on a fixed
built-in text.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cluster.location import Location
from models.errors import UserError

log = logging.getLogger(__name__)

RANDOM_SEED = 0

# a fixed text for the debug tokenizer of random-weight members (never a download)
_DEBUG_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "What is in the image? There is a red square, a blue circle and a green triangle.",
    "Describe the scene in one sentence. Count the shapes. Which colour is on the left?",
    "Hello! How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 [0.12, 0.34, 0.56, 0.78] yes no left right top bottom",
]


def debug_tokenizer(vocab_size: int):
    from models.conversation import train_bpe_tokenizer

    return train_bpe_tokenizer(_DEBUG_CORPUS * 4, vocab_size=vocab_size)


def random_member(flavour_name: str):
    """(model, tokenizer) of a flavour with seeded random weights."""
    import torch

    from models.conversation import load_tokenizer
    from models.flavours import from_name
    from models.sphinx import SphinxX

    flavour = from_name(flavour_name)
    tokenizer = (load_tokenizer(flavour.tokenizer) if flavour.tokenizer
                 else debug_tokenizer(int(flavour.llm["vocab_size"])))
    torch.manual_seed(RANDOM_SEED)
    return SphinxX.from_flavour(flavour, tokenizer), tokenizer


@dataclass(frozen=True)
class MemberWeights:
    """Where one serve member's weights come from (built by pipelines.stages.serve from the spec)."""

    name: str
    flavour: Optional[str] = None  # for random weights (checkpoint_uri None)
    checkpoint_uri: Optional[str] = None  # a model directory: s3://… or an absolute local path
    require_success: bool = False  # the train export: only once training wrote _SUCCESS


def member_model_dir(weights: MemberWeights, storage_section, cache_dir: str | None = None) -> tuple[Path, bool]:
    """(a local model directory for the member, whether it is a temporary copy to delete).

    Random weights are saved (models.weights.model_dir.save_model_dir) to a temp directory; an s3://
    directory is downloaded to one; a local directory is used in place."""
    from models.weights.model_dir import save_model_dir

    if weights.checkpoint_uri is None:
        model, tokenizer = random_member(weights.flavour)
        local = Path(tempfile.mkdtemp(prefix=f"sphinx-x-{weights.name}-", dir=cache_dir))
        save_model_dir(model, tokenizer, local)
        return local, True
    uri = weights.checkpoint_uri
    if not Location.parse(uri).is_s3:
        return _check_local(weights, uri), False
    return _download(weights, storage_section, cache_dir), True


def _check_local(weights: MemberWeights, uri: str) -> Path:
    """The local directory to load: ``uri``, or the complete sibling its ``_SUCCESS`` names while a
    new export replaces it (``cluster.publish``)."""
    from cluster.publish import MARKER, Marker, published_dir

    if not Path(uri).is_dir():
        raise UserError(f"serve model {weights.name!r}: checkpoint directory {uri} does not exist")
    marker_path = Path(uri, MARKER)
    if not marker_path.exists():
        if weights.require_success:
            raise UserError(f"serve model {weights.name!r}: no finished train export at {uri} "
                            "(run `sphinx-x train SPEC` first)")
        return Path(uri)
    marker = Marker.from_bytes(marker_path.read_bytes(), str(marker_path))
    return Path(published_dir(Location.parse(uri), marker).key)


def _download(weights: MemberWeights, storage_section, cache_dir: str | None) -> Path:
    """A local copy of one complete published version (``cluster.publish.fetch``: the marker is
    read before and after; a copy that straddles a new export is redone), or of the plain directory."""
    from cluster.publish import fetch
    from cluster.storage import open_storage

    uri = weights.checkpoint_uri
    storage = open_storage(storage_section)
    local = Path(tempfile.mkdtemp(prefix=f"sphinx-x-{weights.name}-", dir=cache_dir))
    try:
        fetch(storage, uri, local, require=weights.require_success,
              what=f"serve model {weights.name!r}: train export {uri} (run `sphinx-x train SPEC` first)")
    except FileNotFoundError as err:
        raise UserError(f"serve model {weights.name!r}: checkpoint {uri} not found ({err})") from None
    log.info("serve model %s: downloaded %s", weights.name, uri)
    return local
