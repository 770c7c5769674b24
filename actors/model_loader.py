"""Which weights a serve member runs: a model directory (local or S3), the train export, or a
flavour with random weights.

    >>> model, tokenizer = load_member({"name": "m", "flavour": "debug", "checkpoint": None},
    ...                                storage_section, train_output="train")   # random weights

``checkpoint``:
- ``"@train"`` → ``<storage>/<train.output>/export`` (must hold ``_SUCCESS``: training finished);
- ``s3://…`` or a path relative to the storage root → downloaded through cluster.storage;
- an absolute local path → loaded in place;
- ``null`` → ``flavour`` built with seeded random weights (identical on every replica) and, for
  the debug flavours, a BPE tokenizer trained on a fixed built-in text.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from models.errors import UserError

log = logging.getLogger(__name__)

TRAIN_EXPORT = "@train"
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


def resolve_checkpoint(checkpoint: str, storage_uri_for, train_output: str) -> str:
    """``"@train"`` → the train export URI; anything else unchanged."""
    if checkpoint == TRAIN_EXPORT:
        return storage_uri_for(train_output, "export")
    return checkpoint


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


def load_member(member: dict[str, Any], storage_section: dict[str, Any], train_output: str,
                cache_dir: str | None = None):
    """(model in eval mode, tokenizer) for one ``serve.models`` entry (as a dict)."""
    checkpoint = member.get("checkpoint")
    if checkpoint is None:
        model, tokenizer = random_member(member["flavour"])
        return model.eval(), tokenizer

    from cluster.spec import StorageSection
    from cluster.storage import open_storage
    from models.checkpoint import load_model_dir

    path = Path(checkpoint)
    if checkpoint != TRAIN_EXPORT and path.is_absolute() and "://" not in checkpoint:
        if not path.is_dir():
            raise UserError(f"serve model {member['name']!r}: checkpoint directory {checkpoint} does not exist")
        model, tokenizer = load_model_dir(path)
        return model.eval(), tokenizer
    storage = open_storage(StorageSection.model_validate(storage_section))
    uri = resolve_checkpoint(checkpoint, storage.uri_for, train_output)
    if checkpoint == TRAIN_EXPORT and not storage.exists(f"{uri.rstrip('/')}/_SUCCESS"):
        raise UserError(f"serve model {member['name']!r}: checkpoint '@train' but there is no finished "
                        f"train export at {uri} (run `sphinx-x train SPEC` first)")
    local = Path(tempfile.mkdtemp(prefix=f"sphinx-x-{member['name']}-", dir=cache_dir))
    try:
        storage.download_dir(uri, local)
    except FileNotFoundError as err:
        raise UserError(f"serve model {member['name']!r}: checkpoint {uri} not found ({err})") from None
    log.info("serve model %s: loading %s", member["name"], uri)
    model, tokenizer = load_model_dir(local)
    return model.eval(), tokenizer
