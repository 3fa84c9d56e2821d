"""From an ``Authorization`` header to an :class:`AccessGrant`, through the one verifier.

Only ``Authorization: Bearer <token>`` is read (RFC 6750 2.1): a token in the query string
would land in access logs and browser histories. Refusals follow RFC 6750 3:

- no token: 401, ``WWW-Authenticate: Bearer realm="<gateway>"`` (no error code, as 3.1 says for
  a request without credentials);
- a token that is not valid here (expired, altered, another gateway's audience, another kind):
  401 with ``error="invalid_token"``;
- a valid token that does not cover the study asked for: 403 with ``error="insufficient_scope"``.

The edge gateway holds A's public keys only, as a JWKS file it re-reads when it changes
(:class:`JwksFileKeys`), so A can rotate keys without restarting the edge.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from ncp.errors import ConfigError
from ncp.gateway.errors import BadRequest, Forbidden, Unauthorized
from ncp.security.access import AccessGrant, AccessVerifier
from ncp.security.keys import KeySet
from ncp.security.keystore import InvalidJwk, key_set_from_jwks
from ncp.security.tokens import PatientMismatch, StudyNotCovered, TokenError

_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*) *\Z", re.IGNORECASE)
"""RFC 6750 2.1 b64token after the scheme (case-insensitive, RFC 9110 11.1)."""


class BearerAuth:
    """Checks bearer tokens for one gateway; ``realm`` is its public base URL."""

    def __init__(self, verifier: AccessVerifier, realm: str) -> None:
        self.verifier = verifier
        self.realm = realm.replace('"', "")

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
        try:
            return self.verifier.check(match.group(1), study_uid=study_uid)
        except (StudyNotCovered, PatientMismatch) as exc:
            raise Forbidden(
                exc.message,
                headers={"WWW-Authenticate": self._challenge("insufficient_scope", exc.message)},
                jti=exc.jti,
            ) from None
        except TokenError as exc:
            raise self._invalid("invalid_token", exc.message, exc.jti) from None

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
