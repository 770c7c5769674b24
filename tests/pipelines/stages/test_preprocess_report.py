"""pipelines.stages.preprocess_report: the printed summary and the quarantine error read the
stage's summary (the manifest's keys plus ``errors_uri`` / ``skipped``), with no Ray."""

from __future__ import annotations

from dataclasses import asdict, replace

from actors.data.manifest import Counts, ImageBytes, Manifest, SourceCounts, Tiling, TokenizerFacts, Tokens
from models.flavours import from_name
from pipelines.stages.preprocess_report import QuarantineError, format_summary


def _summary(**counts) -> dict:
    c = replace(Counts.all_written(10), **counts)
    source = SourceCounts(**asdict(c), text_tokens=30, image_tokens=70, saved_tokens=5, source_bytes=2_000_000,
                          stored_bytes=1_000_000, ratio=2.0, dedup="samples")
    m = Manifest(flavour="debug", shard_format=2, shards=("part-00000.parquet",),
                 error_shards=("errors/part-00000.parquet",), tiling=Tiling.from_flavour(from_name("debug")),
                 tokenizer=TokenizerFacts(path="tokenizer", vocab_size=400, image_token_id=4), max_seq_len=512,
                 overflow="truncate", max_image_pixels=1_000_000, counts=c, rows_reused=3,
                 tokens=Tokens(text=30, image=70, saved=5), image_bytes=ImageBytes(2_000_000, 1_000_000, "webp"),
                 sources={"vqa": source}, code_version="x", seconds=2.5)
    return {**m.to_dict(), "errors_uri": "s3://b/shards/errors"}


def test_the_summary_names_counts_images_and_sources():
    text = format_summary(_summary(rows_written=8, rows_quarantined=2, duplicate_samples=1,
                                   quarantined_by_reason={"too_long": 2}))
    assert "preprocess: debug (grid 2, tile 48) in 2.5s" in text
    assert "written 8  quarantined 2" in text and "too_long" in text
    assert "tokens 100 (text 30, image 70)" in text and "0.50x their 2.0 MB" in text
    assert "duplicates dropped: 1 samples, 0 by image" in text and "resumed: 3 of 10" in text
    assert "-> s3://b/shards/errors" in text and "vqa" in text
    assert "already complete (10 rows in 1 shards)" in format_summary({**_summary(), "skipped": True})


def test_the_quarantine_error_names_share_reasons_and_where():
    err = QuarantineError(_summary(rows_written=7, rows_quarantined=3, quarantined_by_reason={"corrupt_image": 3}),
                          0.1)
    assert "3 of 10 rows (30.0%) were quarantined" in str(err) and "corrupt_image=3" in str(err)
    assert "see s3://b/shards/errors" in str(err)


def test_the_summary_shows_each_sources_weight_epochs_layout_and_prompt():
    data = _summary()
    data["sources"]["vqa"].update(layout="vqa", prompt="short_answer", prompt_templates=["{question}"], weight=1.5,
                                  epochs=3.0)
    data["mixture_temperature"] = 2.0
    text = format_summary(data)
    assert "mixture temperature 2" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("vqa"))
    assert line.split()[-8:] == ["2", "1.5", "3", "vqa", "/", "short_answer", "(1", "templates)"]
