"""Transfer slots: at most ``max_transfers`` retrieves stream at once; more wait in a priority
queue for up to ``queue_timeout_s``, then get 503 with Retry-After.

Waiters are served by urgency, not arrival: emergency treatment (purpose of use ``ETREAT``)
first, then by the token's FHIR request-priority (stat, asap, urgent, routine), and in arrival
order within one rank. A slot freed by a finished transfer goes straight to the most urgent
waiter, so a saturated gateway never lets a routine transfer overtake an emergency one.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ncp.gateway.errors import Unavailable
from ncp.security.claims import PRIORITIES

Rank = tuple[int, int]
"""(1 for emergency treatment else 0, index of the priority in PRIORITIES); higher first."""


def rank_of(priority: str, purpose_of_use: str) -> Rank:
    level = PRIORITIES.index(priority) if priority in PRIORITIES else 0
    return (1 if purpose_of_use == "ETREAT" else 0, level)


class TransferSlots:
    """A counting semaphore whose waiters are granted by rank. One per gateway process, used
    from its event loop only (not thread-safe, like asyncio itself)."""

    def __init__(self, capacity: int, *, queue_timeout_s: float, retry_after_s: int) -> None:
        if capacity < 1:
            raise ValueError("a gateway needs at least one transfer slot")
        self.capacity = capacity
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._free = capacity
        self._order = itertools.count()
        self._waiters: list[tuple[tuple[int, int], int, asyncio.Future[None]]] = []

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for *_, fut in self._waiters if not fut.done())

    async def acquire(self, rank: Rank) -> None:
        """Take a slot, waiting by rank; :class:`Unavailable` (503) after the queue timeout."""
        if self._free > 0 and self.waiting == 0:
            self._free -= 1
            return
        if self.queue_timeout_s <= 0:
            raise self._full()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Negated rank: heapq pops the smallest, we want the most urgent; then arrival order.
        heapq.heappush(self._waiters, ((-rank[0], -rank[1]), next(self._order), fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Granted in the same turn as the timeout or cancellation: hand it on.
                if isinstance(exc, TimeoutError):
                    return
                self.release()
                raise
            fut.cancel()
            if isinstance(exc, TimeoutError):
                raise self._full() from None
            raise

    def release(self) -> None:
        """Give a slot back: to the most urgent live waiter, or to the pool."""
        while self._waiters:
            *_, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    @asynccontextmanager
    async def slot(self, rank: Rank) -> AsyncIterator[None]:
        await self.acquire(rank)
        try:
            yield
        finally:
            self.release()

    def _full(self) -> Unavailable:
        return Unavailable(
            f"all {self.capacity} transfer slots are busy; retry later",
            retry_after_s=self.retry_after_s,
        )
