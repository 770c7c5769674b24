"""Pretrained LLM directories (Llama, Mixtral, InternLM2) with their own tokenizers, at toy size.

References: transformers' own LlamaForCausalLM / MixtralForCausalLM on the saved directory, and
for InternLM2 a forward written here from its packed published layout (``wqkv`` per KV group).
Tokenizers: a fast tokenizer.json, and a sentencepiece tokenizer.model trained here, which must
encode exactly as sentencepiece itself does.
"""

import io
import json
import math

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from models.conversation import IMAGE, load_tokenizer, tokenize_conversation
from models.errors import UserError
from models.flavours import from_name
from models.weights.stream import materialise
from models.weights.hf_llm import load_llm_tokenizer, load_pretrained_llm, sentencepiece_tokenizer
from models.weights.internlm2 import internlm2_to_llama
from models.sphinx import SphinxX


TOL = 1e-5
SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
TEXTS = ["a cat on a mat", "the dog sat on the log", "hello world", "你好 世界 中文", "numbers 1234 and symbols !?",
         "  two  spaces\n### Human: Assistant:"] * 40
PROBES = ["a cat 你好 xyz", " Human: hi\n###", "hello  world", "Zebra! 12345 ✓", "\n\nnew lines", "  lead", "", "###"]


def _report(name, diff):
    print(f"{name}: max |diff| = {diff:.2e}")
    assert diff < TOL, f"{name}: {diff}"


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _spm_model(add_dummy_prefix=True) -> bytes:
    """A BPE sentencepiece model set up like Llama's / InternLM2's (identity normalisation,
    spaces kept, byte fallback, digits split)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=out, vocab_size=300, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
        hard_vocab_limit=False)
    return out.getvalue()


def _fast_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_spm(directory, model: bytes, tokenizer_class="LlamaTokenizer", remote=False):
    (directory / "tokenizer.model").write_bytes(model)
    cfg = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if remote:
        cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
        cfg["pad_token"] = "</s>"
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def _ids(n, vocab, seed=0):
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
def test_sentencepiece_tokenizer_encodes_as_sentencepiece(tmp_path, add_dummy_prefix):
    model = _spm_model(add_dummy_prefix)
    (tmp_path / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    tok = sentencepiece_tokenizer(tmp_path / "tokenizer.model")
    assert len(tok) == sp.get_piece_size()
    for text in PROBES:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok("a cat")["input_ids"][0] == sp.bos_id()


def test_llama_tokenizer_json_is_read_as_written(tmp_path):
    """A Llama-style tokenizer.json (Prepend + Replace normaliser) under tokenizer_class
    LlamaTokenizerFast: transformers' LlamaTokenizer would rebuild a Metaspace pipeline that drops
    the dummy prefix before a leading space (" Human:"); read as written it matches sentencepiece."""
    model = _spm_model()
    (tmp_path / "tokenizer.model").write_bytes(model)
    sentencepiece_tokenizer(tmp_path / "tokenizer.model").save_pretrained(str(tmp_path / "llama"))
    (tmp_path / "llama" / "tokenizer.model").write_bytes(model)
    cfg = json.loads((tmp_path / "llama" / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="LlamaTokenizerFast", bos_token={"__type": "AddedToken", "content": "<s>"})
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps(cfg))
    sp = spm.SentencePieceProcessor(model_proto=model)
    tok = load_llm_tokenizer(tmp_path / "llama")
    for text in PROBES:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok.bos_token == "<s>" and tok(" Human:")["input_ids"][:1] == [sp.bos_id()]


def test_tokenizer_gets_image_and_pad_and_round_trips(tmp_path):
    _write_spm(tmp_path, _spm_model(), "InternLM2Tokenizer", remote=True)  # remote code: never executed
    tok = load_llm_tokenizer(tmp_path)
    image = tok.convert_tokens_to_ids(IMAGE)
    assert image == 300 and len(tok) == 301 and tok.pad_token == "</s>"
    assert tok(f"x{IMAGE}y", add_special_tokens=False)["input_ids"].count(image) == 1
    tok.save_pretrained(str(tmp_path / "saved"))  # what a model directory stores; loads back unchanged
    again = load_llm_tokenizer(tmp_path / "saved")
    served = load_tokenizer(tmp_path / "saved")  # how load_model_dir reads a model directory's tokenizer
    for text in PROBES + [f"a{IMAGE}b"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert again(text, add_special_tokens=False)["input_ids"] == ids
        assert served(text, add_special_tokens=False)["input_ids"] == ids
    assert len(again) == len(served) == 301 and served.pad_token == "</s>"


def test_tokenizer_errors_name_the_directory(tmp_path):
    with pytest.raises(UserError, match="no tokenizer in"):
        load_llm_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"tokenizer\.model is not a sentencepiece model"):
        load_llm_tokenizer(tmp_path)


# ---------------------------------------------------------------- Llama


def _llama_dir(path, tokenizer_kind, tie=False, rope_theta=10000.0):
    path.mkdir()
    if tokenizer_kind == "fast":
        tok = _fast_tokenizer()
        tok.save_pretrained(str(path))
        vocab = len(tok)
    else:
        model = _spm_model()
        _write_spm(path, model)
        vocab = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    ref = _randomise(LlamaForCausalLM(LlamaConfig(**SHAPES, vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=rope_theta,
                                                  tie_word_embeddings=tie)))
    ref.save_pretrained(str(path))
    return ref, vocab


@pytest.mark.parametrize("tokenizer_kind,tie", [("fast", False), ("sentencepiece", False), ("fast", True)])
def test_llama_directory_gives_the_reference_logits(tmp_path, tokenizer_kind, tie):
    ref, vocab = _llama_dir(tmp_path / "llm", tokenizer_kind, tie=tie, rope_theta=5e5)
    base = from_name("debug", llm=SHAPES)
    pre = load_pretrained_llm(tmp_path / "llm", base)
    assert pre.layout == "llama" and pre.source_vocab == vocab
    assert pre.vocab_size == vocab + 1 == len(pre.tokenizer) and pre.added_tokens == (IMAGE,)
    assert pre.tokenizer.convert_tokens_to_ids(IMAGE) == vocab
    flavour = pre.apply_to(base)
    assert flavour.llm["vocab_size"] == vocab + 1 and flavour.llm["rope_theta"] == 5e5
    model = SphinxX(flavour, **pre.token_ids()).eval()
    pre.load_into(model.llm)
    emb, head = model.llm.model.embed_tokens.weight, model.llm.lm_head.weight
    assert torch.allclose(emb[vocab], emb[:vocab].mean(0)) and torch.allclose(head[vocab], head[:vocab].mean(0))
    assert emb.data_ptr() != head.data_ptr()
    ids = _ids(12, vocab)
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        ours = model(ids).logits  # the SphinxX text path (no images)
    _report(f"llama {tokenizer_kind} tie={tie}", (ours[..., :vocab] - theirs).abs().max().item())


def test_sphinx_runs_a_conversation_with_the_pretrained_tokenizer(tmp_path):
    _llama_dir(tmp_path / "llm", "sentencepiece")
    base = from_name("debug", llm=SHAPES)
    pre = load_pretrained_llm(tmp_path / "llm", base)
    model = SphinxX(pre.apply_to(base), **pre.token_ids()).eval()
    pre.load_into(model.llm)
    kept = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    n_image = model.vision.token_counts(kept)[0]
    row = [{"from": "human", "value": f"{IMAGE}\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]
    t = tokenize_conversation(row, pre.tokenizer, image_tokens=[n_image], max_seq_len=512)
    assert t.input_ids.count(pre.tokenizer.convert_tokens_to_ids(IMAGE)) == n_image
    views = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8)
    ids = torch.tensor([t.input_ids])
    out = model(ids, labels=torch.tensor([t.labels]), views=views, kept=kept)
    assert out.logits.shape == (1, len(t.input_ids), pre.vocab_size) and torch.isfinite(out.loss)


def test_llama_directory_that_does_not_fit_the_flavour_names_key_and_shapes(tmp_path):
    _llama_dir(tmp_path / "llm", "fast")
    other = from_name("debug", llm={**SHAPES, "num_key_value_heads": 4})
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight \[32, 64\] != \[64, 64\].*"
                                        r"num_key_value_heads 2 != 4"):
        load_pretrained_llm(tmp_path / "llm", other)
    with pytest.raises(UserError, match="holds a llama model but flavour 'debug-moe' is a mixtral"):
        load_pretrained_llm(tmp_path / "llm", from_name("debug-moe", llm=SHAPES))


def test_llama_bad_directories_name_the_file(tmp_path):
    flavour = from_name("debug", llm=SHAPES)
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained_llm(tmp_path, flavour)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match=r"model_type 'gpt2' is not supported"):
        load_pretrained_llm(tmp_path, flavour)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SHAPES}))
    with pytest.raises(UserError, match="no weights in"):
        load_pretrained_llm(tmp_path, flavour)


# ---------------------------------------------------------------- Mixtral


def test_mixtral_directory_in_the_published_expert_layout(tmp_path):
    tok = _fast_tokenizer()
    src = tmp_path / "mixtral"
    tok.save_pretrained(str(src))
    config = MixtralConfig(**SHAPES, vocab_size=len(tok), num_local_experts=4, num_experts_per_tok=2,
                           rope_theta=1e6, rms_norm_eps=1e-5)
    ref = _randomise(MixtralForCausalLM(config))
    ref.save_pretrained(str(src))
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:  # the published per-expert layout
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in f.keys()
    base = from_name("debug-moe", llm=SHAPES)
    pre = load_pretrained_llm(src, base)
    assert pre.arch == "mixtral" and pre.llm_overrides["rope_theta"] == 1e6
    model = SphinxX(pre.apply_to(base), **pre.token_ids()).eval()
    pre.load_into(model.llm)
    ids = _ids(10, len(tok))
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        ours = model(ids).logits
    _report("mixtral", (ours[..., :len(tok)] - theirs).abs().max().item())
    wrong = from_name("debug-moe", llm={**SHAPES, "num_local_experts": 2})
    with pytest.raises(UserError, match=r"router\.weight \[4, 64\] != \[2, 64\]|gate\.weight \[4, 64\] != \[2, 64\]"):
        load_pretrained_llm(src, wrong)


# ---------------------------------------------------------------- InternLM2

H, K, D, L, FFN = 4, 2, 16, 2, 96  # d = H·D = 64


def _internlm2_state(vocab, bias=False, seed=3):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, base=0.0):
        return base + 0.1 * torch.randn(shape, generator=g)

    d = H * D
    s = {"model.tok_embeddings.weight": r(vocab, d), "model.norm.weight": r(d, base=1.0), "output.weight": r(vocab, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        s.update({p + "attention.wqkv.weight": r((H + 2 * K) * D, d), p + "attention.wo.weight": r(d, H * D),
                  p + "feed_forward.w1.weight": r(FFN, d), p + "feed_forward.w3.weight": r(FFN, d),
                  p + "feed_forward.w2.weight": r(d, FFN), p + "attention_norm.weight": r(d, base=1.0),
                  p + "ffn_norm.weight": r(d, base=1.0)})
        if bias:
            s.update({p + "attention.wqkv.bias": r((H + 2 * K) * D), p + "attention.wo.bias": r(d)})
    return s


def _internlm2_config(vocab, bias=False, rope_theta=1e6):
    return {"architectures": ["InternLM2ForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.X"},
            "model_type": "internlm2", "vocab_size": vocab, "hidden_size": H * D, "intermediate_size": FFN,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": K, "hidden_act": "silu",
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "rope_scaling": None,
            "bias": bias, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def _internlm2_forward(s, ids, bias=False, theta=1e6, eps=1e-5):
    """InternLM2ForCausalLM.forward from the packed layout (modeling_internlm2.py, eager path)."""
    b, t = ids.shape
    g = H // K

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)

    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(t).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = s["model.tok_embeddings.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, s[p + "attention_norm.weight"])
        qkv = F.linear(h, s[p + "attention.wqkv.weight"], s.get(p + "attention.wqkv.bias") if bias else None)
        qkv = qkv.view(b, t, K, g + 2, D)  # "b q (h gs d) -> b q h gs d"
        q = qkv[..., :g, :].reshape(b, t, H, D).transpose(1, 2)  # "b q h gs d -> b q (h gs) d"
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # repeat_kv
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(D) + mask).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(b, t, H * D)
        x = x + F.linear(a, s[p + "attention.wo.weight"], s.get(p + "attention.wo.bias") if bias else None)
        h = rms(x, s[p + "ffn_norm.weight"])
        x = x + F.linear(F.silu(F.linear(h, s[p + "feed_forward.w1.weight"])) * F.linear(h, s[p + "feed_forward.w3.weight"]),
                         s[p + "feed_forward.w2.weight"])
    return F.linear(rms(x, s["model.norm.weight"]), s["output.weight"])


@pytest.mark.parametrize("bias", [False, True])
def test_internlm2_published_layout_converts_to_the_same_logits(tmp_path, bias):
    src = tmp_path / "internlm2"
    src.mkdir()
    model_bytes = _spm_model()
    _write_spm(src, model_bytes, "InternLM2Tokenizer", remote=True)
    vocab = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    state = _internlm2_state(vocab, bias)
    half = len(state) // 2  # sharded as published, with an index
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(src / fname))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (src / "config.json").write_text(json.dumps(_internlm2_config(vocab, bias)))
    base = from_name("debug", llm=dict(SHAPES, hidden_size=H * D, intermediate_size=FFN))
    pre = load_pretrained_llm(src, base)
    assert pre.layout == "internlm2" and pre.arch == "llama"
    assert pre.llm_overrides["rope_theta"] == 1e6 and pre.llm_overrides["attention_bias"] == bias
    assert pre.tokenizer.pad_token == "</s>" and pre.vocab_size == vocab + 1
    model = SphinxX(pre.apply_to(base), **pre.token_ids()).eval()
    pre.load_into(model.llm)
    ids = _ids(14, vocab)
    with torch.no_grad():
        ref = _internlm2_forward(state, ids, bias=bias)
        ours = model(ids).logits
    _report(f"internlm2 bias={bias}", (ours[..., :vocab] - ref).abs().max().item())


def test_internlm2_conversion_checks_the_packed_shapes():
    state = _internlm2_state(50)
    config = _internlm2_config(50)
    recipes, kwargs = internlm2_to_llama(dict(state), config, source="ok")
    llama = materialise(recipes)
    assert kwargs["num_key_value_heads"] == K and llama["model.layers.0.self_attn.k_proj.weight"].shape == (K * D, H * D)
    # the query rows of KV group 1 come from rows [(G + 2)·D, (2G + 2)·D) of wqkv
    g = H // K
    wqkv = state["model.layers.0.attention.wqkv.weight"]
    assert torch.equal(llama["model.layers.0.self_attn.q_proj.weight"][g * D:2 * g * D], wqkv[(g + 2) * D:(2 * g + 2) * D])
    _, scaled = internlm2_to_llama(dict(state), dict(config, rope_scaling={"type": "dynamic", "factor": 2.0}),
                                   source="scaled")
    assert scaled["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0}
    assert LlamaConfig(**scaled).rope_parameters["rope_type"] == "dynamic"
    bad = dict(state, **{"model.layers.1.attention.wqkv.weight": torch.zeros(H * D * 3, H * D)})
    with pytest.raises(UserError, match=r"model\.layers\.1\.attention\.wqkv\.weight \[192, 64\] != \[128, 64\]"):
        internlm2_to_llama(bad, config, source="bad")
    extra = dict(state, **{"model.layers.0.attention.rotary_emb.inv_freq": torch.zeros(8)})
    with pytest.raises(UserError, match=r"unexpected InternLM2 weights \(1\): model\.layers\.0\.attention\.rotary_emb"):
        internlm2_to_llama(extra, config, source="extra")
    missing = {k: v for k, v in state.items() if k != "output.weight"}
    with pytest.raises(UserError, match="missing InternLM2 weight output.weight"):
        internlm2_to_llama(missing, config, source="missing")
