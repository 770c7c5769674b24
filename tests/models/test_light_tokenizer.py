"""models.light_tokenizer: the actors' tokenizer encodes exactly as the HF one, without transformers.

Tokenizers: the debug byte-level BPE, a sentencepiece tokenizer.model (transformers' LlamaTokenizer
over it) and a Llama-style tokenizer.json read as written; every probe text, special-token
strings in the text included, and whole templated conversations give the same ids.
"""

import pickle
import subprocess
import sys

import pytest
from weights.test_hf_llm import PROBES, TEXTS, _spm_model, _write_spm

from models.conversation import IMAGE, tokenize_conversation, train_bpe_tokenizer
from models.light_tokenizer import LightTokenizer, for_workers
from models.weights.hf_llm import load_llm_tokenizer

TRICKY = PROBES + [f"a{IMAGE}b", "<s> and </s> as text", "<unk><pad>", " Assistant: yes\n###", "tab\there"]
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}],
    [{"from": "human", "value": "hello <s> world"}, {"from": "gpt", "value": "</s> hi"},
     {"from": "human", "value": "again  two spaces"}, {"from": "gpt", "value": "你好 世界"}],
]


def _tokenizers(tmp_path):
    yield "debug-bpe", train_bpe_tokenizer(TEXTS, vocab_size=320)
    _write_spm(tmp_path, _spm_model())
    yield "sentencepiece", load_llm_tokenizer(tmp_path)
    (tmp_path / "json").mkdir()
    load_llm_tokenizer(tmp_path).save_pretrained(str(tmp_path / "json"))
    (tmp_path / "json" / "tokenizer.model").unlink(missing_ok=True)
    yield "tokenizer.json", load_llm_tokenizer(tmp_path / "json")


def test_light_tokenizer_encodes_every_text_and_conversation_as_the_hf_one(tmp_path):
    for name, hf in _tokenizers(tmp_path):
        light = pickle.loads(pickle.dumps(for_workers(hf)))  # as an actor gets it
        assert isinstance(light, LightTokenizer), name
        for text in TRICKY:
            for split in (True, False):
                for special in (True, False):
                    want = hf(text, add_special_tokens=special, split_special_tokens=split)["input_ids"]
                    got = light(text, add_special_tokens=special, split_special_tokens=split)["input_ids"]
                    assert got == want, (name, text, split, special)
        for token in (IMAGE, "<s>", "</s>", "never-a-token"):
            assert light.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token), (name, token)
        assert (light.bos_token_id, light.eos_token_id, light.unk_token_id, len(light)) == \
            (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, len(hf)), name
        for conv in CONVERSATIONS:
            counts = [7] * sum(t["value"].count("<image>") for t in conv)
            full = len(tokenize_conversation(conv, hf, image_tokens=counts, max_seq_len=4096).input_ids)
            for max_len in (4096, full - 3):  # whole, and cut inside the last answer
                want = tokenize_conversation(conv, hf, image_tokens=counts, max_seq_len=max_len)
                got = tokenize_conversation(conv, light, image_tokens=counts, max_seq_len=max_len)
                assert got == want, (name, conv, max_len)


def test_unpickling_it_does_not_import_transformers(tmp_path):
    blob = tmp_path / "tok.pkl"
    blob.write_bytes(pickle.dumps(for_workers(train_bpe_tokenizer(TEXTS, vocab_size=320))))
    code = ("import pickle, sys; t = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "t('a cat', add_special_tokens=False); print(sorted(m for m in sys.modules if m.startswith('transformers')))")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_tokenizer_that_encodes_in_python_is_passed_unchanged():
    hf = train_bpe_tokenizer(TEXTS, vocab_size=320)

    class Custom(type(hf)):
        def tokenize(self, text, **kw):  # a Python-side step the Rust backend would skip
            return super().tokenize(text.lower(), **kw)

    hf.__class__ = Custom
    assert for_workers(hf) is hf
    other = object()
    assert for_workers(other) is other  # no Rust backend at all: unchanged too


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
