"""``ultrachat``: UltraChat's published rows, text only: a list of alternating turns.

Before (``train_0.jsonl`` of thunlp/UltraChat)::

    {"id": "0", "data": ["How can cross training benefit groups?", "Cross training can ...", "Thanks!", "..."]}

After::

    id "0", conversations [{"from": "human", "value": "How can ..."}, {"from": "gpt", "value": "Cross ..."}, ...]

Names: ``data``, ``id``. The first turn is the user's; an odd last turn (a question without an
answer) is kept and not trained on. Quarantined (``bad_field``): ``data`` missing, empty or holding
something other than strings.
"""

from __future__ import annotations

from typing import Any, Iterator

from actors.data.layouts.base import GPT, HUMAN, Context, Item, Layout, Rejected, Sample, as_id


class UltraChat(Layout):
    name = "ultrachat"
    columns = {"data": "data", "id": "id"}

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        rid = (as_id(data.get(ctx.col("id"))) if isinstance(data, dict) else None) or ctx.fallback(index)
        turns = data.get(ctx.col("data")) if isinstance(data, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            yield Rejected(rid, "bad_field", f"{ctx.col('data')!r} must be a non-empty list of strings", data)
            return
        yield Sample(rid, [{"from": HUMAN if i % 2 == 0 else GPT, "value": t} for i, t in enumerate(turns)])
