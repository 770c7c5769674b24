"""The tokenizer as the preprocess actors get it: the Rust ``tokenizers.Tokenizer`` alone.

A tiler actor only encodes text and looks up a few special ids (``models.conversation``:
``tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]``,
``convert_tokens_to_ids``, ``bos/eos/unk_token_id``). Unpickling transformers'
``PreTrainedTokenizerFast`` imports transformers in every actor (~0.8 s of CPU each, before the
first shard); this class answers the same calls from the same Rust tokenizer, so an actor
imports only ``tokenizers``.

It is exact by construction: transformers' fast encode is ``encode_batch([text],
add_special_tokens=...)`` on that very Rust object, with ``encode_special_tokens`` set from
``split_special_tokens`` and no truncation or padding. :func:`for_workers` checks that the HF
class encodes through that path (no Python override of ``_encode_plus`` or ``tokenize`` in its
classes) and otherwise returns the HF tokenizer unchanged.

    >>> light = for_workers(hf_tokenizer)
    >>> light("a cat", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    [112, 97]                       # == hf_tokenizer(...)["input_ids"]
"""

from __future__ import annotations

import copy
from typing import Any, Optional


class LightTokenizer:
    """Encode-only stand-in for a fast HF tokenizer (see the module doc)."""

    def __init__(self, backend: Any, *, bos_token_id: Optional[int], eos_token_id: Optional[int],
                 unk_token_id: Optional[int]):
        self.backend = backend
        self.backend.no_truncation()
        self.backend.no_padding()
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id

    def __call__(self, text: str, *, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        self.backend.encode_special_tokens = split_special_tokens
        return {"input_ids": self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids}

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        tid = self.backend.token_to_id(token)
        return self.unk_token_id if tid is None else tid

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def for_workers(tokenizer: Any) -> Any:
    """A :class:`LightTokenizer` over ``tokenizer``'s Rust backend, or ``tokenizer`` itself when
    its class encodes in Python (then the actors import transformers as before)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not _encodes_in_rust(type(tokenizer)):
        return tokenizer
    return LightTokenizer(copy.deepcopy(backend), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, unk_token_id=tokenizer.unk_token_id)


def _encodes_in_rust(cls: type) -> bool:
    """True when ``cls`` inherits transformers' fast encode path unchanged."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not issubclass(cls, TokenizersBackend):
        return False
    return all(getattr(cls, name) is getattr(TokenizersBackend, name)
               for name in ("__call__", "_encode_plus", "tokenize", "encode", "convert_tokens_to_ids"))
