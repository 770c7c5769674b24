"""``messages``: the Hugging Face / OpenAI chat shape (``role`` / ``content``), as LLaVA-style HF
datasets and LLaMA-Factory's multimodal demos publish it.

Before (a JSONL line, or a Parquet row whose ``images`` are ``{bytes, path}`` structs)::

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["cat.jpg"]}

After::

    conversations [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>What is it?"},
                   {"from": "gpt", "value": "A cat."}], images ["cat.jpg"]

``content`` is a string (``<image>`` placeholders allowed, as LLaMA-Factory writes them) or a
list of parts: ``{"type": "text", "text"}`` and ``{"type": "image"}`` (which may carry its own
``image`` / ``path`` / ``url``, appended to ``images`` in order). Names: ``messages``, ``images``,
``id``, ``role_tag`` (``role``), ``content_tag`` (``content``), ``user_tag`` (``user``),
``assistant_tag`` (``assistant``), ``system_tag`` (``system``).

Quarantined: another role (``tool``, ``function``) or a system message after the first
(``unknown_role``); another part type (``video``, ``audio``) or a malformed part (``bad_field``).
"""

from __future__ import annotations

from typing import Any, Iterator

from actors.data.layouts.base import GPT, HUMAN, IMAGE, SYSTEM, Context, Item, Layout, Rejected, Sample, as_id
from actors.data.layouts.sharegpt import image_list


class Messages(Layout):
    name = "messages"
    columns = {"messages": "messages", "images": "images", "id": "id", "role_tag": "role",
               "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        rid = (as_id(data.get(ctx.col("id"))) if isinstance(data, dict) else None) or ctx.fallback(index)
        if not isinstance(data, dict):
            yield Rejected(rid, "bad_field", f"record is a {type(data).__name__}, not an object", data)
            return
        msgs = data.get(ctx.col("messages"))
        if not isinstance(msgs, list) or not msgs:
            yield Rejected(rid, "bad_field", f"{ctx.col('messages')!r} is missing or not a non-empty list", data)
            return
        images = image_list(data, ctx.col("images"))
        if images is None:
            yield Rejected(rid, "bad_field", f"{ctx.col('images')!r} must be a path or a list of paths", data)
            return
        roles = {ctx.col("user_tag"): HUMAN, ctx.col("assistant_tag"): GPT, ctx.col("system_tag"): SYSTEM}
        out = []
        for i, msg in enumerate(msgs):
            role = roles.get(msg.get(ctx.col("role_tag"))) if isinstance(msg, dict) else None
            if not isinstance(msg, dict):
                yield Rejected(rid, "bad_field", f"message {i} is a {type(msg).__name__}, not an object", data)
                return
            if role is None or (role == SYSTEM and i > 0):
                yield Rejected(rid, "unknown_role", f"message {i} has role {msg.get(ctx.col('role_tag'))!r}; "
                               f"expected {sorted(roles)} (system first only)", data)
                return
            text, problem = _content(msg.get(ctx.col("content_tag")), images)
            if problem:
                yield Rejected(rid, "bad_field", f"message {i}: {problem}", data)
                return
            if role == GPT and IMAGE in text:
                yield Rejected(rid, "image_mismatch", f"message {i}: an image in an assistant message", data)
                return
            out.append({"from": role, "value": text})
        yield Sample(rid, out, images)


def _content(content: Any, images: list) -> tuple[str, str]:
    """A message's content -> (text with ``<image>`` placeholders, problem or ""); image parts
    that carry their own reference are appended to ``images``."""
    if isinstance(content, str):
        return content, ""
    if not isinstance(content, list):
        return "", f"content is a {type(content).__name__}; expected a string or a list of parts"
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind in ("image", "image_url"):
            ref = part.get("image") or part.get("path") or part.get("url") or part.get("image_url")
            if isinstance(ref, dict):
                ref = ref.get("url") or ref.get("path") or ref.get("bytes")
            if ref is not None:
                if not isinstance(ref, (str, bytes)):
                    return "", f"an image part's reference is a {type(ref).__name__}"
                images.append(ref)
            text += IMAGE
        else:
            return "", f"a content part {str(part)[:60]!r} is not text or image"
    return text, ""
