"""What country B knows of a peer's answers, as plain values: the contract between the peer
client (``ncp.consumer.peer``), which reads them from A's standard channel, and the retrieval jobs
(``ncp.consumer.jobs``), which use them to fetch and verify studies.

Nothing here knows HTTP, FHIR JSON or the database: the peer client turns A's resources into
these values; the jobs store what they need of them in B's own tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from ncp.errors import NcpError
from ncp.security.claims import PatientRef

ImageOption = Literal["A", "C"]
"""How B pulls images: A through A's node gateway, C from A's edge gateway (B's viewer option
is a launch URL, not a pull)."""

Priority = Literal["emergency", "normal", "batch"]
"""B's lanes. On the wire to A: emergency -> ``stat`` (purpose ETREAT), normal -> ``routine``,
batch -> ``routine`` (A has no lower priority; B holds batch jobs back itself)."""


@dataclass(frozen=True)
class PeerContext:
    """What every patient-level request to a peer carries: the HP identity assertion and the
    treatment relationship confirmation B signed for that HP and patient (compact JWS), and the
    moment the earlier of the two expires (after which the HP must confirm again)."""

    peer: str
    """Country A's code, as on B's trust list."""
    hp_assertion: str
    trc: str
    patient: PatientRef
    expires_at: datetime
    request_id: str | None = None
    """The correlation id of the exchange (``X-Request-ID`` to A, and in both countries' audit
    records); a retrieval job uses its own when None."""


@dataclass(frozen=True)
class ManifestInstance:
    sop_instance_uid: str
    sop_class_uid: str
    number: int | None = None
    frames: int | None = None
    size: int | None = None
    """Bytes, when A's manifest states it."""


@dataclass(frozen=True)
class ManifestSeries:
    series_uid: str
    modality: str | None
    instances: tuple[ManifestInstance, ...]
    endpoint: str | None = None
    """The series' WADO-RS base from A's manifest, if given."""
    size: int | None = None
    """Bytes of the series' instances, when A's manifest states it."""


@dataclass(frozen=True)
class StudyManifest:
    """One study as A's ImagingStudy manifest describes it: what B verifies every instance
    against before anything is stored."""

    study_uid: str
    patient: PatientRef
    series: tuple[ManifestSeries, ...]
    size: int | None = None
    """Bytes of the whole study, when A states it."""
    accession: str | None = None
    description: str | None = None
    started: datetime | None = None
    modalities: tuple[str, ...] = ()
    """DICOM modality codes of the study (ImagingStudy.modality)."""
    viewer: str | None = None
    """The option B viewer endpoint's address in A's manifest (without access code), if any."""

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)


@dataclass(frozen=True)
class ImageGrant:
    """An image access token from A's ``$imaging-access``: the DICOMweb base to call with it
    (A's gateway for option A, A's edge for option C) and when it stops being accepted."""

    token: str
    base_url: str
    option: ImageOption
    studies: tuple[str, ...]
    expires_at: datetime


@dataclass(frozen=True)
class ViewerGrant:
    """Option B of ``$imaging-access``: a launch URL of A's viewer carrying a one-time code,
    for the HP's browser to open at once (it is valid for about a minute, once)."""

    url: str
    studies: tuple[str, ...]
    expires_at: datetime


class PeerRefused(NcpError):
    """A peer answered with a refusal (4xx, or 5xx after retries): the HTTP status and the
    text of A's OperationOutcome, for the HP to read."""

    def __init__(self, peer: str, status: int, diagnostics: str, *, code: str = "") -> None:
        super().__init__(f"{peer} refused ({status}): {diagnostics}")
        self.peer = peer
        self.status = status
        self.diagnostics = diagnostics
        self.code = code


class PeerUnreachable(NcpError):
    """A peer could not be reached (connection, TLS or timeout) after the retry budget."""

    def __init__(self, message: str, *, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer


class PeerUntrusted(PeerUnreachable):
    """The peer's TLS identity is not what B's trust list says (certificate chain, host name or
    pinned fingerprint), or it refused B's: nothing was sent to it, or nothing more. Never
    retried: waiting does not make a wrong certificate right."""


class PeerNotAllowed(NcpError):
    """B may not ask this country: it is not on B's trust list, or not among the peers B's
    configuration lets it ask (``[consumer] peers``). Refused before any connection."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerAnswerInvalid(NcpError):
    """A peer answered something B cannot use safely (not FHIR, another patient's data, a
    manifest whose counts disagree, a link to another server...): the reason says which rule."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: unusable answer: {reason}")
        self.peer = peer
        self.reason = reason


class PeerAccess(Protocol):
    """What retrieval jobs need of a peer; the peer client implements it, tests may fake it."""

    def manifests(
        self, context: PeerContext, study_uids: Sequence[str]
    ) -> Mapping[str, StudyManifest]:
        """A's ImagingStudy manifests for these studies of the context's patient."""
        ...

    def imaging_access(
        self,
        context: PeerContext,
        study_uids: Sequence[str],
        option: ImageOption,
        priority: Priority,
    ) -> ImageGrant:
        """A fresh image access token for these studies (also used to renew one)."""
        ...
