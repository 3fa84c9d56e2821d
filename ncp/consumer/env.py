"""What the retrieval machinery of one process needs, in one place: the job service, the local
store, the peers, the imaging channel's HTTP clients and the per-peer connection bound.

Built by the composition root (``ncp.consumer.wiring.retrieval_env``) from a node; tests build one
around a real node A and a stand-in for the peer client.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from sqlalchemy.orm import Session, sessionmaker

from ncp.config import RetrievalSection
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
    imaging_tls: Callable[[str], ssl.SSLContext | bool]
    """What the imaging channel's HTTPS client of a peer trusts (the peer's CAs)."""
    local_issuer: str = ""
    """Issuer of B's own patient identifiers (import reconciliation)."""
    slots: PeerSlots = field(init=False)
    _clients: dict[str, httpx.Client] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.slots = PeerSlots(self.settings.connections_per_peer)

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.jobs.sessions

    def now(self) -> datetime:
        """Naive UTC, as the database keeps times."""
        return self.jobs.now()

    def http(self, peer: str) -> httpx.Client:
        """The imaging channel's client of ``peer`` (one per process and peer, kept open)."""
        with self._lock:
            client = self._clients.get(peer)
            if client is None:
                timeout = self.settings.request_timeout_s
                client = httpx.Client(
                    verify=self.imaging_tls(peer),
                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                    limits=httpx.Limits(
                        max_connections=self.settings.connections_per_peer + 1,
                        max_keepalive_connections=self.settings.connections_per_peer + 1,
                    ),
                    trust_env=False,
                    follow_redirects=False,
                )
                self._clients[peer] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
        self.store.close()
