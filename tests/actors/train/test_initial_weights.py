"""actors.train.initial_weights: published components and model dirs → flavour overrides, tokenizer, weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from actors.train.initial_weights import check_tokenizer, read_initial_weights
from models.errors import UserError
from models.flavours import from_name
from models.sphinx import SphinxX
from models.vision import build_convnext

TEXTS = ["a cat on a mat", "the dog sat on the log", " Human: hi\n### Assistant: red"] * 20


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """llm/ (an HF Llama with its tokenizer, rope θ 5e5) and convnext/ (an HF ConvNext dir)."""
    src = tmp_path_factory.mktemp("weights")
    tok = _tokenizer()
    tok.save_pretrained(str(src / "llm"))
    flavour = from_name("debug")
    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in flavour.llm.items() if k != "vocab_size"},
                                       vocab_size=len(tok), rope_theta=5e5, tie_word_embeddings=False))
    llm.save_pretrained(str(src / "llm"))
    conv = build_convnext(flavour)
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    conv.save_pretrained(str(src / "convnext"))
    return src, llm, conv, len(tok)


def test_components_set_the_flavour_before_the_model_is_built_and_load(components):
    src, llm, conv, vocab = components
    init = read_initial_weights(src, from_name("debug"))
    assert sorted(init.parts) == ["convnext", "llm"] and init.model_dir is None
    assert init.flavour.llm["rope_theta"] == 5e5 and init.flavour.llm["vocab_size"] == len(init.tokenizer) > vocab
    model = SphinxX.from_flavour(init.flavour, init.tokenizer)  # built AFTER the overrides
    assert init.load_into(model) == ["convnext", "llm"]
    torch.testing.assert_close(model.llm.model.embed_tokens.weight[:vocab], llm.model.embed_tokens.weight)
    torch.testing.assert_close(model.llm.model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    for (name, mine), theirs in zip(model.vision.convnext.state_dict().items(), conv.state_dict().values()):
        torch.testing.assert_close(mine, theirs, msg=name)


@pytest.mark.parametrize("name", ["debug", "debug-moe"])
def test_a_sphinx_model_dir_brings_its_own_flavour_settings_and_tokenizer(tmp_path, name):
    """Every tensor back exactly (Mixtral's experts through their published per-expert layout)."""
    from models.weights.model_dir import save_model_dir
    from models.conversation import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    saved = SphinxX.from_flavour(from_name(name, llm={"rope_theta": 123.0}), tok)
    save_model_dir(saved, tok, tmp_path / "model")
    init = read_initial_weights(tmp_path / "model", from_name(name))
    assert init.model_dir is not None and init.flavour.llm["rope_theta"] == 123.0
    assert len(init.tokenizer) == len(tok)
    model = SphinxX.from_flavour(init.flavour, init.tokenizer)
    init.load_into(model)
    for (name, mine), theirs in zip(model.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(mine, theirs, msg=name)


def test_bad_weights_dirs_and_other_tokenizers_are_refused(tmp_path, components):
    with pytest.raises(UserError, match="holds none of llm/"):
        read_initial_weights(tmp_path, from_name("debug"))
    with pytest.raises(UserError, match="is not a directory"):
        read_initial_weights(tmp_path / "nope", from_name("debug"))
    from models.conversation import train_bpe_tokenizer

    init = read_initial_weights(components[0], from_name("debug"))
    with pytest.raises(UserError, match="another tokenizer than the weights'"):
        check_tokenizer(init.tokenizer, train_bpe_tokenizer(TEXTS, vocab_size=280), "s3://b/w")
    check_tokenizer(init.tokenizer, init.tokenizer, "s3://b/w")


def test_the_worker_builds_from_the_weights_settings_and_tokenizer(tmp_path, components):
    """actors.train.worker.build_model with model.weights (no ZeRO-3): the overrides are in the
    built model, the weights loaded, the tokenizer the weights' own."""
    from types import SimpleNamespace

    from actors.train.worker import TrainWorkerConfig, build_model
    from cluster.spec import TrainSection
    from models.weights.hf_llm import load_llm_tokenizer

    src, llm, _, vocab = components
    load_llm_tokenizer(src / "llm").save_pretrained(str(tmp_path / "tok"))  # what preprocess stores
    storage = SimpleNamespace(download_dir=lambda uri, tmp: uri)  # local paths as they are
    config = TrainWorkerConfig(train=TrainSection(workers=1), storage=None, flavour=from_name("debug"), layout=None,
                               total_steps=1, tokenizer_uri=str(tmp_path / "tok"), weights_uri=str(src))
    model, tok = build_model(config, storage)
    assert model.flavour.llm["rope_theta"] == 5e5 and len(tok) == model.vocab_size
    torch.testing.assert_close(model.llm.lm_head.weight[:vocab], llm.lm_head.weight)
    assert not any(p.requires_grad for p in model.vision.convnext.parameters())  # frozen after loading
