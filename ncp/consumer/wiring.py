"""Assembling the retrieval machinery of a node: its job service, local store, imaging channel
TLS, and the peer client (the composition root's part for country B's retriever, used by
``ncp pull``, ``ncp jobs`` and the portal).

What the retriever needs of the peer client is :class:`PeerWiring`: a ``PeerAccess`` per peer,
the signing of an HP's pair (HP assertion and TRC) and, for ``ncp pull --all``, the studies of a
patient's list.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Protocol

from ncp.config import CliHpSection
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import Jobs
from ncp.consumer.localstore import open_store
from ncp.consumer.model import PeerAccess, PeerContext
from ncp.errors import ConfigError
from ncp.security.claims import PatientRef
from ncp.security.mtls import client_ssl_context

if TYPE_CHECKING:
    from ncp.node import Node


@dataclass(frozen=True)
class StudyFilters:
    """Filters of the metadata list for ``ncp pull --all``."""

    modalities: tuple[str, ...] = ()
    since: date | None = None
    until: date | None = None


class PeerWiring(Protocol):
    def access(self, peer: str) -> PeerAccess:
        """The peer client of ``peer``."""
        ...

    def context(
        self,
        peer: str,
        hp: CliHpSection,
        patient: PatientRef,
        *,
        purpose: str,
        informed: bool,
        request_id: str | None = None,
    ) -> PeerContext:
        """Sign the HP assertion and TRC of ``hp`` for ``patient`` at ``peer``."""
        ...

    def studies(self, context: PeerContext, filters: StudyFilters) -> Sequence[str]:
        """Study Instance UIDs of the context's patient that A lists under ``filters``."""
        ...

    def close(self) -> None: ...


def default_wiring(node: Node) -> PeerWiring:
    """The node's peer client as the retriever uses it."""
    raise ConfigError(
        "this build of ncp has no peer client for country B yet (it comes with the peer "
        "client's branch): ncp pull cannot ask a peer"
    )


def imaging_tls(node: Node, peer: str) -> ssl.SSLContext:
    """The imaging channel's TLS towards ``peer``'s gateways: the CAs the trust list names for
    it as the only anchors (not the system's web CAs), host names checked."""
    return client_ssl_context(node.keystore, node.trust.peer(peer).tls_ca)


def retrieval_env(node: Node, peers: Callable[[str], PeerAccess]) -> RetrievalEnv:
    """The retrieval machinery of ``node``, asking peers through ``peers``."""
    settings = node.settings
    return RetrievalEnv(
        jobs=Jobs(node.sessions, node.auditor, clock=node.clock),
        settings=settings.retrieval,
        store=open_store(settings.retrieval.store),
        peers=peers,
        imaging_tls=lambda peer: imaging_tls(node, peer),
        local_issuer=settings.retrieval.local_patient_issuer or settings.node.patient_id_issuer,
    )
