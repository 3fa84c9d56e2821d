"""The portal's use of B's peer client (``ncp.consumer.peer``): every question to country A in
the logged-in HP's name.

B signs the HP identity assertion from the session (``ncp.portal.identity.hp_identity``: its
``acr`` says how the HP authenticated) and, once the HP confirmed, the TRC under it; the pair
lives in the session (``ncp.portal.patients``). Each patient-level question takes the session's
pair; an expired pair raises :class:`ConfirmationExpired` before anything is sent, so the HP is
asked again instead of A refusing.

A's refusals and failures reach the routes as the peer client's typed errors
(``PeerRefused`` with A's OperationOutcome text, ``PeerUnreachable``, ``PeerAnswerInvalid``,
``PeerNotAllowed``); the routes show them as pages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ncp.consumer.model import PeerContext, Priority, StudyManifest, ViewerGrant
from ncp.consumer.peer import PeerClient
from ncp.consumer.results import (
    ManifestList,
    MatchResult,
    MetadataList,
    PatientQuery,
    ReportHistory,
)
from ncp.consumer.throughput import measured_throughput
from ncp.node import Node
from ncp.portal.i18n import Translator
from ncp.portal.identity import hp_identity
from ncp.portal.listview import ListContext, build_list
from ncp.portal.patients import Confirmed
from ncp.portal.sessions import PortalSessionView
from ncp.security.claims import PatientRef


class ConfirmationExpired(Exception):
    """The pair of a confirmed patient has expired: the HP must confirm again."""

    def __init__(self, confirmed: Confirmed) -> None:
        super().__init__(f"the confirmation for patient {confirmed.key} expired")
        self.confirmed = confirmed


@dataclass(frozen=True)
class PatientList:
    """What A lists for a patient, as the list page and the thumbnails need it."""

    listed: MetadataList
    manifests: Mapping[str, StudyManifest]

    def viewer_studies(self) -> list[str]:
        """The studies A offers its viewer for (option B), in A's order."""
        return [s.study_uid for s in self.listed.studies if self._viewer(s.study_uid)]

    def _viewer(self, uid: str) -> bool:
        manifest = self.manifests.get(uid)
        return manifest is not None and manifest.viewer is not None


class PortalPeers:
    """One peer client for the node (thread-safe), used for every HP."""

    def __init__(self, node: Node, client: PeerClient, clock: Callable[[], datetime]) -> None:
        self.node = node
        self.client = client
        self.clock = clock
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="portal-peer")

    @classmethod
    def from_node(cls, node: Node, clock: Callable[[], datetime]) -> PortalPeers:
        return cls(node, PeerClient.from_node(node), clock)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def countries(self) -> list[str]:
        """The peers the HP may choose: ``[consumer] peers`` that are on the trust list."""
        return sorted(p.country for p in self.client.peers())

    def fresh(self, confirmed: Confirmed) -> PeerContext:
        """The session's pair for a patient, or ConfirmationExpired."""
        if confirmed.expired(self.clock()):
            raise ConfirmationExpired(confirmed)
        return confirmed.context

    # -- identification and confirmation --------------------------------------------------------

    def identify(self, view: PortalSessionView, peer: str, query: PatientQuery) -> MatchResult:
        assertion = self.client.hp_assertion(peer, hp_identity(view))
        return self.client.match(peer, assertion, query)

    def confirm(
        self,
        view: PortalSessionView,
        peer: str,
        patient: PatientRef,
        *,
        purpose: str,
        informed: bool,
    ) -> PeerContext:
        """B signs a fresh HP assertion and the TRC under it (audited ``trc-confirm``)."""
        return self.client.context(
            peer, hp_identity(view), patient, purpose=purpose, informed=informed
        )

    # -- the list, reports, option B ------------------------------------------------------------

    def patient_list(self, confirmed: Confirmed) -> PatientList:
        """Every page of A's metadata list and of its manifests, asked at once."""
        context = self.fresh(confirmed)
        listed = self._pool.submit(self.client.metadata_list, context)
        manifests = self._pool.submit(self.client.imaging_studies, context)
        found: ManifestList = manifests.result()
        return PatientList(listed.result(), found.by_uid())

    def list_model(
        self,
        confirmed: Confirmed,
        found: PatientList,
        t: Translator,
        *,
        report_url: Callable[[str], str],
        thumbnail_url: Callable[[str], str | None] | None,
    ) -> dict[str, Any]:
        ctx = ListContext(
            peer=confirmed.peer,
            throughput=measured_throughput(self.node.sessions, confirmed.peer),
            report_url=report_url,
            thumbnail_url=thumbnail_url,
        )
        patient = {
            "display": confirmed.display,
            "identifier": confirmed.patient.value,
        }
        return build_list(found.listed, found.manifests, t, ctx, patient=patient)

    def report_history(self, confirmed: Confirmed, report_id: str) -> ReportHistory:
        return self.client.report_history(self.fresh(confirmed), report_id)

    def viewer_launch(
        self, confirmed: Confirmed, studies: Sequence[str], *, emergency: bool = False
    ) -> ViewerGrant:
        priority: Priority = "emergency" if emergency else "normal"
        return self.client.viewer_launch(self.fresh(confirmed), studies, priority)


__all__ = ["ConfirmationExpired", "PatientList", "PortalPeers"]
