"""Who may ask what on the standard channel: FastAPI dependencies that fail closed.

- :func:`hp_context`: a trusted peer (mutual TLS, trust list) and a valid HP identity assertion
  from that same country (``Authorization: Bearer``), for patient identification.
- :func:`patient_context`: the same plus a treatment relationship confirmation
  (``NCP-Treatment-Relationship``) bound to that assertion, for every patient-level request.
- :func:`national_system`: a client certificate of this node's own country, issued by its own
  CA, for report ingest; peers are refused.

Every refusal is an audit record (``refusal``, serious failure, the typed error's message as the
reason and its class as the rule, the token's jti once its signature verified) and a
FhirHttpError: 401 with ``WWW-Authenticate: Bearer error="invalid_token"`` when an assertion is
missing or invalid, 403 when the caller is known but not allowed (another country's assertion,
a confirmation bound to another assertion, another patient, a peer at the ingest endpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from ncp.audit.models import Action, Outcome
from ncp.fhir.http import FhirHttpError
from ncp.node import Node, node_of
from ncp.provider.auditing import audit
from ncp.security.claims import HP_ASSERTION, HpAssertion
from ncp.security.keystore import subject_country
from ncp.security.mtls import TlsPeerRefused, client_certificate, tls_peer
from ncp.security.pair import (
    CountryMismatch,
    NotBound,
    RequestContext,
    check_request_pair,
    verify_from_peer,
)
from ncp.security.tokens import (
    KeyNotFound,
    PatientMismatch,
    TokenError,
)
from ncp.security.trust import JwksUnavailable, Peer, UnknownPeer, issued_by

TRC_HEADER = "NCP-Treatment-Relationship"
HP_LABEL = "HP identity assertion (Authorization: Bearer)"
TRC_LABEL = f"treatment relationship confirmation ({TRC_HEADER})"

# Known caller, not allowed: 403. Every other token error means "not a valid assertion": 401.
_FORBIDDEN: tuple[type[TokenError], ...] = (CountryMismatch, NotBound, PatientMismatch)

T = TypeVar("T")


@dataclass(frozen=True)
class HpContext:
    """A verified HP identity assertion from the country at the other end of the mutual TLS."""

    country: str
    hp: HpAssertion

    @property
    def subject(self) -> str:
        return self.hp.subject


# --- refusing ------------------------------------------------------------------------------------


async def refuse(
    request: Request,
    status: int,
    code: str,
    reason: str,
    *,
    rule: str,
    peer_country: str | None = None,
    jti: str | None = None,
    bearer: bool = False,
) -> FhirHttpError:
    """Audit a refusal of this request and return the error to raise. If the audit record
    cannot be written, the 500 of :func:`audit` is raised instead (fail closed)."""
    details: dict[str, object] = {"rule": rule, "status": status}
    if jti is not None:
        details["policy"] = f"urn:ietf:params:oauth:jti:{jti}"
    await run_in_threadpool(
        lambda: audit(
            request,
            action=Action.REFUSAL,
            outcome=Outcome.SERIOUS_FAILURE,
            context=None,
            reason=reason[:2000],
            peer_country=peer_country,
            token_jti=jti,
            details=details,
        )
    )
    headers = {}
    if bearer and status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="ncp", error="invalid_token"'
    return FhirHttpError(status, code, reason, headers=headers)


async def _refuse_token(
    request: Request, exc: TokenError, label: str, country: str
) -> FhirHttpError:
    status = 403 if isinstance(exc, _FORBIDDEN) else 401
    return await refuse(
        request,
        status,
        "forbidden" if status == 403 else "security",
        f"{label} refused: {exc.message}",
        rule=type(exc).__name__,
        peer_country=country,
        jti=exc.jti,
        bearer=True,
    )


async def _peer(request: Request) -> Peer:
    """The mutual TLS peer (``ncp.security.mtls.tls_peer``), its refusals audited here with the
    request's correlation id."""
    try:
        return await tls_peer(request)
    except TlsPeerRefused as exc:
        raise await refuse(
            request, exc.status, "security", exc.diagnostics, rule="MutualTls"
        ) from None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return ""
    return value.strip()


async def _require_bearer(request: Request, country: str) -> str:
    token = _bearer(request)
    if not token:
        why = "no" if token is None else "a malformed"
        raise await refuse(
            request,
            401,
            "security",
            f"{why} Authorization header: send 'Authorization: Bearer <HP identity assertion>' "
            "signed by your node",
            rule="MissingAssertion",
            peer_country=country,
            bearer=True,
        )
    return token


# --- verifying -----------------------------------------------------------------------------------


def _with_key_refresh(node: Node, country: str, check: Callable[[], T]) -> T:
    """Run ``check``; if it fails on an unknown kid of the peer, refresh the peer's keys once
    (the trust list limits how often) and run it again: the peer may have rotated."""
    try:
        return check()
    except KeyNotFound as exc:
        if exc.issuer != country or exc.kid is None:
            raise
        try:
            node.trust.key_set(country, kid=exc.kid)
        except (JwksUnavailable, UnknownPeer):
            raise exc from None
        return check()


def verify_hp_assertion(
    node: Node, token: str, country: str, now: datetime | None = None
) -> HpAssertion:
    """The HP assertion's claims, if ``token`` is one issued by ``country`` for this node."""
    leeway = node.settings.tokens.leeway_s

    def check() -> HpAssertion:
        return verify_from_peer(
            HP_ASSERTION,
            token,
            country,
            node.trust.keys_for,
            node.settings.urls.standard,
            now or node.clock(),
            leeway,
        )

    return _with_key_refresh(node, country, check)


def _check_pair(
    node: Node, hp_token: str, trc_token: str, country: str, now: datetime | None = None
) -> RequestContext:
    return _with_key_refresh(
        node,
        country,
        lambda: check_request_pair(
            hp_token,
            trc_token,
            tls_country=country,
            b_keys=node.trust.keys_for,
            audience=node.settings.urls.standard,
            now=now or node.clock(),
            leeway_s=node.settings.tokens.leeway_s,
        ),
    )


@dataclass(frozen=True)
class _PairRefused:
    """Why :func:`_verify_pair` refused: a token's error under its label, or (``error`` None)
    a valid HP assertion without a TRC."""

    label: str
    error: TokenError | None


def _verify_pair(
    node: Node, hp_token: str, trc_token: str, country: str
) -> RequestContext | _PairRefused:
    """The request's pair, checked in one trip to a worker thread: from the node's memory of
    pairs verified before (``ncp.security.verified``) when these exact bytes passed and nothing
    that could change the verdict has changed; else in full (the HP assertion first, so each
    refusal names the token at fault), remembered when it passes."""
    now = node.clock()
    remembered = node.verified_pairs
    audience = node.settings.urls.standard
    leeway = node.settings.tokens.leeway_s
    if trc_token:
        known = remembered.get(
            hp_token,
            trc_token,
            tls_country=country,
            keys=node.trust.keys_for,
            audience=audience,
            now=now,
            leeway_s=leeway,
        )
        if known is not None:
            return known
    try:
        verify_hp_assertion(node, hp_token, country, now)
    except TokenError as exc:
        return _PairRefused(HP_LABEL, exc)
    if not trc_token:
        return _PairRefused(TRC_LABEL, None)
    try:
        context = _check_pair(node, hp_token, trc_token, country, now)
    except TokenError as exc:
        return _PairRefused(TRC_LABEL, exc)
    remembered.put(
        hp_token,
        trc_token,
        context,
        tls_country=country,
        keys=node.trust.keys_for,
        audience=audience,
        checked_at=now,
        leeway_s=leeway,
    )
    return context


# --- the dependencies ----------------------------------------------------------------------------


async def hp_context(request: Request) -> HpContext:
    """A trusted peer with a valid HP identity assertion of its own country, or a refusal."""
    node = node_of(request)
    peer = await _peer(request)
    token = await _require_bearer(request, peer.country)
    try:
        hp = await run_in_threadpool(verify_hp_assertion, node, token, peer.country)
    except TokenError as exc:
        raise await _refuse_token(request, exc, HP_LABEL, peer.country) from None
    context = HpContext(country=peer.country, hp=hp)
    request.state.auth_context = context
    return context


async def patient_context(request: Request) -> RequestContext:
    """A trusted peer with a valid HP assertion and a treatment relationship confirmation bound
    to it (``ncp.security.pair.check_request_pair``), or a refusal. The route still checks that
    what it serves is the confirmation's patient (``RequestContext.require_patient``)."""
    node = node_of(request)
    peer = await _peer(request)
    hp_token = await _require_bearer(request, peer.country)
    trc_token = request.headers.get(TRC_HEADER, "").strip()
    checked = await run_in_threadpool(_verify_pair, node, hp_token, trc_token, peer.country)
    if isinstance(checked, _PairRefused):
        if checked.error is not None:
            raise await _refuse_token(
                request, checked.error, checked.label, peer.country
            ) from None
        raise await refuse(
            request,
            401,
            "security",
            f"no treatment relationship confirmation: patient-level requests carry "
            f"'{TRC_HEADER}: <TRC>' issued under the HP identity assertion",
            rule="MissingConfirmation",
            peer_country=peer.country,
            bearer=True,
        )
    context = checked
    request.state.auth_context = context
    return context


async def national_system(request: Request) -> Peer:
    """A client certificate of this node's own country, issued by its own CA (a national system
    feeding the report store). Peers, however trusted, are refused: ingest is not theirs."""
    node = node_of(request)
    cert = client_certificate(request.scope)
    if cert is None:
        raise await refuse(
            request,
            401,
            "security",
            "no client certificate: report ingest requires mutual TLS with a certificate of "
            "this node's own CA",
            rule="MutualTls",
        )
    if _own_national_system(node, cert):
        return Peer(country=node.country, standard=node.base_url)
    now = node.clock()
    own = any(issued_by(cert, ca) for ca in node.keystore.ca_certificates)
    valid = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    peer = node.trust.peer_for_certificate(cert)
    if peer is not None:
        reason = (
            f"report ingest is for the national systems of {node.country} only; "
            f"peer {peer.country} may not submit reports"
        )
    elif own and not valid:
        reason = "the client certificate is outside its validity"
    else:
        reason = (
            f"the client certificate ({cert.subject.rfc4514_string()}) is not one of "
            f"{node.country}'s own CA for its country"
        )
    raise await refuse(
        request,
        403,
        "forbidden",
        reason,
        rule="NationalSystemOnly",
        peer_country=peer.country if peer is not None else None,
    )


async def channel_client(request: Request) -> Peer:
    """A caller the standard channel serves at all: a trusted peer (:func:`tls_peer`: a
    certificate of its CA naming its country, once) or a national system of this node's own
    country. Anyone else whose certificate passed the handshake (another country's subject
    under a peer's CA, no country, two countries) is refused 403 and audited: the
    CapabilityStatement and the OpenAPI document are for callers of this channel only."""
    node = node_of(request)
    cert = client_certificate(request.scope)
    if cert is not None and _own_national_system(node, cert):
        return Peer(country=node.country, standard=node.base_url)
    return await _peer(request)


def _own_national_system(node: Node, cert: Any) -> bool:
    now = node.clock()
    return (
        any(issued_by(cert, ca) for ca in node.keystore.ca_certificates)
        and cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        and subject_country(cert) == node.country
    )


HpDep = Annotated[HpContext, Depends(hp_context)]
PatientDep = Annotated[RequestContext, Depends(patient_context)]
NationalSystemDep = Annotated[Peer, Depends(national_system)]

__all__ = [
    "HP_LABEL",
    "TRC_HEADER",
    "TRC_LABEL",
    "HpContext",
    "HpDep",
    "NationalSystemDep",
    "PatientDep",
    "channel_client",
    "hp_context",
    "national_system",
    "patient_context",
    "refuse",
    "verify_hp_assertion",
]
