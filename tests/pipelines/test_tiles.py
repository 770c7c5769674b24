"""`sphinx-x tiles`: --json fields, the human summary, --png, and bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipelines.cli import main


@pytest.fixture
def wide(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (1000, 500), (200, 30, 30)).save(path)
    return path


def test_json_fields(wide, capsys):
    assert main(["tiles", str(wide), "--flavour", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == [2, 2] and info["tile_size"] == 224 and info["canvas"] == 448
    assert info["kept"] == [[0, 0], [0, 1]] and info["skipped"] == [[1, 0], [1, 1]]
    assert info["image_tokens"] == 779  # the paper's 2:1 example
    assert info["original_size"] == [1000, 500] and info["scaled_size"] == [448, 224]
    assert info["tokens_per_view"] == 257 and info["tokens_saved"] == 2 * 258 and info["views"] == 3


def test_grid_three_and_summary(wide, capsys):
    assert main(["tiles", str(wide), "--flavour", "plus-3x3"]) == 0
    out = capsys.readouterr().out
    assert "grid 3x3" in out and "kept 6:" in out and "skipped 3:" in out
    assert main(["tiles", str(wide), "--flavour", "plus-3x3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["skipped"] == [[2, 0], [2, 1], [2, 2]] and info["image_tokens"] == 7 * 259 + 3


def test_png(wide, tmp_path, capsys):
    out = tmp_path / "sub" / "tiles.png"
    assert main(["tiles", str(wide), "--flavour", "debug", "--json", "--png", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["png"] == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height > 200
        # the skipped bottom-left tile is greyed: darker than white, not the image's red
        r, g, b = im.convert("RGB").getpixel((40, im.height - 60))
        assert r < 200 and abs(r - g) < 40


def test_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["tiles", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt_image" in err and "bad.jpg" in err
    assert main(["tiles", str(tmp_path / "missing.png")]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert main(["tiles", str(bad), "--flavour", "nope"]) == 1
    assert "unknown flavour" in capsys.readouterr().err
