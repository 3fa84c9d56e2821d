"""Keys, claim sets and hand-built tokens for the token tests.

Two countries: A (AT) holds the patient and issues access tokens; B (BE) issues the HP assertion
and the TRC. A third (DE) plays a country that is not the TLS peer. Keys live in memory.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ncp.security.claims import (
    HP_ASSERTION,
    IMAGE_ACCESS,
    ISCO_08_SYSTEM,
    TRC,
    Coding,
    HpAssertion,
    ImageAccess,
    PatientRef,
    TokenKind,
    Trc,
    ViewerLaunch,
)
from ncp.security.keys import KeySet, PublicKey, SigningKey
from ncp.security.replay import MemoryReplayGuard
from ncp.security.tokens import issue, token_hash, verify

NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
A, B, OTHER = "AT", "BE", "DE"
A_NODE = "https://ncp.at.example/fhir"
"""A's standard channel: the audience of B's assertions."""
GATEWAY = "https://gw.at.example/dicomweb"
VIEWER = "https://viewer.at.example/launch"
PATIENT = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT200")
OTHER_PATIENT = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT201")
STUDY = "1.2.826.0.1.3680043.10.1.1"
STUDY_2 = "1.2.826.0.1.3680043.10.1.2"
OTHER_STUDY = "1.2.826.0.1.3680043.10.9.9"
HP_ID = "BE-HP-0042"


def new_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()))


def key_set(issuer: str, *keys: SigningKey, not_after: datetime | None = None) -> KeySet:
    return KeySet(
        issuer, {k.kid: PublicKey(k.kid, k.private_key.public_key(), not_after) for k in keys}
    )


A_KEY = new_key("at-2026-11")
B_KEY = new_key("be-2026-11")
OTHER_KEY = new_key("de-2026-11")
A_KEYS = key_set(A, A_KEY)
B_KEYS = key_set(B, B_KEY)
OTHER_KEYS = key_set(OTHER, OTHER_KEY)
TRUST = {B: B_KEYS, OTHER: OTHER_KEYS}
"""Peers' keys by country, as A's trust list resolves them."""


def b_resolver(country: str) -> KeySet | None:
    return TRUST.get(country)


def hp_claims(now: datetime = NOW, **changes: Any) -> HpAssertion:
    claims = HpAssertion(
        issuer=B,
        audience=A_NODE,
        subject=HP_ID,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        subject_name="Dr. Anne Peeters",
        subject_organization="UZ Leuven",
        subject_organization_id="urn:oid:2.16.56.1.1.1.1",
        subject_role=Coding(ISCO_08_SYSTEM, "221", "Medical doctors"),
        point_of_care="Radiology, Gasthuisberg",
        preferred_language="nl-BE",
        home_community_id="urn:oid:2.16.56.1.1",
    )
    return replace(claims, **changes)


def trc_claims(hp_token: str, now: datetime = NOW, **changes: Any) -> Trc:
    claims = Trc(
        issuer=B,
        audience=A_NODE,
        subject=HP_ID,
        issued_at=now,
        expires_at=now + timedelta(hours=2),
        patient=PATIENT,
        purpose_of_use="TREAT",
        informed=True,
        hp_assertion_hash=token_hash(hp_token),
    )
    return replace(claims, **changes)


def image_claims(now: datetime = NOW, **changes: Any) -> ImageAccess:
    claims = ImageAccess(
        issuer=A,
        audience=GATEWAY,
        subject=HP_ID,
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
        requesting_country=B,
        patient=PATIENT,
        studies=(STUDY, STUDY_2),
        purpose_of_use="TREAT",
        priority="urgent",
        option="A",
    )
    return replace(claims, **changes)


def launch_claims(now: datetime = NOW, **changes: Any) -> ViewerLaunch:
    claims = ViewerLaunch(
        issuer=A,
        audience=VIEWER,
        subject=HP_ID,
        issued_at=now,
        expires_at=now + timedelta(seconds=60),
        requesting_country=B,
        patient=PATIENT,
        studies=(STUDY,),
        purpose_of_use="TREAT",
        preferred_language="nl-BE",
    )
    return replace(claims, **changes)


# --- hand-built tokens -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def es256(signing_input: bytes, key: SigningKey) -> str:
    der = key.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def sign_raw(
    header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, key: SigningKey
) -> str:
    """A correctly ES256-signed token over any header and payload bytes, however wrong."""
    head = header if isinstance(header, bytes) else encode_json(header)
    body = payload if isinstance(payload, bytes) else encode_json(payload)
    signing_input = f"{b64(head)}.{b64(body)}"
    return f"{signing_input}.{es256(signing_input.encode('ascii'), key)}"


def header_for(typ: str, key: SigningKey, **extra: Any) -> dict[str, Any]:
    return {"alg": "ES256", "typ": typ, "kid": key.kid, **extra}


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    head, body, signature = token.split(".")
    return json.loads(unb64(head)), json.loads(unb64(body)), signature


# --- one sample of each kind ---------------------------------------------------------------------

HP_TOKEN = issue(HP_ASSERTION, hp_claims(), B_KEY, now=NOW)
"""A signed HP assertion, for TRCs to be bound to."""


def sample(kind: TokenKind[Any]) -> tuple[Any, SigningKey, KeySet, str, str]:
    """Claims of ``kind`` with the key that signs them, the key set, audience and issuer."""
    if kind is HP_ASSERTION:
        return hp_claims(), B_KEY, B_KEYS, A_NODE, B
    if kind is TRC:
        return trc_claims(HP_TOKEN), B_KEY, B_KEYS, A_NODE, B
    if kind is IMAGE_ACCESS:
        return image_claims(), A_KEY, A_KEYS, GATEWAY, A
    return launch_claims(), A_KEY, A_KEYS, VIEWER, A


def check(kind: TokenKind[Any], token: str, now: datetime = NOW, **options: Any) -> Any:
    """Verify ``token`` as ``kind`` where the sample of that kind belongs (a fresh replay guard
    for one-time kinds)."""
    _, _, keys, audience, issuer = sample(kind)
    if kind.one_time and "replay" not in options:
        options["replay"] = MemoryReplayGuard()
    return verify(kind, token, keys, audience=audience, issuer=issuer, now=now, **options)
