"""The check country A runs on every patient-level request from country B, and the access
tokens A issues under a pair that passed it.

A request carries two assertions from B's node: the HP identity assertion (who asks) and the
treatment relationship confirmation (for which patient, why), issued under that HP assertion.
``check_request_pair`` accepts the request only when both verify with the keys of the country at
the other end of the mutual TLS connection, are addressed to this node, and are bound to each
other; anything else is refused with a TokenError that says which rule failed.

The TRC's patient is exposed as ``RequestContext.patient``: the caller compares it with the
patient the request is about (``require_patient``) and checks that every study it hands out is
that patient's.

Renewal: B asks again, on the standard channel, with the same HP assertion and TRC; while both
are valid, ``check_request_pair`` passes and ``image_access_for`` issues a fresh short token. A
token never outlives the pair it was issued under.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ncp.security.claims import (
    HP_ASSERTION,
    IMAGE_ACCESS_LIFETIME,
    TRC,
    VIEWER_LAUNCH_CEILING,
    C,
    HpAssertion,
    ImageAccess,
    PatientRef,
    TokenKind,
    Trc,
    ViewerLaunch,
)
from ncp.security.keys import KeySet
from ncp.security.tokens import (
    DEFAULT_LEEWAY_S,
    Expired,
    KeyResolver,
    PatientMismatch,
    TokenError,
    WrongIssuer,
    token_hash,
    verify,
)


class CountryMismatch(WrongIssuer):
    """The assertion was issued by another country than the TLS peer that presented it."""


class NotBound(TokenError):
    """The TRC was not issued under this HP assertion (another assertion, another HP)."""


@dataclass(frozen=True)
class RequestContext:
    """A verified pair: who asks (``hp``), for which patient and purpose (``trc``), from where."""

    country: str
    """The requesting country: TLS peer, issuer of both assertions."""
    hp: HpAssertion
    trc: Trc

    @property
    def patient(self) -> PatientRef:
        return self.trc.patient

    @property
    def purpose_of_use(self) -> str:
        return self.trc.purpose_of_use

    @property
    def subject(self) -> str:
        """The health professional, as B identifies them."""
        return self.hp.subject

    @property
    def expires_at(self) -> datetime:
        """When the first of the two expires: nothing issued under the pair outlives this."""
        return min(self.hp.expires_at, self.trc.expires_at)

    @property
    def audit_policies(self) -> tuple[str, str]:
        """Both assertions' ids as BALP records them (HP assertion, TRC)."""
        return self.hp.audit_policy, self.trc.audit_policy

    def require_patient(self, patient: PatientRef) -> None:
        """Refuse unless the request is about the TRC's patient."""
        if patient != self.trc.patient:
            raise PatientMismatch(
                f"the treatment relationship confirmation is for patient {self.trc.patient}, "
                f"the request is about {patient}",
                jti=self.trc.jti,
            )


def check_request_pair(
    hp_token: str,
    trc_token: str,
    *,
    tls_country: str,
    b_keys: KeySet | KeyResolver,
    audience: str,
    now: datetime,
    leeway_s: int = DEFAULT_LEEWAY_S,
) -> RequestContext:
    """Verify the pair a patient-level request carries, or raise a TokenError.

    ``tls_country``: the country the mutual TLS peer was recognised as (trust list).
    ``b_keys``: that country's KeySet, or the trust list's resolver by country code; either way
    only keys whose issuer is ``tls_country`` verify. ``audience``: this node's identifier as
    peers address it.
    """
    hp = verify_from_peer(HP_ASSERTION, hp_token, tls_country, b_keys, audience, now, leeway_s)
    trc = verify_from_peer(TRC, trc_token, tls_country, b_keys, audience, now, leeway_s)
    if trc.hp_assertion_hash != token_hash(hp_token):
        raise NotBound(
            "the treatment relationship confirmation was issued under another HP assertion "
            "(ncp_hp_assertion_hash does not match the one presented)",
            jti=trc.jti,
        )
    if trc.subject != hp.subject:
        raise NotBound(
            f"the treatment relationship confirmation is for HP {trc.subject!r}, the HP "
            f"assertion for {hp.subject!r}",
            jti=trc.jti,
        )
    return RequestContext(country=tls_country, hp=hp, trc=trc)


def verify_from_peer(
    kind: TokenKind[C],
    token: str,
    tls_country: str,
    keys: KeySet | KeyResolver,
    audience: str,
    now: datetime,
    leeway_s: int,
) -> C:
    """``token`` as ``kind`` from the TLS peer's country; an issuer other than that country is a
    CountryMismatch (a node may present only its own country's assertions)."""
    try:
        return verify(
            kind, token, keys, audience=audience, issuer=tls_country, now=now, leeway_s=leeway_s
        )
    except WrongIssuer as refused:
        if refused.issuer is None or refused.issuer == tls_country:
            raise
        raise CountryMismatch(
            f"{kind.label} issued by {refused.issuer!r}, but the TLS peer is {tls_country!r}: "
            "a node may only present its own country's assertions",
            issuer=refused.issuer,
        ) from None


def image_access_for(
    context: RequestContext,
    *,
    issuer: str,
    audience: str,
    studies: Sequence[str],
    option: str,
    now: datetime,
    priority: str = "routine",
    lifetime: timedelta = IMAGE_ACCESS_LIFETIME,
) -> ImageAccess:
    """The claims of an image access token A issues under a verified pair (also on renewal).

    ``issuer``: A's country; ``audience``: the gateway that will serve the studies. The caller
    has checked that each study is the context's patient's. Expires after ``lifetime`` or with
    the pair, whichever is first.
    """
    issued, expires = _window(context, now, lifetime)
    return ImageAccess(
        issuer=issuer,
        audience=audience,
        subject=context.subject,
        issued_at=issued,
        expires_at=expires,
        requesting_country=context.country,
        patient=context.patient,
        studies=tuple(studies),
        purpose_of_use=context.purpose_of_use,
        priority=priority,
        option=option,
    )


def viewer_launch_for(
    context: RequestContext,
    *,
    issuer: str,
    audience: str,
    studies: Sequence[str],
    now: datetime,
    priority: str = "routine",
    lifetime: timedelta = VIEWER_LAUNCH_CEILING,
) -> ViewerLaunch:
    """The claims of a one-time viewer launch token (option B) under a verified pair; the
    viewer speaks the HP's preferred language."""
    issued, expires = _window(context, now, lifetime)
    return ViewerLaunch(
        issuer=issuer,
        audience=audience,
        subject=context.subject,
        issued_at=issued,
        expires_at=expires,
        requesting_country=context.country,
        patient=context.patient,
        studies=tuple(studies),
        purpose_of_use=context.purpose_of_use,
        priority=priority,
        preferred_language=context.hp.preferred_language,
        pair_expires_at=context.expires_at,
    )


def _window(
    context: RequestContext, now: datetime, lifetime: timedelta
) -> tuple[datetime, datetime]:
    issued = now.replace(microsecond=0)
    expires = min(issued + lifetime, context.expires_at)
    if expires <= issued:
        raise Expired(
            "the HP assertion or treatment relationship confirmation expires at "
            f"{context.expires_at:%Y-%m-%dT%H:%M:%SZ}; B must renew them before asking again",
            jti=context.trc.jti,
        )
    return issued, expires
