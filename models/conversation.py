"""The SPHINX conversation template, tokenised the same way for training and serving.

Template (LLaMA2-Accessory ``v1``, as SPHINX uses it)::

    <s>{SYSTEM}### Human: {q1}\\n### Assistant: {a1}\\n### Human: {q2}\\n### Assistant: {a2}\\n###</s>

A LLaVA / SPHINX JSON row is ``{"conversations": [{"from": "human", "value": "<image>\\nWhat?"},
{"from": "gpt", "value": "A cat."}]}``. Each ``<image>`` placeholder becomes ``image_tokens[i]``
copies of the ``<image>`` token id (the image's full count, skip tokens included); with no
placeholder at all, the images go to the start of the first human turn.

    >>> tok = train_bpe_tokenizer(["a cat on a mat"] * 10, vocab_size=300)
    >>> t = tokenize_conversation(row["conversations"], tok, image_tokens=[59], max_seq_len=1024)
    >>> len(t.input_ids) == len(t.labels), t.truncated
    (True, False)

Labels are -100 everywhere except assistant answers (each ``" {a}\\n###"``, and the final
``</s>``). Every text segment is tokenised on its own and the ids are concatenated, so that
:func:`build_prompt` for the first k turns is an exact prefix of the training ids. Special-token
strings typed inside text (``</s>``, ``<s>``) are never parsed as special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from models.errors import UserError

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SEP = "###"
IMAGE = "<image>"
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD, IMAGE]
IGNORE = -100
_ROLES = {"human": "Human", "gpt": "Assistant"}
_OPENAI_ROLES = {"user": "human", "assistant": "gpt"}


class ConversationError(UserError):
    """A bad conversation row or request; ``reason`` is machine-readable.

    Reasons: ``bad_field`` (missing / non-string fields, not a list), ``unknown_role``,
    ``bad_order`` (turns must alternate human, gpt, ...), ``no_answer`` (nothing to train on),
    ``image_mismatch`` (placeholders != images), ``too_long`` (over max_seq_len).
    """

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{detail} ({reason})")


@dataclass(frozen=True)
class Tokenized:
    """One training sample: ``input_ids`` and ``labels`` have the same length.

    ``images_kept``: how many of the images survived truncation (always the first ones; drop the
    views of the rest). ``image_token_count``: tokens in image spans (``text_tokens`` = the rest).
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    images_kept: int
    image_token_count: int

    @property
    def text_tokens(self) -> int:
        return len(self.input_ids) - self.image_token_count


# ----------------------------------------------------------------------------- segments


@dataclass
class _Seg:
    ids: list[int]
    trainable: bool = False  # an assistant answer (labels = ids)
    image: int | None = None  # index of the image this span is
    turn_end: bool = False  # ends an assistant answer: a clean cut point after it


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Text -> ids with no BOS/EOS and special-token strings split like ordinary text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def image_token_id(tokenizer: Any) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ConversationError("bad_field", f"tokenizer has no {IMAGE} token (use load_tokenizer)")
    return int(tid)


IMAGE_POSITIONS = ("inline", "after_bos")


def _human_segments(text: str, tokenizer: Any, images: list[tuple[int, int]], system: str | None,
                    lead: Sequence[tuple[int, int]] = ()) -> list[_Seg]:
    """`` Human: {q}`` + newline + ``###`` with each ``<image>`` replaced by (image index, token
    count); the first turn opens with ``<s>`` and the system prompt, and ``lead`` images sit right
    after ``<s>``."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    segs = [] if system is None else [_Seg(bos)]
    if lead:
        lead_id = image_token_id(tokenizer)
        segs += [_Seg([lead_id] * count, image=index) for index, count in lead]
    if system is not None:
        segs.append(_Seg(_encode(tokenizer, system + SEP)))
    pieces = text.split(IMAGE)
    img_id = image_token_id(tokenizer) if images else None
    for k, piece in enumerate(pieces):
        piece = (" Human: " if k == 0 else "") + piece + ("\n" + SEP if k == len(pieces) - 1 else "")
        segs.append(_Seg(_encode(tokenizer, piece)))
        if k < len(pieces) - 1:
            index, count = images[k]
            segs.append(_Seg([img_id] * count, image=index))
    return segs


def _validate(conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("bad_field", "'conversations' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConversationError("bad_field", f"turn {i} is {type(turn).__name__}, not an object")
        if "from" not in turn or "value" not in turn:
            raise ConversationError("bad_field", f"turn {i} needs 'from' and 'value'")
        role, value = turn["from"], turn["value"]
        if not isinstance(role, str) or not isinstance(value, str):
            raise ConversationError("bad_field", f"turn {i}: 'from' and 'value' must be strings")
        if role not in _ROLES:
            raise ConversationError("unknown_role", f"turn {i} has role {role!r}; expected 'human' or 'gpt'")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ConversationError("bad_order", f"turn {i} is {role!r}; turns must alternate human, gpt, ...")
        if role == "gpt" and IMAGE in value:
            raise ConversationError("image_mismatch", f"turn {i}: {IMAGE} inside an assistant answer")
        turns.append((role, value))
    if not any(role == "gpt" and value.strip() for role, value in turns):
        raise ConversationError("no_answer", "no assistant answer to train on")
    return turns


def _place_images(human_texts: list[str], n_images: int) -> list[str]:
    """Check placeholder count; with none at all, put every image at the start of turn 1."""
    found = sum(t.count(IMAGE) for t in human_texts)
    if found == 0 and n_images:
        human_texts = [IMAGE * n_images + human_texts[0]] + human_texts[1:]
    elif found != n_images:
        raise ConversationError("image_mismatch", f"{found} {IMAGE} placeholder(s) but {n_images} image(s)")
    return human_texts


def _build(turns: list[tuple[str, str]], tokenizer: Any, image_tokens: Sequence[int], system: str,
           image_position: str = "inline") -> list[_Seg]:
    """``image_position``: ``inline`` (each image at its ``<image>``, the paper's layout) or
    ``after_bos`` (every image right after ``<s>``, before the system prompt: the released
    SPHINX models' layout; the placeholders then only count the images)."""
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {image_position!r}")
    humans = _place_images([v for r, v in turns if r == "human"], len(image_tokens))
    images = list(enumerate(int(n) for n in image_tokens))
    lead: list[tuple[int, int]] = []
    if image_position == "after_bos":
        humans, lead, images = [t.replace(IMAGE + "\n", "").replace(IMAGE, "") for t in humans], images, []
    segs: list[_Seg] = []
    h = 0
    for role, value in turns:
        if role == "human":
            n = humans[h].count(IMAGE)
            segs += _human_segments(humans[h], tokenizer, images[:n], system if h == 0 else None,
                                    lead if h == 0 else ())
            images, h = images[n:], h + 1
        else:
            segs.append(_Seg(_encode(tokenizer, " Assistant:")))
            segs.append(_Seg(_encode(tokenizer, " " + value + "\n" + SEP), trainable=True, turn_end=True))
    return segs


# ----------------------------------------------------------------------------- training


def tokenize_conversation(
    conversations: Any,
    tokenizer: Any,
    *,
    image_tokens: Sequence[int] = (),
    max_seq_len: int,
    overflow: Literal["truncate", "quarantine"] = "truncate",
    system: str = SYSTEM_PROMPT,
    image_position: str = "inline",
) -> Tokenized:
    """A LLaVA/SPHINX ``conversations`` list -> ``input_ids`` and ``labels`` (images expanded).

    Over ``max_seq_len``: ``quarantine`` raises ``too_long``; ``truncate`` cuts at the end of the
    last whole answer before the limit, or inside the answer the limit falls in, and never inside
    an image; if nothing trainable remains it raises ``too_long``.
    """
    turns = _validate(conversations)
    segs = _build(turns, tokenizer, image_tokens, system, image_position)
    if tokenizer.eos_token_id is not None:
        segs.append(_Seg([tokenizer.eos_token_id], trainable=True, turn_end=True))
    total = sum(len(s.ids) for s in segs)
    truncated = total > max_seq_len
    if truncated:
        if overflow == "quarantine":
            raise ConversationError("too_long", f"{total} tokens > max_seq_len {max_seq_len}")
        segs = _truncate(segs, max_seq_len, total)
    ids, labels, n_img, img_tokens = [], [], 0, 0
    for s in segs:
        ids += s.ids
        labels += s.ids if s.trainable else [IGNORE] * len(s.ids)
        if s.image is not None:
            n_img, img_tokens = n_img + 1, img_tokens + len(s.ids)
    return Tokenized(ids, labels, truncated, n_img, img_tokens)


def _truncate(segs: list[_Seg], limit: int, total: int) -> list[_Seg]:
    out: list[_Seg] = []
    used = 0
    last_clean = 0  # len(out) after the last whole answer
    for s in segs:
        if used + len(s.ids) <= limit:
            out.append(s)
            used += len(s.ids)
            if s.turn_end:
                last_clean = len(out)
            continue
        room = limit - used
        if s.trainable and room > 0:  # the limit falls inside an answer: keep its head
            return out + [_Seg(s.ids[:room], trainable=True, turn_end=True)]
        break
    if last_clean == 0:
        raise ConversationError("too_long", f"{total} tokens > max_seq_len {limit} and no whole answer fits")
    return out[:last_clean]


# ----------------------------------------------------------------------------- serving


def _content_text(content: Any, index: int) -> str:
    """OpenAI content: a string, or parts ({"type": "text"} / {"type": "image_url"}) -> text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError("bad_field", f"message {index}: content must be a string or a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("image_url", "image"):
            out.append(IMAGE)
        else:
            raise ConversationError("bad_field", f"message {index}: unsupported content part {part!r:.80}")
    return "".join(out)


def build_prompt(messages: Any, tokenizer: Any, image_tokens: Sequence[int] = (), *,
                 image_position: str = "inline") -> list[int]:
    """OpenAI-style messages -> prompt ids ending with `` Assistant:`` (same template as training).

    Roles: an optional leading ``system`` (replaces the system prompt), then ``user`` /
    ``assistant`` alternating (consecutive messages of one role are joined with a newline),
    ending with ``user``. Image parts become ``<image>`` placeholders, in order.
    """
    if not isinstance(messages, list) or not messages:
        raise ConversationError("bad_field", "'messages' must be a non-empty list")
    system, turns = SYSTEM_PROMPT, []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ConversationError("bad_field", f"message {i} needs a string 'role' and a 'content'")
        role, text = m["role"], _content_text(m["content"], i)
        if role == "system":
            if i != 0:
                raise ConversationError("bad_order", f"message {i}: a system message must come first")
            system = text
            continue
        if role not in _OPENAI_ROLES:
            raise ConversationError("unknown_role", f"message {i} has role {role!r}; expected system/user/assistant")
        role = _OPENAI_ROLES[role]
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != "human" or turns[-1][0] != "human":
        raise ConversationError("bad_order", "messages must start and end with a user message")
    if any(IMAGE in v for r, v in turns if r == "gpt"):
        raise ConversationError("image_mismatch", "images are only allowed in user messages")
    segs = _build(turns, tokenizer, image_tokens, system, image_position)
    segs.append(_Seg(_encode(tokenizer, " Assistant:")))
    return [i for s in segs for i in s.ids]


def conversation_to_messages(conversations: Iterable[dict]) -> list[dict]:
    """LLaVA turns -> OpenAI messages (``human`` -> user, ``gpt`` -> assistant)."""
    back = {v: k for k, v in _OPENAI_ROLES.items()}
    return [{"role": back[t["from"]], "content": t["value"]} for t in conversations]


# ----------------------------------------------------------------------------- tokenizers


def _wrap(tokenizer_object: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IMAGE],
    )


def _template_texts() -> list[str]:
    """The text every templated sequence carries besides the turns (see the module docstring)."""
    return [SYSTEM_PROMPT + SEP, *(f" {role}: " for role in _ROLES.values()), "\n" + SEP]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained offline (debug flavours), as ``PreTrainedTokenizerFast``.

    Ids 0..4 are ``<s> </s> <unk> <pad> <image>``; ``len(tok) <= vocab_size``. The template's
    own text (system prompt, role markers) is added to ``texts``: every sequence starts with
    it, and a tokenizer that never saw it spends ~110 byte-level tokens per row on it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*texts, *_template_texts()], trainer=trainer)
    return _wrap(tok)


def load_tokenizer(path: str | Path) -> Any:
    """Any local HF tokenizer directory; adds ``<image>`` (and a pad token) when missing."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer from {path}: {err}") from None
    if tok.convert_tokens_to_ids(IMAGE) in (None, tok.unk_token_id):
        tok.add_special_tokens({"extra_special_tokens": [IMAGE]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok
