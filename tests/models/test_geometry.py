"""models.geometry: every flavour's figures, each with where it comes from."""

import re
from dataclasses import replace

import pytest

from models.flavours import FLAVOURS, from_name
from models.geometry import describe, to_json
from models.tiling import TileSpec, image_token_count

_SOURCE = re.compile(r"^(release: accessory/model/LLM/[a-z0-9_]+\.py:\d+[-, 0-9]* \(.+\)|paper|project|override)")


@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_every_figure_has_a_source_and_matches_the_tiling_rule(name):
    f = FLAVOURS[name]
    g = describe(f)
    figures = [g["canvas"], g["tile_size"], g["tokens_per_view"], g["tokens_per_image"], *g["encoders"].values()]
    assert all(_SOURCE.match(fig.source) for fig in figures), [fig.source for fig in figures]
    spec = TileSpec.from_flavour(f)
    assert g["canvas"].value == spec.canvas and g["tile_size"].value == f.tile_size
    # a square image keeps every tile: the most one image takes, as models.tiling counts it
    assert g["tokens_per_image"].value == image_token_count(spec.canvas, spec.canvas, spec, f.tokens_per_view)
    assert to_json(g)["encoders"]["dino"] == {"value": f.dino_input, "source": g["encoders"]["dino"].source}


def test_release_figures_cite_the_release_code():
    g = describe(FLAVOURS["sphinx-tiny"])
    assert (g["canvas"].value, g["tile_size"].value, g["tokens_per_image"].value) == (512, 512, 259)
    assert g["canvas"].source == "release: accessory/model/LLM/llama_ens_light.py:311 (image_size = 512)"
    g = describe(FLAVOURS["sphinx-tiny-1k"])
    assert (g["canvas"].value, g["encoders"]["convnext"].value, g["encoders"]["dino"].value) == (1024, 512, 224)
    assert g["tokens_per_image"].value == 5 * 259 and "llama_ens5_light.py:310" in g["tokens_per_image"].source


@pytest.mark.parametrize("name,canvas,tile,per_image", [
    ("sphinx", 224, 224, 291), ("sphinx-1k", 448, 224, 5 * 291), ("sphinx-v2-1k", 448, 224, 5 * 291),
    ("sphinx-moe", 512, 512, 291), ("sphinx-moe-1k", 1024, 512, 5 * 291)])
def test_four_branch_releases(name, canvas, tile, per_image):
    """The issue's figures as the release code has them: 32 queries + 257 + start/end = 291 per view at every
    size; 1455 per image for the 1k members, whose canvas is 448 (SPHINX-1k, -v2-1k) or 1024 (MoE-1k)."""
    g = describe(FLAVOURS[name])
    assert (g["canvas"].value, g["tile_size"].value, g["tokens_per_view"].value) == (canvas, tile, 291)
    assert g["tokens_per_image"].value == per_image
    assert {k: f.value for k, f in g["encoders"].items()} == {
        "convnext": 256 if tile == 224 else 512, "dino": 224, "clip": 224, "qformer": 224}
    assert all(f.source.startswith(f"release: accessory/model/LLM/{FLAVOURS[name].release}.py:")
               for f in g["encoders"].values())


def test_paper_flavours_say_which_numbers_are_the_projects():
    g = describe(FLAVOURS["plus"])
    assert g["canvas"].value == 448 and g["canvas"].source.startswith("paper")
    assert g["tile_size"].source.startswith("project")  # the paper fixes encoder inputs, not the tile side
    g = describe(FLAVOURS["plus-3x3"])
    assert g["canvas"].value == 672 and g["canvas"].source.startswith("project: 3x3")


def test_overrides_are_marked():
    g = describe(from_name("tiny", grid=3))
    assert g["canvas"].source == "override: grid differ from the registered 'tiny'"
    assert g["tile_size"].source.startswith("project")  # untouched figures keep their source
    g = describe(replace(FLAVOURS["tiny"], name="mine"))
    assert g["canvas"].source.startswith("override: every field (no registered flavour 'mine')")


def test_retired_name_is_a_clear_error():
    with pytest.raises(KeyError, match="now 'plus-3x3'.*672 px, never 2k"):
        from_name("plus-2k")
