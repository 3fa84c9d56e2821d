"""Assembling the retrieval machinery of a node: its job service, local store, imaging channel
TLS, and the peer client (the composition root's part for country B's retriever, used by
``ncp pull``, ``ncp jobs`` and the portal).

What the retriever needs of the peer client is :class:`PeerWiring`: a ``PeerAccess`` per peer,
the signing of an HP's pair (HP assertion and TRC) and, for ``ncp pull --all``, the studies of a
patient's list.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Protocol

from ncp.config import CliHpSection
from ncp.consumer.assertions import HpIdentity, isco_role
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import Jobs
from ncp.consumer.localstore import open_store
from ncp.consumer.model import PeerAccess, PeerContext
from ncp.consumer.results import ListFilters
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


class ClientWiring:
    """The node's peer client (:class:`~ncp.consumer.peer.PeerClient`) as the retriever uses
    it: one client for every peer of ``[consumer] peers``."""

    def __init__(self, node: Node) -> None:
        from ncp.consumer.peer import PeerClient

        self.client = PeerClient.from_node(node)

    def access(self, peer: str) -> PeerAccess:
        self.client.peer(peer)  # a peer B may not ask is refused here, before any job runs
        return self.client

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
        identity = HpIdentity(
            subject=hp.id,
            name=hp.name,
            role=isco_role(hp.role_code, hp.role_display),
            organisation=hp.organisation,
            organisation_id=hp.organisation_id,
            point_of_care=hp.point_of_care,
            language=hp.locale,
            authentication=hp.authentication,
        )
        context = self.client.context(
            peer, identity, patient, purpose=purpose, informed=informed, request_id=request_id
        )
        return dataclasses.replace(context, request_id=request_id)

    def studies(self, context: PeerContext, filters: StudyFilters) -> Sequence[str]:
        listed = self.client.imaging_studies(
            context,
            ListFilters(
                date_from=filters.since, date_to=filters.until, modalities=filters.modalities
            ),
        )
        return [manifest.study_uid for manifest in listed.manifests]

    def close(self) -> None:
        self.client.close()


def default_wiring(node: Node) -> PeerWiring:
    """The node's peer client as the retriever uses it."""
    return ClientWiring(node)


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
