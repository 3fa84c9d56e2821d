"""Replay detection for one-time tokens (viewer launch tokens): has this ``jti`` been used?

``ReplayGuard`` is the interface; ``MemoryReplayGuard`` keeps the ids in this process. That is
right for one process only: **several replicas of a node must share a database-backed guard**
(to come with the store), or a launch token refused by one replica would be accepted by the
next. The protocol is shaped for that: one call that records and answers at once, which a
database does atomically with ``INSERT ... ON CONFLICT DO NOTHING`` (PostgreSQL) or a primary
key violation, and an expiry per id so old rows can be deleted.

A guard serves the tokens of one issuer (A's own node), so a ``jti`` alone is the key.
"""

from __future__ import annotations

import heapq
import threading
from datetime import datetime
from typing import Protocol

from ncp.errors import NcpError


class ReplayGuardFull(NcpError):
    """The guard cannot record another id without forgetting one that is still valid.

    It refuses rather than forgets: forgetting would let that token be used twice. The caller
    answers 503; the cure is a larger bound or the database-backed guard.
    """


class ReplayGuard(Protocol):
    def seen_before(self, jti: str, expires_at: datetime, *, now: datetime) -> bool:
        """Record ``jti`` and say whether it had been recorded already.

        Atomic: of any number of concurrent calls with one ``jti``, exactly one returns False.
        The id must be kept at least until ``expires_at`` (the token's expiry plus the
        verifier's leeway: until then the token would still pass); after that it may go.
        ``now`` is the verifier's clock, used to drop expired ids.
        """
        ...


class MemoryReplayGuard:
    """In-process guard: a dict of ids with their expiry and a heap to drop them in order.

    Bounded by ``max_entries`` ids that have not yet expired; beyond that it raises
    ``ReplayGuardFull``. Launch tokens live 60 seconds, so the default bound allows over
    1,500 launches a second. Thread-safe.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._expiry: dict[str, datetime] = {}
        self._queue: list[tuple[datetime, str]] = []
        self._lock = threading.Lock()

    def seen_before(self, jti: str, expires_at: datetime, *, now: datetime) -> bool:
        with self._lock:
            self._drop_expired(now)
            if jti in self._expiry:
                return True
            if len(self._expiry) >= self.max_entries:
                raise ReplayGuardFull(
                    f"the replay guard holds {self.max_entries} unexpired token ids; "
                    "refusing rather than forgetting one"
                )
            self._expiry[jti] = expires_at
            heapq.heappush(self._queue, (expires_at, jti))
            return False

    @property
    def size(self) -> int:
        """Ids held now (expired ones go on the next call). Not ``__len__``: an empty guard
        must not be falsy, or ``guard or default`` would quietly swap it."""
        with self._lock:
            return len(self._expiry)

    def _drop_expired(self, now: datetime) -> None:
        while self._queue and self._queue[0][0] < now:
            expires_at, jti = heapq.heappop(self._queue)
            if self._expiry.get(jti) == expires_at:
                del self._expiry[jti]
