"""`sphinx-x info`: parameter counts on the meta device and the token budget."""

import json

import pytest

from pipelines.cli import main


def _info(capsys, flavour):
    assert main(["info", "--flavour", flavour, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_fields_plus(capsys):
    out = _info(capsys, "plus")
    p = out["params"]
    assert p["llm"] / 1e9 == pytest.approx(13.016, rel=0.01)
    assert p["vision"] == p["vision_encoders"]["convnext"] + p["vision_encoders"]["dino"]
    assert p["vision"] / 1e9 == pytest.approx(0.84 + 1.14, rel=0.02)
    assert p["projector"] == (4608 * 5120 + 5120) + 2 * 5120 + 3 * 5120  # Linear, LayerNorm, start/end/skip
    assert p["total"] == p["llm"] + p["vision"] + p["projector"]
    assert p["trainable"] == p["llm"] + p["projector"]  # encoders frozen
    t = out["tokens"]
    assert t["tokens_per_view"] == 257 and t["grid"] == [2, 2] and t["max_image_tokens"] == 1295
    wide = next(e for e in t["examples"] if e["aspect"] == "2:1")
    assert wide["image_tokens"] == 779 and wide["tokens_saved"] == 516 and wide["skipped"] == 2


def test_json_moe_and_high_resolution(capsys):
    assert _info(capsys, "moe")["params"]["llm"] / 1e9 == pytest.approx(46.703, rel=0.01)
    t = _info(capsys, "plus-3x3")["tokens"]
    assert t["grid"] == [3, 3] and t["max_image_tokens"] == 10 * 259 and t["canvas"] == 672


def test_retired_name_says_what_replaced_it(capsys):
    assert main(["info", "--flavour", "plus-2k"]) == 1
    err = capsys.readouterr().err
    assert "now 'plus-3x3'" in err and "672" in err and err.count("\n") == 1


def test_geometry_with_sources(capsys):
    g = _info(capsys, "sphinx-tiny-1k")["geometry"]
    assert g["canvas"]["value"] == 1024 and g["canvas"]["source"].startswith("release: accessory/model/LLM/")
    assert g["encoders"]["dino"]["value"] == 224 and g["tokens_per_image"]["value"] == 1295
    g = _info(capsys, "tiny")["geometry"]
    assert g["tile_size"]["source"].startswith("project: ") and g["encoders"]["convnext"]["source"].startswith("paper")
    assert main(["info", "--flavour", "sphinx-tiny"]) == 0
    text = capsys.readouterr().out
    assert "geometry (value, then where it comes from):" in text
    assert "per image         259 tokens  release: accessory/model/LLM/llama_ens_light.py:310" in text


def test_human_output_and_unknown_flavour(capsys):
    assert main(["info", "--flavour", "debug"]) == 0
    text = capsys.readouterr().out
    assert "flavour debug" in text and "max per image (square): 95 tokens" in text
    assert main(["info", "--flavour", "nope"]) == 1
    assert "unknown flavour 'nope'" in capsys.readouterr().err
