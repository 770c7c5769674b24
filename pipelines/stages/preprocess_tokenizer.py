"""Preprocess, driver side: the tokenizer the shards are tokenized with, saved to ``tokenizer/``.

``model.weights`` set: the weights' own tokenizer (``models.weights.hf_llm``); else
``model.tokenizer`` (or the flavour's); else a debug BPE tokenizer trained on the sources' text
(at most ``_TOKENIZER_TEXT_ROWS`` turns, read on the driver with the graph's parsers). From S3
only the tokenizer files are downloaded, never the weights beside them.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections import defaultdict

import pyarrow.parquet as pq

from actors.data import rows as raw
from actors.data.layouts import load_side
from actors.data.regions import text_of
from cluster import layout as run_layout
from cluster.layout import Layout
from cluster.location import Location
from cluster.spec import ClusterSpec
from cluster.storage import Storage, confined_path
from models.errors import UserError
from models.flavours import Flavour
from pipelines.stages.preprocess_sources import Source

_TOKENIZER_TEXT_ROWS = 200_000  # rows of text the debug BPE tokenizer is trained on (at most)


def prepare_tokenizer(spec: ClusterSpec, flavour: Flavour, storage: Storage, lay: Layout,
                      sources: list[Source]):
    """Load ``model.tokenizer`` (or the flavour's), or train the debug BPE on the sources' text."""
    from models.conversation import load_tokenizer, train_bpe_tokenizer

    vocab = int(flavour.llm["vocab_size"])
    path = spec.model.tokenizer or flavour.tokenizer
    if spec.model.weights:
        # published weights bring their own tokenizer (<image> and pad added); the vocab follows it
        from models.weights.hf_llm import load_llm_tokenizer

        uri = lay.path(path) if spec.model.tokenizer else run_layout.join(lay.path(spec.model.weights), "llm")
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_llm_tokenizer(_tokenizer_files(storage, uri, tmp))
    elif path:
        uri = lay.path(path)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_tokenizer(_tokenizer_files(storage, uri, tmp))
    else:
        tokenizer = train_bpe_tokenizer(_source_texts(sources), vocab)
    if not spec.model.weights and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but flavour {flavour.name!r} has "
                        f"vocab_size {vocab}; set model.overrides.llm.vocab_size >= {len(tokenizer)}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, lay.tokenizer)
    return tokenizer


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".msgpack", ".h5", ".gguf")


def _tokenizer_files(storage: Storage, uri: str, tmp: str) -> str:
    """A local directory holding the tokenizer files at ``uri`` (an S3 prefix: only those files are
    downloaded, never the weights beside them)."""
    if not Location.parse(uri).is_s3:
        if not os.path.isdir(uri):
            raise UserError(f"no tokenizer directory at {uri}")
        return uri
    names = [u for u in storage.list(uri) if not u.endswith(_WEIGHT_SUFFIXES)]
    if not names:
        raise UserError(f"no tokenizer files under {uri}")
    # every target checked before anything is written: a key with `..` refuses the download
    targets = [confined_path(tmp, u[len(uri):], u) for u in names]
    for u, target in zip(names, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(storage.read_bytes(u))
    return tmp


def _source_texts(sources: list[Source]) -> list[str]:
    """First pass for the debug tokenizer: the turns' text of the good records, in source order.

    Runs on the driver (debug flavours are for small data): the same parsers as the graph,
    reading only the text (Parquet ``conversations`` column, tar members without images).
    """
    texts: list[str] = []
    for src in sources:
        name, ratio = src.spec.name, src.spec.ratio
        for path in src.files:
            if src.format == "parquet":
                columns = ["conversations"] if src.reading.layout == "llava" else None  # a layout's own names
                table = pq.read_table(path, filesystem=src.filesystem, columns=columns)
                rows = [row for i, r in enumerate(table.to_pylist())
                        for row in raw.parquet_rows(r, i, source=name, ratio=ratio, reading=src.reading)]
            elif src.format == "webdataset":
                with src.filesystem.open_input_file(path) as f, tarfile.open(fileobj=f) as tar:
                    samples: dict[str, dict] = defaultdict(dict)
                    for m in tar:
                        key, _, ext = m.name.partition(".")
                        if m.isfile() and ext in ("json", "txt"):
                            samples[key][ext] = tar.extractfile(m).read()
                rows = [raw.wds_row({"__key__": k, **v}, source=name, ratio=ratio) for k, v in samples.items()]
            else:
                with src.filesystem.open_input_file(path) as f:
                    rows = raw.parse_json_file(f.read(), path, source=name, ratio=ratio, image_root=None,
                                               fmt=src.format, reading=src.reading,
                                               side=load_side(src.side_filesystem, src.reading))
            for r in rows:
                if r["reason"] is None:
                    texts += [text_of(t["value"]).replace(raw.IMAGE_PLACEHOLDER, " ")
                              for t in json.loads(r["conversations"])]
            if len(texts) >= _TOKENIZER_TEXT_ROWS:
                return texts
    return texts or ["(no text)"]
