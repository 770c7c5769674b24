"""The ingress's bounded queue: ongoing + queued requests, then 429 at once."""

from __future__ import annotations

import asyncio

import pytest

from actors.serve.openai_api import ApiError
from actors.serve.request_gate import RequestGate


def test_gate_admits_queues_then_refuses_and_hands_slots_over():
    async def scenario():
        gate = RequestGate(max_ongoing=2, max_queued=1)
        a = await gate.acquire()
        b = await gate.acquire()
        waiting = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert (gate.ongoing, gate.queued) == (2, 1) and not waiting.done()
        with pytest.raises(ApiError) as info:
            await gate.acquire()
        assert info.value.status == 429 and info.value.code == "queue_full" and gate.refused == 1
        a.release()
        a.release()  # idempotent
        c = await asyncio.wait_for(waiting, 1)
        assert (gate.ongoing, gate.queued) == (2, 0)
        b.release()
        c.release()
        assert gate.ongoing == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario():
        gate = RequestGate(max_ongoing=1, max_queued=1)
        a = await gate.acquire()
        waiting = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        assert gate.queued == 0
        a.release()
        assert gate.ongoing == 0
        (await gate.acquire()).release()

    asyncio.run(scenario())


def test_gate_rejects_nonsense_bounds():
    with pytest.raises(ValueError):
        RequestGate(0, 1)
