"""The ingress's bounded queue: at most ``max_ongoing`` requests in work, ``max_queued`` waiting.

Ray Serve's own ``max_queued_requests`` answers 503 in plain text from its proxy; this gate
runs inside the ingress, before a request's body is read, and answers 429 with a
``Retry-After`` in OpenAI's error shape (``serve.ingress_max_ongoing_requests`` and
``serve.ingress_max_queued_requests``)::

    gate = RequestGate(max_ongoing=2, max_queued=1)
    a = await gate.acquire()   # in work
    b = await gate.acquire()   # in work
    c = gate.acquire()         # waits (queued) until a or b is released
    await gate.acquire()       # a 4th: ApiError 429 "queue_full", at once
    a.release()                # c starts
"""

from __future__ import annotations

import asyncio

from actors.serve.openai_api import ApiError

RETRY_AFTER_S = 1


class Slot:
    """One admitted request; :meth:`release` is idempotent (a stream may release it twice)."""

    def __init__(self, gate: "RequestGate"):
        self._gate, self._held = gate, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate._release()


class RequestGate:
    """Admission of requests into one ingress replica's event loop (not thread-safe: one loop)."""

    def __init__(self, max_ongoing: int, max_queued: int):
        if max_ongoing < 1 or max_queued < 0:
            raise ValueError(f"need max_ongoing >= 1 and max_queued >= 0, got {max_ongoing}, {max_queued}")
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self.ongoing = 0
        self.refused = 0
        self._waiters: list[asyncio.Future] = []

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> Slot:
        """A slot, after waiting while ``max_ongoing`` are in work; 429 if the queue is full too."""
        if self.ongoing < self.max_ongoing and not self._waiters:
            self.ongoing += 1
            return Slot(self)
        if len(self._waiters) >= self.max_queued:
            self.refused += 1
            raise ApiError(429, f"the server is busy ({self.ongoing} requests in work, {self.queued} waiting); "
                           f"retry after {RETRY_AFTER_S} s", code="queue_full")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _release hands its slot over: ongoing stays counted
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as the client left: pass it on
            raise
        return Slot(self)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.ongoing -= 1
