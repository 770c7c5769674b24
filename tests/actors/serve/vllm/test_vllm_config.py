"""The HF-side config vLLM reads for a sphinx-x model directory (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from actors.serve.vllm.config import (ARCHITECTURE, MODEL_TYPE, SphinxXConfig, prepare_vllm_dir, read_model_config,
                                text_architecture)
from models.weights.model_dir import CheckpointError
from models.weights.model_dir import save_model_dir
from models.conversation import train_bpe_tokenizer
from models.flavours import from_name
from models.sphinx import SphinxX

TEXTS = ["What colour is the square? It is red.", "How many circles are there? Three circles."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module", params=["debug", "debug-moe"])
def saved(request, tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = SphinxX.from_flavour(from_name(request.param), tokenizer)
    return model, save_model_dir(model, tokenizer, tmp_path_factory.mktemp(request.param))


_SHAPE_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
               "tie_word_embeddings", "hidden_act"]


def test_text_config_is_the_pytorch_llms(saved):
    model, directory = saved
    config = read_model_config(directory)
    text, theirs = config.get_text_config(), model.llm.config
    assert type(text) is type(theirs)
    for key in _SHAPE_KEYS + (["num_local_experts", "num_experts_per_tok"] if model.is_moe else []):
        assert getattr(text, key) == getattr(theirs, key), key
    assert text.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert text.architectures == [text_architecture(model.flavour)]
    assert config.architectures == [ARCHITECTURE] and config.model_type == MODEL_TYPE
    assert config.image_token_index == model.image_token_id
    assert config.get_flavour() == model.flavour
    assert config.model_dir == str(directory.resolve())


def test_prepared_dir_reads_back_with_autoconfig_and_autotokenizer(saved, tokenizer, tmp_path):
    model, directory = saved
    before = (directory / "config.json").read_text()
    out = prepare_vllm_dir(directory, tmp_path / "vllm")
    assert prepare_vllm_dir(directory, tmp_path / "vllm") == out  # idempotent
    assert (directory / "config.json").read_text() == before  # the model directory is untouched
    assert (out / "tokenizer.json").resolve() == (directory / "llm" / "tokenizer.json").resolve()
    assert (out / "llm").resolve() == (directory / "llm").resolve()
    AutoConfig.register(MODEL_TYPE, SphinxXConfig, exist_ok=True)  # what the vLLM plugin does
    config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert isinstance(config, SphinxXConfig)
    assert config.get_text_config().to_dict() == read_model_config(directory).get_text_config().to_dict()
    assert config.get_flavour() == model.flavour and config.model_dir == str(directory.resolve())
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "What colour is the <image> square?"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_default_vllm_dir_is_per_model_directory(saved):
    _, directory = saved
    out = prepare_vllm_dir(directory)
    assert out == prepare_vllm_dir(directory) and out.name.startswith(directory.name)
    assert json.loads((out / "config.json").read_text())["model_dir"] == str(directory.resolve())


def test_bad_model_directories_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="not a sphinx-x model config"):
        read_model_config(tmp_path)


def test_an_llm_of_another_architecture_is_named(saved, tmp_path):
    model, directory = saved
    import shutil

    copy = shutil.copytree(directory, tmp_path / "copy")
    llm_config = json.loads((copy / "llm" / "config.json").read_text())
    llm_config["model_type"] = "mixtral" if not model.is_moe else "llama"
    (copy / "llm" / "config.json").write_text(json.dumps(llm_config))
    with pytest.raises(CheckpointError, match="llm/config.json: model_type"):
        read_model_config(copy)
