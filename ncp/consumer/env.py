"""What the retrieval machinery of one process needs, in one place: the job service, the local
store, the peers, the imaging channel's connections and the per-peer connection bound.

Built by the composition root (``ncp.consumer.wiring.retrieval_env``) from a node; tests build one
around a real node A and a stand-in for the peer client.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from ncp.config import RetrievalSection
from ncp.consumer.connections import Connections
from ncp.consumer.jobs import Jobs
from ncp.consumer.localstore import LocalStore
from ncp.consumer.model import PeerAccess, Priority


class PeerSlots:
    """How many DICOMweb connections this process has open to each peer: at most ``limit``,
    plus one that only emergency jobs may take, so an emergency always gets a connection even
    when other jobs hold all the others."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used: dict[str, int] = {}
        self._cond = threading.Condition()

    def acquire(self, peer: str, priority: Priority, stop: threading.Event) -> bool:
        """Take a slot (waiting for one); False when ``stop`` was set meanwhile."""
        bound = self.limit + (1 if priority == "emergency" else 0)
        with self._cond:
            while self._used.get(peer, 0) >= bound:
                if stop.is_set():
                    return False
                self._cond.wait(0.2)
            self._used[peer] = self._used.get(peer, 0) + 1
            return True

    def release(self, peer: str) -> None:
        with self._cond:
            self._used[peer] -= 1
            self._cond.notify_all()

    def in_use(self, peer: str) -> int:
        with self._cond:
            return self._used.get(peer, 0)


@dataclass
class RetrievalEnv:
    jobs: Jobs
    settings: RetrievalSection
    store: LocalStore
    peers: Callable[[str], PeerAccess]
    """The peer client of a country on the trust list (``PeerAccess``)."""
    imaging_tls: Callable[[str], ssl.SSLContext]
    """What the imaging channel's HTTPS connections to a peer trust (the peer's CAs)."""
    local_issuer: str = ""
    """Issuer of B's own patient identifiers (import reconciliation)."""
    slots: PeerSlots = field(init=False)
    connections: Connections = field(init=False)
    """The imaging channel's connections (one pool per process, kept alive per peer)."""

    def __post_init__(self) -> None:
        self.slots = PeerSlots(self.settings.connections_per_peer)
        timeout = self.settings.request_timeout_s
        self.connections = Connections(
            self.imaging_tls,
            timeout_s=timeout,
            connect_timeout_s=min(timeout, 10.0),
            keep_idle=self.settings.connections_per_peer + 1,
        )

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.jobs.sessions

    def now(self) -> datetime:
        """Naive UTC, as the database keeps times."""
        return self.jobs.now()

    def close(self) -> None:
        self.connections.close()
        self.store.close()
