"""`sphinx-x convert --from accessory` and `sphinx-x info --weights`: what was found, and clear failures."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipelines.cli import main



def _reference():
    """The toy release of tests/models (a helper module there, not a test)."""
    if "accessory_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "accessory_reference", Path(__file__).resolve().parents[1] / "models" / "accessory_reference.py")
        sys.modules["accessory_reference"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["accessory_reference"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return _reference().make_toy_release(tmp_path_factory.mktemp("release") / "SPHINX-Tiny-1k")


def test_convert_then_info(release, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["convert", "--from", "accessory", str(release.directory), "-o", str(out),
                 "--flavour", "debug-sphinx-tiny-1k", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "llama_ens5_light, 2 model-parallel shard(s), float32" in text
    assert f"tokenizer.model: {release.n_words} words -> {release.n_words + 1} tokens with <image>" in text
    assert "(flavour debug-sphinx-tiny-1k, bfloat16)" in text and "pad centre, skip tokens off" in text
    assert "none missing or unexpected" in text

    assert main(["info", "--weights", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # one JSON object
    assert report["flavour"] == "debug-sphinx-tiny-1k" and report["dtype"] == "bfloat16"
    assert set(report["parts"]) == {"llm", "convnext", "dinov2", "mm_projector"}
    assert all(part["dtypes"] == ["bfloat16"] for part in report["parts"].values())
    assert report["tokenizer"]["size"] == report["token_ids"]["vocab_size"] == release.n_words + 1
    assert report["geometry"]["max_image_tokens"] == 5 * 19 and report["source"]["mp_size"] == 2
    assert report["params"]["total"] == sum(p["params"] for p in report["parts"].values())

    assert main(["info", "--weights", str(out)]) == 0
    assert "keys: all" in capsys.readouterr().out

    projector = out / "mm_projector.safetensors"
    state = load_file(str(projector))
    state.pop("end")
    save_file(state, str(projector))
    assert main(["info", "--weights", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{projector} does not match the model: missing keys (1): end" in err


def test_convert_json_and_failures(release, tmp_path, capsys):
    assert main(["convert", "--from", "accessory", str(release.directory), "-o", str(tmp_path / "m"),
                 "--flavour", "debug-sphinx-tiny-1k", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"]["files"][0].endswith("consolidated.00-of-02.model.pth")
    assert report["model_dir"]["dtype"] == "float32"

    assert main(["convert", "--from", "accessory", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 1
    assert "checkpoint directory not found" in capsys.readouterr().err
    # the real flavour's encoders do not take the toy's weights: the file and the key are named
    assert main(["convert", "--from", "accessory", str(release.directory), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "consolidated.00-of-02.model.pth (llma.openclip_convnext_xxl.*)" in err
    assert "embeddings.patch_embeddings.weight [32, 3, 4, 4] != [384, 3, 4, 4]" in err
    with pytest.raises(SystemExit):
        main(["convert", "--from", "megatron", str(release.directory), "-o", str(tmp_path / "x")])
