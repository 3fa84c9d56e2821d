"""Country B signs, in its health professional's name, what A asks for on every request: the HP
identity assertion (who asks, and how B authenticated them) and the treatment relationship
confirmation (TRC: this HP treats this patient, now, for this purpose), both compact JWS signed
with B's current signing key in the formats of docs/tokens.md.

B signs only what its own rules allow: the claim sets check themselves when built
(:mod:`ncp.security.claims`), so nothing is signed that A would refuse for its form. The TRC never
outlives the HP assertion it is bound to, and :class:`~ncp.consumer.model.PeerContext` says when
the earlier of the two expires: after that the HP must confirm again.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from ncp.consumer.model import PeerContext
from ncp.security.claims import (
    HP_ASSERTION,
    ISCO_08_SYSTEM,
    TRC,
    C,
    ClaimProblem,
    Coding,
    HpAssertion,
    PatientRef,
    TokenKind,
    Trc,
)
from ncp.security.keys import SigningKey
from ncp.security.keystore import KeyStore
from ncp.security.tokens import issue, token_hash

Purpose = Literal["TREAT", "ETREAT"]
"""v3 ActReason codes of eHDSI's TREATMENT and EMERGENCY (what the TRC's purpose of use says)."""
PURPOSE_NAMES: dict[str, Purpose] = {
    "TREAT": "TREAT",
    "ETREAT": "ETREAT",
    "TREATMENT": "TREAT",
    "EMERGENCY": "ETREAT",
}
"""The purposes as callers may name them: the v3 codes or eHDSI's words."""


@dataclass(frozen=True)
class HpIdentity:
    """A health professional as B authenticated them (the portal's session, or a national
    identity provider): what the HP identity assertion says on their behalf."""

    subject: str
    """The HP's identifier in B (``sub``)."""
    name: str
    role: Coding
    """Role or profession; eHDSI codes it in ISCO-08 (:func:`isco_role`)."""
    organisation: str
    organisation_id: str
    """A URI: ``urn:oid:...`` or a URL."""
    point_of_care: str
    language: str
    """BCP 47 (``nl-BE``): the language A's viewer should speak."""
    authentication: str
    """How B authenticated the HP: the assertion's ``acr`` (a URI or a name B publishes)."""
    home_community_id: str | None = None


def isco_role(code: str, display: str | None = None) -> Coding:
    """An ISCO-08 role (``221`` Medical doctors, ``2212`` Specialist medical practitioners)."""
    return Coding(ISCO_08_SYSTEM, code, display)


def purpose_code(purpose: str) -> Purpose:
    """TREAT or ETREAT from either spelling; ValueError for anything else."""
    try:
        return PURPOSE_NAMES[purpose.strip().upper()]
    except KeyError:
        raise ValueError(
            f"purpose {purpose!r}: TREAT (treatment) or ETREAT (emergency treatment)"
        ) from None


class AssertionSigner:
    """Signs B's two assertions with the key store's current signing key.

    ``lifetime`` is how long each lives (at most 2 hours, the ceiling of both kinds);
    ``clock`` gives aware UTC times.
    """

    def __init__(
        self,
        keystore: KeyStore,
        *,
        lifetime: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        ceiling = min(HP_ASSERTION.ceiling, TRC.ceiling)
        if not timedelta(0) < lifetime <= ceiling:
            raise ValueError(f"assertions live more than 0 and at most {ceiling}")
        self.keystore = keystore
        self.lifetime = lifetime
        self.clock = clock

    @property
    def country(self) -> str:
        return self.keystore.country

    def hp_assertion(self, hp: HpIdentity, audience: str) -> str:
        """The HP identity assertion for the peer whose standard channel is ``audience``.

        Raises ClaimProblem (a ValueError) when the identity breaks a rule of the claim set.
        """
        now = self.clock()
        claims = HpAssertion(
            issuer=self.country,
            audience=audience,
            subject=hp.subject,
            issued_at=now,
            expires_at=now + self.lifetime,
            subject_name=hp.name,
            subject_organization=hp.organisation,
            subject_organization_id=hp.organisation_id,
            subject_role=hp.role,
            point_of_care=hp.point_of_care,
            preferred_language=hp.language,
            home_community_id=hp.home_community_id,
            authentication_context=hp.authentication,
        )
        return issue(HP_ASSERTION, claims, self._key(), now=now)

    def trc(
        self,
        hp_assertion: str,
        patient: PatientRef,
        *,
        purpose: str,
        informed: bool,
    ) -> str:
        """The TRC bound to ``hp_assertion`` (its hash and HP), for the same audience, expiring
        no later than it. ValueError if the HP assertion is not one of ours or has expired."""
        now = self.clock()
        hp = own_claims(HP_ASSERTION, hp_assertion)
        if hp.issuer != self.country:
            raise ValueError(f"the HP assertion was issued by {hp.issuer}, not by this node")
        if hp.expires_at <= now:
            raise ValueError("the HP assertion has expired: authenticate the HP again")
        claims = Trc(
            issuer=self.country,
            audience=hp.audience,
            subject=hp.subject,
            issued_at=now,
            expires_at=min(now + self.lifetime, hp.expires_at),
            patient=patient,
            purpose_of_use=purpose_code(purpose),
            informed=informed,
            hp_assertion_hash=token_hash(hp_assertion),
        )
        return issue(TRC, claims, self._key(), now=now)

    def context(
        self,
        peer: str,
        hp_assertion: str,
        patient: PatientRef,
        *,
        purpose: str,
        informed: bool,
    ) -> PeerContext:
        """Sign a TRC under ``hp_assertion`` and return the pair as a PeerContext."""
        trc = self.trc(hp_assertion, patient, purpose=purpose, informed=informed)
        return context_of(peer, hp_assertion, trc)

    def _key(self) -> SigningKey:
        # A rotation on disk (``ncp keys rotate``) takes effect without a restart.
        self.keystore.reload_if_changed()
        return self.keystore.current_signing_key()


def context_of(peer: str, hp_assertion: str, trc: str) -> PeerContext:
    """The PeerContext of a pair B signed earlier (kept by the portal or a retrieval job)."""
    hp = own_claims(HP_ASSERTION, hp_assertion)
    confirmation = own_claims(TRC, trc)
    return PeerContext(
        peer=peer,
        hp_assertion=hp_assertion,
        trc=trc,
        patient=confirmation.patient,
        expires_at=min(hp.expires_at, confirmation.expires_at),
    )


@dataclass(frozen=True)
class Pair:
    """The claims of a PeerContext's two assertions, read back for B's own audit records."""

    hp: HpAssertion
    trc: Trc

    @property
    def purpose(self) -> Purpose:
        return purpose_code(self.trc.purpose_of_use)


def pair_of(context: PeerContext) -> Pair:
    return Pair(own_claims(HP_ASSERTION, context.hp_assertion), own_claims(TRC, context.trc))


def own_claims(kind: TokenKind[C], token: str) -> C:
    """The claims of a token B signed itself, read without verifying the signature (B made it;
    A verifies it). ValueError when it is not a readable token of ``kind``."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise ValueError(f"not a compact {kind.label}: three base64url parts expected")
    try:
        header = json.loads(_unb64(parts[0]))
        payload = json.loads(_unb64(parts[1]))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"not a readable {kind.label}: {exc}") from None
    typ = header.get("typ") if isinstance(header, dict) else None
    if typ != kind.typ:
        raise ValueError(f"not {kind.label}: typ {typ!r}")
    if not isinstance(payload, dict):
        raise ValueError(f"not a readable {kind.label}: the payload is not a JSON object")
    try:
        return kind.claims_type.from_payload(payload)
    except ClaimProblem as exc:
        raise ValueError(f"{kind.label}: {exc}") from None


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
