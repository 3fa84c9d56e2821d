"""The one verifier of image access: every gateway (option A, the edge gateway of option C) and
the viewer (option B) decide with ``AccessVerifier.check`` and nothing else.

A request passes when the token verifies as one of the kinds this verifier accepts (signed by A,
for this exact audience, in time) and names the study asked for, and, when the caller knows whose
study it is, names that patient. The answer is an ``AccessGrant``: what the gateway may serve and
what its audit record names. Viewer launch tokens are one-time: the verifier records each
``jti`` in its ReplayGuard and refuses the second use.

Series and instance requests are checked against their study: the gateway maps them to the study
UID first (as the Orthanc authorization plugin does). A QIDO search without a study UID passes
``study_uid=None`` and must filter its answer to ``grant.studies``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ncp.dicom.uids import is_uid
from ncp.security.claims import (
    IMAGE_ACCESS,
    VIEWER_LAUNCH,
    ImageAccess,
    PatientRef,
    StudyGrant,
    TokenKind,
    ViewerLaunch,
    a,
)
from ncp.security.keys import KeySet
from ncp.security.replay import ReplayGuard
from ncp.security.tokens import (
    DEFAULT_LEEWAY_S,
    KeyResolver,
    PatientMismatch,
    StudyNotCovered,
    WrongType,
    token_kind,
    verify,
)


@dataclass(frozen=True)
class AccessGrant:
    """What a verified token allows, and what the audit record of its use names."""

    kind: TokenKind[StudyGrant]
    patient: PatientRef
    studies: frozenset[str]
    option: str
    """A, B or C; B for a viewer launch."""
    priority: str
    purpose_of_use: str
    subject: str
    """The health professional in country B (``sub``)."""
    requesting_country: str
    issuer: str
    jti: str
    expires_at: datetime
    preferred_language: str | None = None
    """A viewer launch token's ``locale``: the language the viewer speaks."""
    pair_expires_at: datetime | None = None
    """A viewer launch token's ``ncp_pair_expires``: no session it opens outlives this."""

    @property
    def audit_policy(self) -> str:
        """The token id as IHE BALP records it on the access's audit record."""
        return f"urn:ietf:params:oauth:jti:{self.jti}"

    def covers(self, study_uid: str) -> bool:
        return study_uid in self.studies


class AccessVerifier:
    """Checks access tokens for one recipient (``audience``: this gateway's or viewer's exact
    identifier, as A writes it into the tokens it issues for it) against A's keys.

    ``kinds``: what this recipient accepts, image access tokens by default; the viewer passes
    ``(VIEWER_LAUNCH,)`` and a ReplayGuard, which one-time kinds require. ``max_lifetime`` raises
    the image token limit up to its 15-minute ceiling when a node configures that.
    """

    def __init__(
        self,
        keys: KeySet | KeyResolver,
        audience: str,
        issuer: str,
        replay: ReplayGuard | None = None,
        *,
        kinds: Collection[TokenKind[StudyGrant]] = (IMAGE_ACCESS,),
        max_lifetime: timedelta | None = None,
        leeway_s: int = DEFAULT_LEEWAY_S,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not kinds:
            raise ValueError("an AccessVerifier accepts at least one kind of token")
        for kind in kinds:
            if kind not in (IMAGE_ACCESS, VIEWER_LAUNCH):
                raise ValueError(f"{kind} grants no access to studies")
            if kind.one_time and replay is None:
                raise ValueError(f"{kind.label}s are one-time: the verifier needs a ReplayGuard")
            if max_lifetime is not None:
                kind.max_lifetime(max_lifetime if kind is IMAGE_ACCESS else None)
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.replay = replay
        self.kinds = {kind.typ: kind for kind in kinds}
        self.max_lifetime = max_lifetime
        self.leeway_s = leeway_s
        self.clock = clock or (lambda: datetime.now(UTC))

    def check(
        self,
        token: str,
        *,
        study_uid: str | None,
        patient: PatientRef | None = None,
        now: datetime | None = None,
    ) -> AccessGrant:
        """The grant if ``token`` allows access to ``study_uid`` (of ``patient``, when given).

        ``study_uid=None`` only for a search across studies, whose answer the caller then
        filters to ``grant.studies``. Raises a TokenError subclass otherwise; a one-time token
        is used up only when every other check passed.
        """
        moment = now or self.clock()
        found = token_kind(token)
        kind = self.kinds.get(found.typ)
        if kind is None:
            accepted = " or ".join(sorted(a(k.label) for k in self.kinds.values()))
            raise WrongType(f"{a(found.label)} is not accepted here, only {accepted}")

        def covers_request(claims: StudyGrant) -> None:
            if study_uid is not None and not claims.covers(study_uid):
                count = len(claims.studies)
                raise StudyNotCovered(
                    f"{kind.label} does not cover study {_quote(study_uid)}"
                    f"{'' if is_uid(study_uid) else ' (not a Study Instance UID)'}; it names "
                    f"{count} other {'study' if count == 1 else 'studies'}",
                    jti=claims.jti,
                )
            if patient is not None and patient != claims.patient:
                raise PatientMismatch(
                    f"{kind.label} is for patient {claims.patient}, not for {patient}",
                    jti=claims.jti,
                )

        # verify() runs covers_request before it records a one-time id, so a launch token sent
        # to the wrong study is refused without being used up.
        claims = verify(
            kind,
            token,
            self.keys,
            audience=self.audience,
            issuer=self.issuer,
            now=moment,
            leeway_s=self.leeway_s,
            replay=self.replay if kind.one_time else None,
            max_lifetime=self.max_lifetime if kind is IMAGE_ACCESS else None,
            check=covers_request,
        )
        launch = claims if isinstance(claims, ViewerLaunch) else None
        return AccessGrant(
            kind=kind,
            patient=claims.patient,
            studies=frozenset(claims.studies),
            option=claims.option if isinstance(claims, ImageAccess) else "B",
            priority=claims.priority,
            purpose_of_use=claims.purpose_of_use,
            subject=claims.subject,
            requesting_country=claims.requesting_country,
            issuer=claims.issuer,
            jti=claims.jti,
            expires_at=claims.expires_at,
            preferred_language=launch.preferred_language if launch else None,
            pair_expires_at=launch.pair_expires_at if launch else None,
        )


def _quote(value: str, limit: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
