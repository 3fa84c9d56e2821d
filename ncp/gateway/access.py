"""From an ``Authorization`` header to an :class:`AccessGrant`, through the one verifier.

Only ``Authorization: Bearer <token>`` is read (RFC 6750 2.1): a token in the query string
would land in access logs and browser histories. Refusals follow RFC 6750 3:

- no token: 401, ``WWW-Authenticate: Bearer realm="<gateway>"`` (no error code, as 3.1 says for
  a request without credentials);
- a token that is not valid here (expired, altered, another gateway's audience, another kind):
  401 with ``error="invalid_token"``;
- a valid token that does not cover the study asked for: 403 with ``error="insufficient_scope"``.

A token verified once is remembered by its SHA-256 (:class:`_Verified`) until it expires: the
same token bytes always carry the same claims, so a later request with it skips the signature
check (0.3 ms), and only what can change is checked again: the time (expiry, and a clock that
went back), the signing key (still published, the same key, not withdrawn) and the study asked
for. Any doubt sends the token through the full verification, which refuses it with the
precise reason. One-time tokens are never remembered.

The edge gateway holds A's public keys only, as a JWKS file it re-reads when it changes
(:class:`JwksFileKeys`), so A can rotate keys without restarting the edge.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ncp.errors import ConfigError
from ncp.gateway.errors import BadRequest, Forbidden, Unauthorized
from ncp.security.access import AccessGrant, AccessVerifier
from ncp.security.keys import KeySet
from ncp.security.keystore import InvalidJwk, key_set_from_jwks
from ncp.security.tokens import PatientMismatch, StudyNotCovered, TokenError

_CACHE_SIZE = 4096
"""Verified tokens remembered at most (a few MB); a token lives 5 to 15 minutes."""

_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*) *\Z", re.IGNORECASE)
"""RFC 6750 2.1 b64token after the scheme (case-insensitive, RFC 9110 11.1)."""


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token that passed the full verification at ``since``."""

    grant: AccessGrant
    since: datetime
    until: datetime
    """Its expiry plus the leeway: from then on it is refused (Expired)."""
    kid: str
    key: Any
    """The public key its signature verified with."""


def _kid_of(token: str) -> str | None:
    """The ``kid`` of a token whose header has already been verified."""
    header = token.split(".", 1)[0]
    try:
        kid = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))).get("kid")
    except ValueError:
        return None
    return kid if isinstance(kid, str) else None


class BearerAuth:
    """Checks bearer tokens for one gateway; ``realm`` is its public base URL."""

    def __init__(self, verifier: AccessVerifier, realm: str) -> None:
        self.verifier = verifier
        self.realm = realm.replace('"', "")
        self._verified: dict[bytes, _Verified] = {}

    def grant(self, authorization: list[str], study_uid: str | None) -> AccessGrant:
        """The grant of the request's token for ``study_uid`` (None: a search across the
        token's studies). ``authorization``: every Authorization header the request carries."""
        if not authorization:
            raise Unauthorized(
                "an access token is required (Authorization: Bearer)",
                headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'},
            )
        if len(authorization) > 1:
            raise BadRequest("more than one Authorization header")
        match = _BEARER.match(authorization[0].strip())
        if match is None:
            raise self._invalid("invalid_request", "the Authorization header is not a Bearer token")
        value = match.group(1)
        digest = hashlib.sha256(value.encode("ascii")).digest()
        now = self.verifier.clock()
        known = self._verified.get(digest)
        if known is not None and self._still_valid(known, study_uid, now):
            return known.grant
        try:
            grant = self.verifier.check(value, study_uid=study_uid, now=now)
        except (StudyNotCovered, PatientMismatch) as exc:
            raise Forbidden(
                exc.message,
                headers={"WWW-Authenticate": self._challenge("insufficient_scope", exc.message)},
                jti=exc.jti,
            ) from None
        except TokenError as exc:
            raise self._invalid("invalid_token", exc.message, exc.jti) from None
        self._remember(digest, value, grant, now)
        return grant

    def _remember(self, digest: bytes, token: str, grant: AccessGrant, now: datetime) -> None:
        if grant.kind.one_time or self.verifier.replay is not None:
            return
        kid = _kid_of(token)
        key = None if kid is None else self._key(grant.issuer, kid, now)
        if kid is None or key is None:
            return
        if len(self._verified) >= _CACHE_SIZE:
            self._verified = {d: v for d, v in self._verified.items() if v.until > now}
            if len(self._verified) >= _CACHE_SIZE:
                self._verified.clear()
        leeway = timedelta(seconds=self.verifier.leeway_s)
        self._verified[digest] = _Verified(grant, now, grant.expires_at + leeway, kid, key)

    def _still_valid(self, known: _Verified, study_uid: str | None, now: datetime) -> bool:
        """Whether a remembered token is valid now as it was when verified: not expired, the
        clock not before the verification (so iat and nbf have passed), the study covered, and
        its signing key still the issuer's, the same key, not withdrawn."""
        if not known.since <= now < known.until:
            return False
        if study_uid is not None and not known.grant.covers(study_uid):
            return False
        return bool(self._key(known.grant.issuer, known.kid, now) == known.key)

    def _key(self, issuer: str, kid: str, now: datetime) -> Any:
        """The public key the verifier would use for ``kid`` of ``issuer`` now, or None."""
        keys = self.verifier.keys
        keyset = keys if isinstance(keys, KeySet) else keys(issuer)
        if keyset is None or keyset.issuer != issuer:
            return None
        found = keyset.get(kid)
        if found is None or (found.not_after is not None and now > found.not_after):
            return None
        return found.public_key

    def _invalid(self, code: str, description: str, jti: str | None = None) -> Unauthorized:
        return Unauthorized(
            description,
            headers={"WWW-Authenticate": self._challenge(code, description)},
            jti=jti,
        )

    def _challenge(self, code: str, description: str) -> str:
        # error_description is a quoted string of printable ASCII without '"' and '\'.
        text = "".join(c for c in description if 0x20 <= ord(c) < 0x7F and c not in '"\\')
        return f'Bearer realm="{self.realm}", error="{code}", error_description="{text[:200]}"'


class JwksFileKeys:
    """A's signing keys from a JWKS file, re-read when the file changes (key rotation).

    Called by the verifier with a token's issuer: A's key set for A, None for anyone else."""

    def __init__(self, path: Path, issuer: str) -> None:
        self.path = path
        self.issuer = issuer
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys = self._load()

    def _load(self) -> KeySet:
        try:
            stat = os.stat(self.path)
            data = json.loads(self.path.read_text(encoding="utf-8"))
            keys = key_set_from_jwks(self.issuer, data)
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: JWKS file not found") from None
        except (OSError, ValueError, InvalidJwk) as exc:
            raise ConfigError(f"{self.path}: not a usable JWKS: {exc}") from None
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return keys

    def __call__(self, issuer: str) -> KeySet | None:
        if issuer != self.issuer:
            return None
        with self._lock:
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._keys = self._load()
            except (OSError, ConfigError):
                pass  # keep the keys we have: a file being replaced is briefly absent
            return self._keys
