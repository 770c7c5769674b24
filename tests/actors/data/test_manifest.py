"""actors.data.manifest: the typed, versioned preprocess -> train contract round-trips, reads
today's unversioned files, and refuses newer versions and missing or ill-typed keys by name."""

from __future__ import annotations

import json

import pytest

from actors.data.manifest import (SHARD_FORMAT, SHARD_SCHEMA, VERSION, Counts, ImageBytes, Manifest,
                                  QuarantineGate, SourceCounts, Tiling, TokenizerFacts, Tokens, shard_schema)
from models.errors import UserError
from models.flavours import from_name

# the keys preprocess wrote before the class existed (version 1 without ``version``)
TODAYS_KEYS = {"rows_in", "rows_written", "rows_quarantined", "quarantined_by_reason", "rows_read", "subsampled_out",
               "duplicate_samples", "duplicate_images", "rows_reused", "rows_truncated", "tokens", "image_bytes",
               "sources", "shards", "shard_format", "error_shards", "flavour", "tiling", "max_seq_len", "overflow",
               "max_image_pixels", "tokenizer", "vocab_size", "image_token_id", "code_version", "seconds"}


def _manifest(gate: QuarantineGate | None = QuarantineGate(0.5, True)) -> Manifest:
    counts = Counts(rows_read=5, subsampled_out=1, duplicate_samples=1, duplicate_images=0, rows_in=3, rows_written=2,
                    rows_quarantined=1, rows_truncated=0, quarantined_by_reason={"missing_image": 1})
    source = SourceCounts(**vars(counts), text_tokens=40, image_tokens=57, saved_tokens=36, source_bytes=900,
                          stored_bytes=300, ratio=1.0, dedup="samples")
    return Manifest(flavour="debug", shard_format=SHARD_FORMAT, shards=("part-00000.parquet",),
                    error_shards=("errors/part-00000.parquet",), tiling=Tiling.from_flavour(from_name("debug")),
                    tokenizer=TokenizerFacts(path="tokenizer", vocab_size=400, image_token_id=4), max_seq_len=512,
                    overflow="truncate", max_image_pixels=64_000_000, counts=counts, rows_reused=0,
                    tokens=Tokens(text=40, image=57, saved=36), image_bytes=ImageBytes(source=900, stored=300,
                                                                                       codec="webp"),
                    sources={"vqa": source}, code_version="0.1+abc", seconds=1.5, quarantine_gate=gate)


def test_json_round_trip_keeps_todays_key_names():
    m = _manifest()
    data = json.loads(m.to_json())
    assert set(data) == TODAYS_KEYS | {"version", "quarantine_gate", "mixture_temperature"}
    assert data["version"] == VERSION == 3
    assert data["quarantine_gate"] == {"max_quarantine_fraction": 0.5, "passed": True}
    assert data["tokens"]["total"] == 97 and data["tiling"]["canvas"] == 96
    assert Manifest.from_json(m.to_json()) == m
    assert m.shard_schema == SHARD_SCHEMA


def test_release_resampling_round_trips():
    """A release flavour's tiling records its resampling; training compares it with the model's."""
    m = Manifest.from_json(_manifest().to_json())
    release = Tiling.from_flavour(from_name("sphinx-moe-1k"))
    assert release.to_dict()["resample"] == "release" and "resample" not in m.tiling.to_dict()
    data = json.loads(_manifest().to_json())
    data["tiling"] = release.to_dict()
    assert Manifest.from_json(json.dumps(data)).tiling == release


def test_todays_unversioned_file_loads_as_version_1():
    data = _manifest().to_dict()
    del data["version"], data["quarantine_gate"]
    m = Manifest.from_dict(data)
    assert m.version == 1 and m.counts.rows_written == 2 and m.tiling.tile.grid == 2
    assert m.quarantine_gate is None
    for version in (None, 1):  # version-1 files, with or without the key: no gate recorded
        one = {**data, **({"version": version} if version else {})}
        assert Manifest.from_dict(one).quarantine_gate is None


def test_the_quarantine_gate_is_recorded_and_decides():
    """1 of 3 rows quarantined: a gate that failed when written refuses whatever the limit now; a
    passed or unrecorded (version 1, synthetic) gate is judged by the counts under today's limit."""
    failed = Manifest.from_json(_manifest(QuarantineGate.check(_manifest().counts, 0.05)).to_json())
    assert failed.quarantine_gate == QuarantineGate(0.05, False)
    assert "1 of 3 rows were quarantined, over data.max_quarantine_fraction=0.05" in failed.gate_failure(0.9)
    passed = _manifest(QuarantineGate.check(_manifest().counts, 0.5))
    assert passed.quarantine_gate.passed and passed.gate_failure(0.5) is None
    assert "over data.max_quarantine_fraction=0.1" in passed.gate_failure(0.1)  # the limit was lowered since
    none = Manifest.from_json(_manifest(None).to_json())
    assert none.quarantine_gate is None and none.gate_failure(0.5) is None and none.gate_failure(0.2)
    data = _manifest().to_dict()
    del data["quarantine_gate"]
    with pytest.raises(UserError, match="key 'quarantine_gate' is missing"):
        Manifest.from_dict(data)
    with pytest.raises(UserError, match="key 'quarantine_gate.passed' is"):
        Manifest.from_dict({**data, "quarantine_gate": {"max_quarantine_fraction": 0.1, "passed": "yes"}})


def test_a_newer_version_or_shard_format_is_refused():
    with pytest.raises(UserError, match=f"version {VERSION + 1}, newer than this sphinx-x reads"):
        Manifest.from_dict({**_manifest().to_dict(), "version": VERSION + 1})
    with pytest.raises(UserError, match=f"format {SHARD_FORMAT + 1}, newer"):
        Manifest.from_dict({**_manifest().to_dict(), "shard_format": SHARD_FORMAT + 1}, where="s3://b/shards")


@pytest.mark.parametrize("path", ["vocab_size", "shards", "tiling.grid", "tokens.saved", "sources.vqa.rows_in",
                                  "image_bytes.codec", "seconds", "quarantine_gate.passed"])
def test_a_missing_key_is_named(path):
    data = _manifest().to_dict()
    *parents, key = path.split(".")
    inner = data
    for p in parents:
        inner = inner[p]
    del inner[key]
    with pytest.raises(UserError, match=rf"at s3://b/shards/_manifest.json: key '{path}' is missing"):
        Manifest.from_dict(data, where="s3://b/shards/_manifest.json")


@pytest.mark.parametrize("key, value", [("rows_in", "3"), ("rows_in", True), ("shards", "part-00000.parquet"),
                                        ("quarantined_by_reason", {"x": 1.5}), ("flavour", None), ("version", "1")])
def test_an_ill_typed_key_is_named(key, value):
    with pytest.raises(UserError, match=f"key '{key}' is"):
        Manifest.from_dict({**_manifest().to_dict(), key: value})


def test_bad_tiling_and_bad_json_are_user_errors():
    data = _manifest().to_dict()
    data["tiling"]["pad"] = "diagonal"
    with pytest.raises(UserError, match="tiling: pad must be one of"):
        Manifest.from_dict(data)
    with pytest.raises(UserError, match="not valid JSON"):
        Manifest.from_json(b"{", where="x")
    with pytest.raises(UserError, match="not a JSON object"):
        Manifest.from_json(b"[]")


def test_the_shard_schema_is_defined_once():
    from actors.data.tiler import OUT_SCHEMA, SHARD_COLUMNS

    assert SHARD_COLUMNS == SHARD_SCHEMA.names == [f.name for f in OUT_SCHEMA][:len(SHARD_SCHEMA)]
    old = shard_schema(1)
    assert "views" in old.names and not {"images", "plans"} & set(old.names)
    with pytest.raises(UserError):
        shard_schema(3)


def test_version_3_records_the_mix_and_version_2_reads_without_it():
    """Per source: layout, prompt kind and templates, weight and epochs; a version-2 file (no mix)
    reads as layout llava, no prompt, weight 1 and epochs = ratio."""
    from dataclasses import replace

    m = _manifest()
    src = replace(m.sources["vqa"], layout="vqa", prompt="short_answer", prompt_templates=("{question}\nA?",),
                  weight=2.0, epochs=3.5, ratio=1.5)
    mixed = replace(m, sources={"vqa": src}, mixture_temperature=2.0)
    data = json.loads(mixed.to_json())
    assert data["mixture_temperature"] == 2.0
    assert {k: data["sources"]["vqa"][k] for k in ("layout", "prompt", "prompt_templates", "weight", "epochs")} == \
        {"layout": "vqa", "prompt": "short_answer", "prompt_templates": ["{question}\nA?"], "weight": 2.0, "epochs": 3.5}
    assert Manifest.from_json(mixed.to_json()) == mixed
    v2 = json.loads(mixed.to_json())
    v2["version"] = 2
    del v2["mixture_temperature"]
    for key in ("layout", "prompt", "prompt_templates", "weight", "epochs"):
        del v2["sources"]["vqa"][key]
    old = Manifest.from_dict(v2).sources["vqa"]
    assert (old.layout, old.prompt, old.prompt_templates, old.weight, old.epochs) == ("llava", None, (), 1.0, 1.5)
    del data["sources"]["vqa"]["weight"]
    with pytest.raises(UserError, match="'sources.vqa.weight' is missing"):
        Manifest.from_dict(data)
