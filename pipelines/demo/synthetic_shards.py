"""A small, learnable shard set for training tests and benchmarks, written the way preprocess
writes it (the shards, ``tokenizer/`` and a ``_manifest.json`` with the tiling and tokenizer facts
training checks), at the spec's run layout.

Image rows: a solid-colour image (square, or 2:1 wide so two tiles are skipped) and the
question "colour?" → the colour's name. Text rows: "say WORD" → WORD. Both are learnable in a
few dozen steps by the `debug` flavours; the colour must be read from the views.

``build_rows`` gives the rows as training reads them (``views``: raw bytes, cut by
``actors.train.data``); ``build_rows(stored=True)`` and ``write_shards`` give them as the shards
hold them (``images`` + ``plans``, ``models.stored_image``).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from models.conversation import tokenize_conversation, train_bpe_tokenizer
from models.flavours import from_name
from models.stored_image import row_views, store
from models.tiling import TileSpec, image_token_count, tokens_saved

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "piano", "maple"]

SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())), ("num_tokens", pa.int32()), ("text_tokens", pa.int32()),
    ("image_tokens", pa.int32()), ("saved_tokens", pa.int32()), ("images", pa.list_(pa.binary())),
    ("plans", pa.list_(pa.int32())), ("view_counts", pa.list_(pa.int32())), ("kept", pa.list_(pa.bool_())), ("tile_size", pa.int32()),
    ("grid", pa.int32()),
])


def _conversations(n_rows: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n_rows):
        if i % 2 == 0:
            name = list(COLOURS)[rng.integers(len(COLOURS))]
            wide = bool(rng.integers(2))
            yield f"colour:{i}", "colour", name, wide, [
                {"from": "human", "value": "<image>\ncolour?"}, {"from": "gpt", "value": name}]
        else:
            word = WORDS[rng.integers(len(WORDS))]
            yield f"say:{i}", "say", None, False, [
                {"from": "human", "value": f"say {word}"}, {"from": "gpt", "value": word}]


def build_rows(flavour_name: str = "debug", n_rows: int = 48, seed: int = 0, wide_only: bool = False,
               stored: bool = False):
    """(tokenizer, rows as dicts: as training reads them, or with ``stored`` as the shards hold them)."""
    flavour = from_name(flavour_name)
    spec = TileSpec.from_flavour(flavour)
    n = flavour.tokens_per_view
    texts = ["colour? say " + " ".join(COLOURS) + " " + " ".join(WORDS) + " Human: Assistant: ###"] * 4
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    rows = []
    for rid, source, colour, wide, conv in _conversations(n_rows, seed):
        wide = wide or wide_only
        images, plans, counts, kept, image_tokens, saved = [], [], [], [], [], 0
        if colour is not None:
            size = (96, 48) if wide else (64, 64)
            buf = io.BytesIO()
            Image.new("RGB", size, COLOURS[colour]).save(buf, format="PNG")
            image = store(buf.getvalue(), spec)
            images, plans, counts, kept = [image.data], image.plan, [image.n_views], image.kept.tolist()
            image_tokens = [image_token_count(size[0], size[1], spec, n)]
            saved = tokens_saved(image.kept, n)
        tok = tokenize_conversation(conv, tokenizer, image_tokens=image_tokens, max_seq_len=flavour.max_seq_len)
        rows.append({
            "id": rid, "source": source, "input_ids": tok.input_ids, "labels": tok.labels,
            "num_tokens": len(tok.input_ids), "text_tokens": len(tok.input_ids) - sum(image_tokens),
            "image_tokens": sum(image_tokens), "saved_tokens": saved, "view_counts": counts,
            "kept": kept, "tile_size": spec.tile_size, "grid": spec.grid,
            **({"images": images, "plans": plans} if stored else {"views": row_views(images, plans, kept, spec)}),
        })
    return tokenizer, rows


def write_shards(storage, layout, flavour_name: str = "debug", n_rows: int = 48, seed: int = 0,
                 rows_per_shard: int = 16, shard_format: int = 2) -> list[dict]:
    """Write ``part-XXXXX.parquet``, ``tokenizer/`` and ``_manifest.json`` at ``layout.shards``
    (``shard_format`` 2: stored images, as preprocess writes; 1: raw views, as it wrote before)."""
    import json
    import tempfile

    from cluster.layout import shard_name
    from models.conversation import image_token_id
    from pipelines.stages.preprocess import tiling_facts

    tokenizer, rows = build_rows(flavour_name, n_rows, seed, stored=shard_format == 2)
    flavour = from_name(flavour_name)
    schema = SCHEMA if shard_format == 2 else pa.schema(
        [f for f in SCHEMA if f.name not in ("images", "plans")] + [("views", pa.binary())])
    names = []
    for k in range(0, len(rows), rows_per_shard):
        table = pa.Table.from_pylist(rows[k:k + rows_per_shard], schema=schema)
        fs, path = storage.resolve(layout.shard(k // rows_per_shard))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
        names.append(shard_name(k // rows_per_shard))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, layout.tokenizer)
    manifest = {"rows_in": len(rows), "rows_written": len(rows), "rows_quarantined": 0, "shards": names,
                "shard_format": shard_format,
                "flavour": flavour.name, "tiling": tiling_facts(flavour), "max_seq_len": flavour.max_seq_len,
                "tokenizer": "tokenizer", "vocab_size": len(tokenizer), "image_token_id": image_token_id(tokenizer)}
    storage.write_bytes(layout.manifest, json.dumps(manifest).encode())
    return rows
