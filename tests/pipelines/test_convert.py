"""`sphinx-x convert --from accessory` and `sphinx-x info --weights`: what was found, and clear failures."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cluster.ports import free_port
from pipelines.cli import main



def _reference():
    """The toy release of tests/models (a helper module there, not a test)."""
    if "accessory_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "accessory_reference", Path(__file__).resolve().parents[1] / "models" / "weights" / "accessory_reference.py")
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
    assert ("(flavour debug-sphinx-tiny-1k, release llama_ens5_light, bfloat16; 2 visual towers: convnext, dinov2)"
            in text and "pad centre, skip tokens off" in text)
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


@pytest.mark.slow
def test_a_converted_release_serves_and_answers(release, tmp_path, make_spec, ray_local):
    """convert -> the endpoint (vLLM replica) -> an image question through the official openai
    client: an answer, with the release's geometry (no skip tokens: every image costs
    (1 + G^2)(N + 2) tokens, placed right after <s>)."""
    import base64
    import io

    import openai
    from PIL import Image

    from models.weights.model_dir import read_config
    from pipelines.stages import serve as serve_stage

    out = tmp_path / "m"
    assert main(["convert", "--from", "accessory", str(release.directory), "-o", str(out),
                 "--flavour", "debug-sphinx-tiny-1k"]) == 0
    flavour = read_config(out)["flavour"]  # a Flavour
    assert not flavour.skip_tokens and flavour.image_position == "after_bos"
    spec = make_spec(name="converted", serve={"http": {"host": "127.0.0.1", "port": free_port()}, "models": [
        {"name": "sphinx-tiny", "checkpoint": str(out), "ray_actor_options": {"num_cpus": 0.5}}]})
    summary = serve_stage.run_stage(spec)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (90, 30), (200, 30, 30)).save(buf, "PNG")  # 3:1, fully padded tiles included
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        client = openai.OpenAI(base_url=summary["url"] + "/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="sphinx-tiny", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What colour is it?"}]}])
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        image_tokens = (1 + flavour.grid ** 2) * (flavour.tokens_per_view + 2)
        assert reply.usage.prompt_tokens > image_tokens
    finally:
        serve_stage.shutdown(spec)
