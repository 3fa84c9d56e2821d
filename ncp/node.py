"""The composition root of a running node: settings, database, audit, keys, trust, validator.

Everything a request handler needs is reached from one :class:`Node` (``request.app.state.node``,
see :func:`node_of`), built once at start by :meth:`Node.from_settings`. Tests
build one the same way from generated settings, so the code under test is the code that runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fastapi import Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ncp.audit.record import Auditor
from ncp.config import NodeSettings
from ncp.fhir.http import FhirHttpError
from ncp.fhir.work import HeavyWork
from ncp.security.keystore import KeyStore
from ncp.security.mtls import MutualTlsJwksFetcher
from ncp.security.replay import ReplayGuard
from ncp.security.trust import TrustList
from ncp.security.verified import VerifiedPairs
from ncp.store.entry_memory import EntryMemory
from ncp.validation.engine import Validator


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Node:
    """One node's long-lived parts. Build with :meth:`from_settings`; :meth:`close` at the end."""

    settings: NodeSettings
    engine: Engine
    sessions: sessionmaker[Session]
    auditor: Auditor
    keystore: KeyStore
    """Own keys: TLS server and client identities, the current signing key."""
    trust: TrustList
    validator: Validator
    validator_lock: threading.Lock
    """The validator keeps state per evaluation (fhirpathpy): one validation at a time."""
    replay: ReplayGuard
    """Database-backed (``ncp.store.replay``): one-time tokens are one-time across replicas."""
    clock: Callable[[], datetime] = field(default=utc_now)
    """Aware UTC; every token check and issue reads the time here."""
    list_memory: EntryMemory = field(default_factory=lambda: EntryMemory(0))
    """Rendered list entries kept in this process (``[lists] memory_mib``)."""
    heavy: HeavyWork = field(default_factory=HeavyWork)
    """Where CPU-heavy steps of requests run, off the event loop (``[budget]``)."""
    verified_pairs: VerifiedPairs = field(default_factory=VerifiedPairs)
    """HP assertion and TRC pairs verified once, by their bytes (``ncp.security.verified``)."""

    @property
    def base_url(self) -> str:
        """The standard channel's FHIR base as peers reach it, without a trailing slash."""
        return self.settings.urls.standard.rstrip("/")

    @property
    def country(self) -> str:
        return self.settings.node.country

    @classmethod
    def from_settings(
        cls, settings: NodeSettings, *, clock: Callable[[], datetime] | None = None
    ) -> Node:
        """Open the database (migrated to the newest schema), load and check the keys folder and
        the trust list. Raises the loaders' typed errors naming the file at fault."""
        from ncp.store.db import make_engine, migrate, session_factory
        from ncp.store.replay import DatabaseReplayGuard

        now = clock or utc_now
        keystore = KeyStore.load(settings.keys.dir, country=settings.node.country, clock=now)
        trust = TrustList.load(settings.trust.list, fetcher=MutualTlsJwksFetcher(keystore))
        engine = make_engine(settings.database.url)
        migrate(engine)
        sessions = session_factory(engine)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            auditor=Auditor(sessions, country=settings.node.country),
            keystore=keystore,
            trust=trust,
            validator=Validator.default(),
            validator_lock=threading.Lock(),
            clock=now,
            replay=DatabaseReplayGuard(sessions),
            list_memory=EntryMemory(settings.lists.memory_mib << 20),
            heavy=HeavyWork(
                settings.budget.slots,
                queue_timeout_s=settings.budget.queue_timeout_s,
                retry_after_s=settings.budget.retry_after_s,
            ),
        )

    def close(self) -> None:
        self.heavy.close()
        self.engine.dispose()


def node_of(request: Request) -> Node:
    """The node serving this request (``build_app`` puts it on the app's state)."""
    node: Node | None = getattr(request.app.state, "node", None)
    if node is None:
        raise FhirHttpError(500, "exception", "this application has no node configured")
    return node
