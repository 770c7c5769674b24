"""A small, learnable shard set for training tests and benchmarks, written the way preprocess
writes it (the shards, ``tokenizer/`` and an ``actors.data.manifest.Manifest`` with the tiling and
tokenizer facts training checks), at the spec's run layout.

Image rows: a solid-colour image (square, or 2:1 wide so two tiles are skipped) and the
question "colour?" → the colour's name. Text rows: "say WORD" → WORD. Both are learnable in a
few dozen steps by the `debug` flavours; the colour must be read from the views.

``build_rows`` gives the rows as training reads them (``views``: raw bytes, cut by
``actors.train.data``); ``build_rows(stored=True)`` and ``write_shards`` give them as the shards
hold them (``images`` + ``plans``, ``models.stored_image``).
"""

from __future__ import annotations

import io
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from actors.data.manifest import (Counts, ImageBytes, Manifest, SourceCounts, Tiling, TokenizerFacts, Tokens,
                                  shard_schema)
from models.conversation import tokenize_conversation, train_bpe_tokenizer
from models.flavours import from_name
from models.stored_image import row_views, store
from models.tiling import TileSpec, image_token_count, tokens_saved

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "piano", "maple"]

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
    import tempfile

    from cluster.layout import shard_name

    tokenizer, rows = build_rows(flavour_name, n_rows, seed, stored=shard_format == 2)
    flavour = from_name(flavour_name)
    schema = shard_schema(shard_format)
    names = []
    for k in range(0, len(rows), rows_per_shard):
        table = pa.Table.from_pylist(rows[k:k + rows_per_shard], schema=schema)
        shard = layout.shard(k // rows_per_shard)
        fs, path = storage.resolve(shard)
        fs.create_dir(shard.parent.fs_path, recursive=True)
        pq.write_table(table, path, filesystem=fs)
        names.append(shard_name(k // rows_per_shard))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, layout.tokenizer)
    storage.write_bytes(layout.manifest, _manifest(flavour, tokenizer, rows, names, shard_format).to_json().encode())
    return rows


def _manifest(flavour, tokenizer, rows: list[dict], shards: list[str], shard_format: int) -> Manifest:
    """Every row read and written once; per source (``colour``, ``say``) the same, with its tokens."""
    def total(rs: list[dict], key: str) -> int:
        return sum(int(r[key]) for r in rs)

    sources = {}
    for name in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == name]
        sources[name] = SourceCounts(
            **asdict(Counts.all_written(len(mine))), text_tokens=total(mine, "text_tokens"),
            image_tokens=total(mine, "image_tokens"), saved_tokens=total(mine, "saved_tokens"),
            source_bytes=0, stored_bytes=0, ratio=1.0, dedup="samples")
    return Manifest(
        flavour=flavour.name, shard_format=shard_format, shards=tuple(shards), error_shards=(),
        tiling=Tiling.from_flavour(flavour), tokenizer=TokenizerFacts.of(tokenizer), max_seq_len=flavour.max_seq_len,
        overflow="truncate", max_image_pixels=64_000_000, counts=Counts.all_written(len(rows)), rows_reused=0,
        tokens=Tokens(text=total(rows, "text_tokens"), image=total(rows, "image_tokens"),
                      saved=total(rows, "saved_tokens")),
        image_bytes=ImageBytes(source=0, stored=0, codec="webp"), sources=sources,
        code_version="synthetic", seconds=0.0)
