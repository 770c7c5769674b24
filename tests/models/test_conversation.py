"""SPHINX template: labels on answers only, image expansion, truncation, bad rows, tokenizers."""

from __future__ import annotations

import pytest

from models.conversation import (
    IGNORE, SYSTEM_PROMPT, ConversationError, build_prompt, conversation_to_messages, image_token_id,
    load_tokenizer, tokenize_conversation, train_bpe_tokenizer,
)
from models.errors import UserError

TEXTS = [SYSTEM_PROMPT, "What is in the image? A red cat sits on a blue mat.", "Where is it? On the mat, left.",
         "The quick brown fox jumps over the lazy dog. Human: Assistant: ###"] * 10

CONV = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A red cat."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the mat."},
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=400)


def _answers(tok, t) -> str:
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])


def test_template_and_labels_only_on_answers(tok):
    t = tokenize_conversation(CONV, tok, image_tokens=[5], max_seq_len=1024)
    assert len(t.input_ids) == len(t.labels) and not t.truncated
    text = tok.decode(t.input_ids)
    assert text.startswith("<s>" + SYSTEM_PROMPT + "### Human: <image>")
    assert text.endswith(" Assistant: On the mat.\n###</s>")
    assert " Assistant: A red cat.\n### Human: Where is it?\n###" in text
    assert _answers(tok, t) == " A red cat.\n### On the mat.\n###</s>"
    assert all(lab in (IGNORE, i) for i, lab in zip(t.input_ids, t.labels))


def test_images_are_expanded_in_place(tok):
    img = image_token_id(tok)
    two = [{"from": "human", "value": "Compare <image> and <image> please."}, {"from": "gpt", "value": "Same."}]
    t = tokenize_conversation(two, tok, image_tokens=[3, 7], max_seq_len=1024)
    runs, i = [], 0
    while i < len(t.input_ids):
        if t.input_ids[i] == img:
            j = i
            while j < len(t.input_ids) and t.input_ids[j] == img:
                j += 1
            runs.append(j - i)
            i = j
        else:
            i += 1
    assert runs == [3, 7] and t.images_kept == 2 and t.image_token_count == 10
    assert t.text_tokens == len(t.input_ids) - 10
    assert all(t.labels[k] == IGNORE for k, x in enumerate(t.input_ids) if x == img)
    # no placeholder: images go to the start of the first human turn
    plain = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]
    t = tokenize_conversation(plain, tok, image_tokens=[4], max_seq_len=1024)
    assert "### Human: <image><image><image><image>Describe." in tok.decode(t.input_ids)


def test_release_layout_puts_the_images_right_after_bos(tok):
    """image_position "after_bos" (the released SPHINX models): <s>, every image, then the system
    prompt and the turns without placeholders; training ids and the serving prompt agree."""
    img = image_token_id(tok)
    t = tokenize_conversation(CONV, tok, image_tokens=[5], max_seq_len=1024, image_position="after_bos")
    assert t.input_ids[:6] == [tok.bos_token_id] + [img] * 5 and img not in t.input_ids[6:]
    assert tok.decode(t.input_ids[6:]).startswith(SYSTEM_PROMPT + "### Human: What is in the image?\n###")
    assert t.images_kept == 1 and t.image_token_count == 5
    prompt = build_prompt([{"role": "user", "content": CONV[0]["value"]}], tok, [5], image_position="after_bos")
    assert t.input_ids[:len(prompt)] == prompt  # the serving prompt is a prefix of the training ids
    with pytest.raises(ValueError, match="image_position"):
        tokenize_conversation(CONV, tok, image_tokens=[5], max_seq_len=1024, image_position="middle")


def test_special_token_text_is_not_special(tok):
    conv = [{"from": "human", "value": "say </s> and <s>"}, {"from": "gpt", "value": "ok </s>"}]
    t = tokenize_conversation(conv, tok, max_seq_len=1024)
    assert t.input_ids.count(tok.eos_token_id) == 1 and t.input_ids.count(tok.bos_token_id) == 1


def test_truncation_cuts_at_turns_or_inside_the_last_answer_never_in_an_image(tok):
    full = tokenize_conversation(CONV, tok, image_tokens=[40], max_seq_len=4096)
    n = len(full.input_ids)
    img = image_token_id(tok)
    first = full.input_ids.index(img)
    seen = set()
    for limit in range(first, n):
        try:
            t = tokenize_conversation(CONV, tok, image_tokens=[40], max_seq_len=limit)
        except ConversationError as err:
            assert err.reason == "too_long"
            seen.add("too_long")
            continue
        assert t.truncated and len(t.input_ids) <= limit
        assert t.input_ids == full.input_ids[: len(t.input_ids)]  # a prefix, labels too
        assert t.labels == full.labels[: len(t.labels)]
        assert t.input_ids.count(img) in (0, 40)  # never a partial image
        assert t.labels[-1] != IGNORE  # ends on an answer token
        seen.add(_answers(tok, t))
    assert "too_long" in seen  # the image + first question alone do not fit
    assert " A red cat.\n###" in seen  # a whole-turn cut
    assert any(s.startswith(" A red cat.\n### On") and not s.endswith("</s>") for s in seen)  # inside an answer
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(CONV, tok, image_tokens=[40], max_seq_len=n - 1, overflow="quarantine")
    assert err.value.reason == "too_long"


def test_truncation_drops_later_images_whole(tok):
    conv = [{"from": "human", "value": "<image> one"}, {"from": "gpt", "value": "A."},
            {"from": "human", "value": "<image> two"}, {"from": "gpt", "value": "B."}]
    full = tokenize_conversation(conv, tok, image_tokens=[10, 30], max_seq_len=4096)
    second = len(full.input_ids) - full.input_ids[::-1].index(image_token_id(tok))  # end of image 2
    t = tokenize_conversation(conv, tok, image_tokens=[10, 30], max_seq_len=second - 5)
    assert t.images_kept == 1 and t.image_token_count == 10 and _answers(tok, t) == " A.\n###"


@pytest.mark.parametrize("conv,images,reason", [
    ([], [], "bad_field"),
    ("not a list", [], "bad_field"),
    ([{"from": "human"}, {"from": "gpt", "value": "x"}], [], "bad_field"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], [], "bad_field"),
    (["hello"], [], "bad_field"),
    ([{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}], [], "unknown_role"),
    ([{"from": "system", "value": "q"}], [], "unknown_role"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], [], "bad_order"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], [], "bad_order"),
    ([{"from": "human", "value": "q"}], [], "no_answer"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], [], "no_answer"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}], [5], "image_mismatch"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}], [], "image_mismatch"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}], [], "image_mismatch"),
])
def test_bad_rows(tok, conv, images, reason):
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(conv, tok, image_tokens=images, max_seq_len=1024)
    assert err.value.reason == reason and isinstance(err.value, UserError)


def test_build_prompt_is_a_prefix_of_training_ids(tok):
    t = tokenize_conversation(CONV, tok, image_tokens=[6], max_seq_len=1024)
    msgs = conversation_to_messages(CONV)
    p1 = build_prompt(msgs[:1], tok, [6])
    p2 = build_prompt(msgs[:3], tok, [6])
    assert t.input_ids[: len(p1)] == p1 and t.input_ids[: len(p2)] == p2
    assert tok.decode(p2).endswith("### Human: Where is it?\n### Assistant:")
    # the OpenAI content-parts form gives the same ids
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                          {"type": "text", "text": "\nWhat is in the image?"}]}]
    assert build_prompt(parts, tok, [6]) == p1
    custom = build_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tok)
    assert tok.decode(custom) == "<s>Be brief.### Human: Hi\n### Assistant:"


@pytest.mark.parametrize("messages,reason", [
    ([], "bad_field"),
    ([{"role": "user"}], "bad_field"),
    ([{"role": "tool", "content": "x"}], "unknown_role"),
    ([{"role": "assistant", "content": "x"}], "bad_order"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "bad_order"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "bad_order"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "bad_field"),
    ([{"role": "user", "content": "<image> <image>"}], "image_mismatch"),
])
def test_build_prompt_bad_messages(tok, messages, reason):
    with pytest.raises(ConversationError) as err:
        build_prompt(messages, tok, [3])
    assert err.value.reason == reason


def test_bpe_tokenizer_round_trip(tok, tmp_path):
    assert [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token] == ["<s>", "</s>", "<unk>", "<pad>"]
    assert [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id, image_token_id(tok)] == [0, 1, 2, 3, 4]
    assert len(tok) <= 400
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "A red cat sits on the mat. Ünïcödé too."
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.decode(tok.encode(text, add_special_tokens=False)) == text
    assert image_token_id(again) == 4 and again.pad_token_id == 3
    t1 = tokenize_conversation(CONV, tok, image_tokens=[2], max_seq_len=1024)
    t2 = tokenize_conversation(CONV, again, image_tokens=[2], max_seq_len=1024)
    assert t1 == t2


def test_load_tokenizer_adds_image_token(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                       show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert image_token_id(loaded) == len(loaded) - 1 and loaded.pad_token is not None
    t = tokenize_conversation(CONV, loaded, image_tokens=[2], max_seq_len=1024)  # no <s> in this vocab
    assert loaded.decode(t.input_ids).startswith(SYSTEM_PROMPT) and t.input_ids[-1] == loaded.eos_token_id
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "missing")


def test_debug_tokenizer_learns_the_template_text_itself():
    # trained only on turns (as preprocess does): the system prompt every row starts with must
    # still be a few merged tokens, not ~110 byte-level ones (it once tripled the demo's rows)
    tok = train_bpe_tokenizer(["What colour are the shapes?", "red", "Count the shapes.", "3"] * 5, vocab_size=400)
    t = tokenize_conversation(CONV[:2], tok, image_tokens=[1], max_seq_len=1024)
    template = len(tok.encode(SYSTEM_PROMPT, add_special_tokens=False))
    assert template <= 40, template
    assert len(t.input_ids) < 80
