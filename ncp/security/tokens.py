"""Issue and verify the signed objects of ``ncp``: compact JWS (RFC 7515) JWTs, profiled by
RFC 8725 (JWT best current practice).

``issue`` signs a claim set of ``ncp.security.claims`` with ES256; ``verify`` accepts a token
only if every rule holds, in this order (each failure is its own ``TokenError`` type):

1. at most ``MAX_TOKEN_CHARS`` characters, counted before anything is decoded (``TooLarge``);
2. three base64url parts, canonical encoding, UTF-8 JSON objects with no member twice
   (``Malformed``);
3. header: ``alg`` exactly ES256 (``AlgorithmNotAllowed``), ``typ`` the kind's own
   (``WrongType``), a ``kid``; no ``crit``, no key carried in the token (``Malformed``);
4. ``iss`` one of the allowed issuers (``WrongIssuer``), ``kid`` one of that issuer's keys, not
   withdrawn (``KeyNotFound``, ``KeyWithdrawn``), a key for which ES256 is allowed;
5. the signature (``BadSignature``);
6. ``aud`` exactly the expected recipient (``WrongAudience``), the claims of the kind
   (``InvalidClaim``), ``iat``/``nbf`` not in the future and ``exp`` not past, each give or take
   the leeway (``NotYetValid``, ``Expired``), the lifetime within the kind's limit;
7. the caller's own rules on the claims, if it passes any (``ncp.security.access``: study
   covered, patient);
8. for one-time kinds, a ``jti`` not seen before (``Replayed``).

docs/tokens.md has the claim tables and the reasons.

Why the compact form is read here and not by pyjwt (which signs): pyjwt keeps the last of two
members with one name, decodes base64url leniently (characters outside the alphabet are
dropped), and reports its checks as a few generic exceptions. A security token with two ``sub``
members, or a second token that differs only in ignored characters, must be refused, and each
refusal must say which rule it broke. The signature itself is checked by ``cryptography``.

``jti`` is put on an error only once the signature has verified, so an audit record never
quotes an identifier an attacker chose.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ncp.errors import NcpError
from ncp.security.claims import (
    C,
    ClaimProblem,
    Claims,
    TokenKind,
    a,
    kind_for_typ,
    normalise_typ,
    span_text,
)
from ncp.security.keys import KeySet, PublicKey, SigningKey
from ncp.security.replay import ReplayGuard

MAX_TOKEN_CHARS = 8192
"""Longest token read. Ours stay under 7 KB even with MAX_STUDIES 64-character UIDs and every
string at MAX_TEXT ASCII characters (non-ASCII text costs up to 4 bytes a character); anything
longer is refused before decoding, so a large input costs no parsing (and no JSON recursion)."""

ALGORITHM = "ES256"
"""The only algorithm, pinned rather than read from the token (RFC 8725 3.1): a verifier that
follows the header can be told ``none`` (no signature) or ``HS256`` with the public key as the
HMAC secret. Every node signs with an EC P-256 key, so ES256 is the one algorithm any key here
allows; a gateway holds public keys only and no secret that could sign."""

DEFAULT_LEEWAY_S = 30
"""Clock skew tolerated on ``exp``, ``nbf`` and ``iat``. Nodes keep time by NTP (IUA groups its
actors with a time client), but two countries' clocks still differ by seconds; 30 s absorbs that
and is small beside a 5-minute token. More than MAX_LEEWAY_S is refused as configuration."""
MAX_LEEWAY_S = 60

KeyResolver = Callable[[str], KeySet | None]
"""Keys by issuer: called with the token's ``iss`` once it is an allowed issuer; None if unknown."""

_FORBIDDEN_HEADERS = ("jwk", "jku", "x5u", "x5c")
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")
_B64URL_VALUE = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
_SPARE_BITS = (0, 0, 0b1111, 0b11)  # by segment length mod 4 (1 is refused before)
_AUDIT_PREFIX = "urn:ietf:params:oauth:jti:"


# --- errors ------------------------------------------------------------------------------------


class TokenError(NcpError):
    """A token or assertion was refused. The message says which rule and why; ``jti`` is the
    token's id once its signature verified (for audit), else None."""

    def __init__(self, message: str, *, jti: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.jti = jti

    @property
    def audit_policy(self) -> str | None:
        """The token id as IHE BALP records it (``urn:ietf:params:oauth:jti:<jti>``)."""
        return None if self.jti is None else _AUDIT_PREFIX + self.jti

    def __str__(self) -> str:
        return self.message if self.jti is None else f"{self.message} [jti {self.jti}]"


class TooLarge(TokenError):
    """Longer than MAX_TOKEN_CHARS; refused without being decoded."""


class Malformed(TokenError):
    """Not a well-formed compact JWS of ours: parts, base64url, JSON, duplicate members,
    forbidden header parameters."""


class InvalidClaim(Malformed):
    """Well-formed and signed, but a claim is missing or breaks a rule of its kind."""


class AlgorithmNotAllowed(TokenError):
    """``alg`` is not ES256, or the key is not one ES256 may use."""


class WrongType(TokenError):
    """``typ`` is not the kind expected: one kind of object presented as another."""


class WrongIssuer(TokenError):
    """``iss`` is not an issuer this verifier accepts."""

    def __init__(self, message: str, *, issuer: str | None = None, jti: str | None = None):
        super().__init__(message, jti=jti)
        self.issuer = issuer


class KeyNotFound(TokenError):
    """No key of the issuer has this ``kid``. The caller may refresh the issuer's JWKS once and
    verify again (the issuer may have rotated); a second KeyNotFound is final."""

    def __init__(self, message: str, *, kid: str | None, issuer: str | None) -> None:
        super().__init__(message)
        self.kid = kid
        self.issuer = issuer


class KeyWithdrawn(TokenError):
    """The key is known but its ``not_after`` has passed: what it signed is no longer valid.
    Refreshing the key set does not help, unlike KeyNotFound."""


class BadSignature(TokenError):
    """The signature does not verify: the token was altered or signed by another key."""


class Expired(TokenError):
    """``exp`` has passed (beyond the leeway)."""


class NotYetValid(TokenError):
    """``nbf`` or ``iat`` lies in the future (beyond the leeway)."""


class WrongAudience(TokenError):
    """``aud`` is not exactly this recipient."""


class Replayed(TokenError):
    """A one-time token presented a second time."""


class StudyNotCovered(TokenError):
    """The token does not name the study asked for."""


class PatientMismatch(TokenError):
    """The token's patient is not the patient of the study or request."""


# --- issuing -----------------------------------------------------------------------------------


def issue(
    kind: TokenKind[C],
    claims: C,
    key: SigningKey,
    *,
    now: datetime,
    max_lifetime: timedelta | None = None,
) -> str:
    """Sign ``claims`` as a token of ``kind`` (header ``alg`` ES256, ``typ``, ``kid``).

    Strict: the claims must be of the kind's type, issued no later than ``now``, not expired at
    ``now``, and within the kind's lifetime limit, so nothing is signed that a verifier with the
    same settings would refuse. Raises ClaimProblem (a ValueError) otherwise.
    """
    if type(claims) is not kind.claims_type:
        raise TypeError(f"{a(kind.label)} needs {kind.claims_type.__name__} claims")
    _require_aware(now)
    limit = kind.max_lifetime(max_lifetime)
    if claims.lifetime > limit:
        raise ClaimProblem("exp", f"{a(kind.label)} may live at most {span_text(limit)} here")
    if claims.issued_at > now:
        raise ClaimProblem("iat", "lies after the time of issue")
    if claims.expires_at <= now:
        raise ClaimProblem("exp", "has already passed")
    private = key.private_key
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError(f"key {key.kid!r} is not an EC P-256 key; ES256 needs one")
    payload = json.dumps(claims.to_payload(), separators=(",", ":"), ensure_ascii=False)
    return jwt.api_jws.encode(
        payload.encode("utf-8"),
        private,
        algorithm=ALGORITHM,
        headers={"typ": kind.typ, "kid": key.kid},
    )


def token_hash(token: str) -> str:
    """base64url SHA-256 of a compact token: how a TRC names the HP assertion it is bound to."""
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# --- verifying ---------------------------------------------------------------------------------


def verify(
    kind: TokenKind[C],
    token: str,
    keys: KeySet | KeyResolver,
    *,
    audience: str,
    issuer: str | Collection[str],
    now: datetime,
    leeway_s: int = DEFAULT_LEEWAY_S,
    replay: ReplayGuard | None = None,
    max_lifetime: timedelta | None = None,
    check: Callable[[C], None] | None = None,
) -> C:
    """The claims of ``token`` if it is a valid ``kind`` for ``audience``, else a TokenError.

    ``keys``: the issuer's KeySet, or a resolver from ``iss`` to KeySet (the trust list).
    ``issuer``: the issuer or issuers accepted, compared exactly. ``replay``: required for
    one-time kinds; given for another kind, it makes that token one-time too.
    ``max_lifetime``: the kind's limit, when a node configures one (up to the kind's ceiling).
    ``check``: the caller's own rules on the verified claims (study covered, patient), run
    before a one-time token is used up, so a token refused by them can still be used rightly.
    """
    _require_aware(now)
    if not 0 <= leeway_s <= MAX_LEEWAY_S:
        raise ValueError(f"leeway_s must be between 0 and {MAX_LEEWAY_S}")
    if kind.one_time and replay is None:
        raise ValueError(f"{kind.label}s are one-time: verifying one needs a ReplayGuard")
    limit = kind.max_lifetime(max_lifetime)
    allowed = {issuer} if isinstance(issuer, str) else set(issuer)

    parts = _split(token)
    header = _decode_header(parts[0])
    kid = _check_header(kind, header)
    payload = _json_object(_b64decode(parts[1], "payload"), "payload")

    # Unverified until step 5, used only to choose the keys; a refusal here quotes no jti.
    iss = payload.get("iss")
    if iss is None:
        raise WrongIssuer(f"{kind.label} names no issuer (iss); expected {_one_of(allowed)}")
    if not isinstance(iss, str) or iss not in allowed:
        raise WrongIssuer(
            f"{kind.label} issued by {_quote(iss)}, not by {_one_of(allowed)}",
            issuer=iss if isinstance(iss, str) else None,
        )
    public = _public_key(keys, iss, kid, now)
    _check_signature(public, token, parts)

    raw_jti = payload.get("jti")
    jti = raw_jti if isinstance(raw_jti, str) and 0 < len(raw_jti) <= 128 else None
    _check_audience(kind, payload.get("aud"), audience, jti)
    try:
        claims = kind.claims_type.from_payload(payload)
    except ClaimProblem as problem:
        raise InvalidClaim(f"{kind.label}: {problem}", jti=jti) from None

    now_s = now.timestamp()
    if claims.issued_at.timestamp() > now_s + leeway_s:
        raise NotYetValid(
            f"{kind.label} issued at {_iso(claims.issued_at)}, in the future (now "
            f"{_iso(now)}, leeway {leeway_s} s): the issuer's clock is wrong",
            jti=claims.jti,
        )
    if claims.valid_from.timestamp() > now_s + leeway_s:
        raise NotYetValid(
            f"{kind.label} valid from {_iso(claims.valid_from)} only (now {_iso(now)}, "
            f"leeway {leeway_s} s)",
            jti=claims.jti,
        )
    if now_s >= claims.expires_at.timestamp() + leeway_s:
        raise Expired(
            f"{kind.label} expired at {_iso(claims.expires_at)} (now {_iso(now)}, leeway "
            f"{leeway_s} s)",
            jti=claims.jti,
        )
    if claims.lifetime > limit:
        raise InvalidClaim(
            f"{kind.label} lives {span_text(claims.lifetime)}, longer than the "
            f"{span_text(limit)} allowed here",
            jti=claims.jti,
        )
    if check is not None:
        check(claims)
    if replay is not None and replay.seen_before(
        claims.jti, claims.expires_at + timedelta(seconds=leeway_s), now=now
    ):
        raise Replayed(f"{kind.label} was already used once; it is one-time", jti=claims.jti)
    return claims


def token_kind(token: str) -> TokenKind[Any]:
    """The kind a token's ``typ`` header names (unverified: for choosing how to verify it)."""
    header = _decode_header(_split(token)[0])
    typ = header.get("typ")
    kind = kind_for_typ(typ) if isinstance(typ, str) else None
    if kind is None:
        raise WrongType(f"typ {_quote(typ)} names no kind of token this node knows")
    return kind


# --- the steps ---------------------------------------------------------------------------------


def _split(token: str) -> list[str]:
    if not isinstance(token, str):
        raise Malformed("a token is a string of three base64url parts")
    if len(token) > MAX_TOKEN_CHARS:
        raise TooLarge(
            f"token of {len(token)} characters refused unread: at most {MAX_TOKEN_CHARS}"
        )
    parts = token.split(".")
    if len(parts) != 3:
        hint = " (an encrypted JWE: not accepted)" if len(parts) == 5 else ""
        raise Malformed(f"a compact JWS has 3 dot-separated parts, this has {len(parts)}{hint}")
    return parts


def _decode_header(segment: str) -> dict[str, Any]:
    return _json_object(_b64decode(segment, "header"), "header")


def _check_header(kind: TokenKind[Any], header: Mapping[str, Any]) -> str:
    alg = header.get("alg")
    if alg != ALGORITHM:
        why = (
            "unsigned tokens are never accepted"
            if alg in ("none", "None", "NONE")
            else ("only ES256 with the issuer's EC P-256 key is")
        )
        raise AlgorithmNotAllowed(f"alg {_quote(alg)} is not allowed: {why}")
    typ = header.get("typ")
    if not isinstance(typ, str):
        raise WrongType(f"no typ header: {a(kind.label)} must say typ {kind.typ!r}")
    if normalise_typ(typ) != kind.typ:
        other = kind_for_typ(typ)
        found = f"{a(other.label)} (typ {typ!r})" if other else f"typ {_quote(typ)}"
        raise WrongType(f"{found} is not {a(kind.label)} (typ {kind.typ!r})")
    if "crit" in header:
        raise Malformed("header lists crit extensions; none are understood here")
    carried = [name for name in _FORBIDDEN_HEADERS if name in header]
    if carried:
        raise Malformed(
            f"header carries a key ({', '.join(carried)}): keys in a token are never used, "
            "the issuer's published keys decide"
        )
    if header.get("b64", True) is not True:
        raise Malformed("unencoded payloads (b64 false) are not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise Malformed("header has no kid naming the signing key")
    return kid


def _public_key(keys: KeySet | KeyResolver, iss: str, kid: str, now: datetime) -> PublicKey:
    keyset = keys if isinstance(keys, KeySet) else keys(iss)
    if keyset is None:
        raise KeyNotFound(f"no keys are known for issuer {iss!r}", kid=kid, issuer=iss)
    if keyset.issuer != iss:
        # A resolver or caller handed over another issuer's keys: never verify across issuers.
        raise WrongIssuer(
            f"token issued by {iss!r} cannot be verified with the keys of {keyset.issuer!r}",
            issuer=iss,
        )
    key = keyset.get(kid)
    if key is None:
        known = ", ".join(sorted(keyset.keys)[:5]) or "none"
        raise KeyNotFound(
            f"no key {_quote(kid)} among the keys of issuer {iss!r} (known: {known}); if it "
            "rotated its keys, refresh its key set once and verify again",
            kid=kid,
            issuer=iss,
        )
    if key.not_after is not None and now > key.not_after:
        raise KeyWithdrawn(
            f"key {kid!r} of issuer {iss!r} was withdrawn at {_iso(key.not_after)}; "
            "what it signed is no longer accepted"
        )
    if ALGORITHM not in _algorithms_for(key):
        raise AlgorithmNotAllowed(f"key {kid!r} of {iss!r} is not an EC P-256 key; ES256 needs one")
    return key


def _algorithms_for(key: PublicKey) -> frozenset[str]:
    """The allow-list of one key: its type decides, never the token (RFC 8725 3.1)."""
    public = key.public_key
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
        return frozenset({"ES256"})
    return frozenset()


def _check_signature(key: PublicKey, token: str, parts: list[str]) -> None:
    signature = _b64decode(parts[2], "signature")
    if len(signature) != 64:
        raise BadSignature(
            f"an ES256 signature is 64 bytes (r and s), this one is {len(signature)}"
        )
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    signing_input = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
    try:
        key.public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadSignature(
            f"signature does not verify with key {key.kid!r}: the token was altered or "
            "signed with another key"
        ) from None


def _check_audience(kind: TokenKind[Any], aud: object, audience: str, jti: str | None) -> None:
    # Exact string comparison: no prefix, suffix, case or trailing-slash tolerance, so a token
    # for https://gw.a.example/dicomweb is not one for https://gw.a.example/dicomweb-test.
    # A list of one is the same audience (RFC 7519 4.1.3); several recipients are refused.
    if isinstance(aud, list):
        if len(aud) != 1:
            raise WrongAudience(
                f"{kind.label} names {len(aud)} audiences; tokens here name exactly one recipient",
                jti=jti,
            )
        aud = aud[0]
    if aud is None:
        raise WrongAudience(
            f"{kind.label} names no audience (aud); it must be {audience!r}", jti=jti
        )
    if aud != audience:
        raise WrongAudience(f"{kind.label} is for {_quote(aud)}, not for {audience!r}", jti=jti)


def _b64decode(segment: str, part: str) -> bytes:
    if not _B64URL.match(segment) or len(segment) % 4 == 1:
        raise Malformed(f"{part} is not base64url (RFC 7515: alphabet A-Z a-z 0-9 - _, no '=')")
    # The last character of a segment whose length is 2 or 3 mod 4 has spare bits; set, they
    # spell the same bytes a second way. Only the canonical spelling (spare bits zero) is read.
    spare = _SPARE_BITS[len(segment) % 4]
    if spare and _B64URL_VALUE[segment[-1]] & spare:
        raise Malformed(f"{part} is not canonical base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class _Duplicate(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Duplicate(name)
            seen.add(name)
    return members


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for all tokens: json.loads with options would build a new one on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    # RFC 7515 4 / RFC 8725 3.12: duplicate member names make a token ambiguous (one reader
    # takes the first, another the last), so they are refused, in the header and the claims.
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except _Duplicate as duplicate:
        raise Malformed(f"{part} has member {_quote(duplicate.name)} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Malformed(f"{part} is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"{part} is not a JSON object")
    try:
        # A lone surrogate ("\\ud800") is valid JSON syntax but not Unicode text: such a claim
        # could be neither audited nor answered, whoever signed it.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed(f"{part} holds a string that is not Unicode text") from None
    return value


# --- small helpers -----------------------------------------------------------------------------


def _require_aware(now: datetime) -> None:
    if now.utcoffset() is None:
        raise ValueError("now must be an aware datetime (UTC)")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quote(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_of(names: Collection[str]) -> str:
    ordered = sorted(names)
    return repr(ordered[0]) if len(ordered) == 1 else "any of " + ", ".join(map(repr, ordered))


__all__ = [
    "ALGORITHM",
    "DEFAULT_LEEWAY_S",
    "MAX_TOKEN_CHARS",
    "AlgorithmNotAllowed",
    "BadSignature",
    "Claims",
    "Expired",
    "InvalidClaim",
    "KeyNotFound",
    "KeyResolver",
    "KeyWithdrawn",
    "Malformed",
    "NotYetValid",
    "PatientMismatch",
    "Replayed",
    "StudyNotCovered",
    "TokenError",
    "TooLarge",
    "WrongAudience",
    "WrongIssuer",
    "WrongType",
    "issue",
    "token_hash",
    "token_kind",
    "verify",
]
