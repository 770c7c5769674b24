"""``sharegpt``: ShareGPT / Vicuna conversations, and LLaMA-Factory's ``sharegpt`` formatting.

Before (``ShareGPT_V3_unfiltered_cleaned_split.json``; a LLaMA-Factory file adds ``system`` and
``images``)::

    {"id": "QWJhYvA_0", "system": "You are terse.", "images": ["a.jpg"],
     "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello!"}]}

After (a sample)::

    id "QWJhYvA_0", images ["a.jpg"], conversations [{"from": "system", "value": "You are terse."},
    {"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello!"}]

Names (``data.sources[].columns``, LLaMA-Factory's ``columns`` and ``tags``): ``messages``
(default ``conversations``), ``system``, ``images`` (a path or a list; ``image`` is read too),
``id``, ``role_tag`` (``from``), ``content_tag`` (``value``), ``user_tag`` (``human``),
``assistant_tag`` (``gpt``), ``system_tag`` (``system``). ``user`` / ``assistant`` are accepted
beside the tags (files converted from the OpenAI shape carry them).

Quirks: a leading system turn becomes the system prompt (a ``system`` column as well; both:
``bad_field``); a system turn anywhere else or any other role (``observation``,
``function_call``...) is ``unknown_role``; a conversation that opens with the assistant (ShareGPT
crawls often do) loses that first turn, as FastChat's training code drops it.
"""

from __future__ import annotations

from typing import Any, Iterator

from actors.data.layouts.base import GPT, HUMAN, SYSTEM, Context, Item, Layout, Rejected, Sample, as_id


class ShareGPT(Layout):
    name = "sharegpt"
    columns = {"messages": "conversations", "system": "system", "images": "images", "id": "id",
               "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
               "system_tag": "system"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        rid = as_id(data.get(ctx.col("id"))) if isinstance(data, dict) else None
        rid = rid or ctx.fallback(index)
        if not isinstance(data, dict):
            yield Rejected(rid, "bad_field", f"record is a {type(data).__name__}, not an object", data)
            return
        conv = data.get(ctx.col("messages"))
        if not isinstance(conv, list) or not conv:
            yield Rejected(rid, "bad_field", f"{ctx.col('messages')!r} is missing or not a non-empty list", data)
            return
        roles = {ctx.col("user_tag"): HUMAN, "user": HUMAN, ctx.col("assistant_tag"): GPT, "assistant": GPT,
                 ctx.col("system_tag"): SYSTEM}
        role_tag, content_tag = ctx.col("role_tag"), ctx.col("content_tag")
        out: list[dict] = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get(content_tag), str) \
                    or not isinstance(turn.get(role_tag), str):
                yield Rejected(rid, "bad_field", f"turn {i} is not {{{role_tag!r}: str, {content_tag!r}: str}}", data)
                return
            role = roles.get(turn[role_tag])
            if role is None or (role == SYSTEM and i > 0):
                where = "after the first turn" if role == SYSTEM else f"not one of {sorted(roles)}"
                yield Rejected(rid, "unknown_role", f"turn {i} has role {turn[role_tag]!r} ({where})", data)
                return
            out.append({"from": role, "value": turn[content_tag]})
        system = data.get(ctx.col("system"))
        if system not in (None, ""):
            if not isinstance(system, str) or (out and out[0]["from"] == SYSTEM):
                yield Rejected(rid, "bad_field", f"{ctx.col('system')!r} must be a string, and the conversation "
                               "must not open with a system turn as well", data)
                return
            out.insert(0, {"from": SYSTEM, "value": system})
        head = out[:1] if out and out[0]["from"] == SYSTEM else []
        body = out[len(head):]
        if body and body[0]["from"] == GPT:  # FastChat: "skip the first one if it is not from human"
            body = body[1:]
        if not body:
            yield Rejected(rid, "bad_field", "no turn left after the system prompt", data)
            return
        images = image_list(data, ctx.col("images"))
        if images is None:
            yield Rejected(rid, "bad_field", f"{ctx.col('images')!r} must be a path or a list of paths", data)
            return
        yield Sample(rid, head + body, images)


def image_list(data: dict, name: str) -> Any:
    """``data[name]`` (or LLaVA's ``image``) as a list of paths / bytes; None when malformed."""
    value = data.get(name, data.get("image"))
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out: list = []
    for v in values:
        if isinstance(v, dict):  # Hugging Face datasets' image struct
            v = v.get("bytes") if v.get("bytes") is not None else v.get("path")
        if isinstance(v, (bytes, bytearray)):
            out.append(bytes(v))
        elif isinstance(v, str) and v:
            out.append(v)
        else:
            return None
    return out
