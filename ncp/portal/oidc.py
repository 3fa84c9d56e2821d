"""Login through a national identity provider with OpenID Connect (Core 1.0, code flow).

The flow, with the library doing each part it is made for:

1. Discovery: ``<issuer>/.well-known/openid-configuration`` (its ``issuer`` must be the
   configured one exactly; endpoints must be https, or http on loopback for a test provider).
2. :meth:`OidcClient.start`: a random ``state``, ``nonce`` and PKCE verifier (RFC 7636, S256)
   kept in the portal's login session; the browser goes to the authorization endpoint
   (Authlib's ``OAuth2Session.create_authorization_url``), asking for ``acr_values``.
3. :meth:`OidcClient.finish`: the callback's ``state`` must match; the code is exchanged with
   the verifier (Authlib's ``fetch_token``); the ID token's signature is checked against the
   provider's JWKS (joserfc, Authlib's JOSE library; asymmetric algorithms only, the key by
   ``kid``, the JWKS fetched again once for an unknown ``kid`` after a key rotation), then
   ``iss``, ``aud`` (and ``azp`` when several audiences), ``exp``, ``iat``, ``nonce`` and
   ``acr`` (one of the configured ``acr_values``, when configured; present in any case).

Any failure raises :class:`OidcError` with a reason the HP may read; nothing from the provider
is trusted before step 3 succeeds.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from authlib.integrations.requests_client import OAuth2Session
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError, UnsupportedAlgorithmError
from joserfc.jwk import KeySet

from ncp.config import OidcSection
from ncp.errors import NcpError

ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
"""Asymmetric only: a symmetric (HS*) ID token would be signed with the client secret, which
the portal's replicas and the provider share; a provider's key alone proves the provider."""
LEEWAY_S = 60
DISCOVERY_TTL_S = 3600


class OidcError(NcpError):
    """The identity provider's answer cannot be accepted; ``reason`` says why, readably."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OidcStart:
    url: str
    state: str
    nonce: str
    verifier: str


@dataclass(frozen=True)
class OidcIdentity:
    subject: str
    acr: str
    amr: tuple[str, ...]
    claims: Mapping[str, Any]


def _secure(url: Any, what: str) -> str:
    if not isinstance(url, str):
        raise OidcError(f"the provider's configuration has no {what}")
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme == "https" or (parts.scheme == "http" and loopback):
        return url
    raise OidcError(f"the provider's {what} is not an https:// URL")


class OidcClient:
    """One configured provider. Thread-safe; the discovery document and JWKS are cached."""

    def __init__(
        self,
        settings: OidcSection,
        redirect_uri: str,
        *,
        http: Callable[[], requests.Session] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.redirect_uri = redirect_uri
        self._http = http or _plain_session
        self._clock = clock
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None

    # -- discovery -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        with self._lock:
            if self._metadata is not None and self._clock() - self._metadata_at < DISCOVERY_TTL_S:
                return self._metadata
        url = f"{self.settings.issuer}/.well-known/openid-configuration"
        data = self._get_json(url, "configuration")
        if data.get("issuer") != self.settings.issuer:
            raise OidcError("the provider's configuration names another issuer")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            _secure(data.get(key), key)
        methods = data.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise OidcError("the provider does not support PKCE with S256")
        with self._lock:
            self._metadata, self._metadata_at = data, self._clock()
        return data

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            with self._http() as http:
                response = http.get(url, timeout=self.settings.timeout_s)
        except requests.RequestException as exc:
            raise OidcError(
                f"the provider's {what} could not be read ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise OidcError(f"the provider's {what} answered {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise OidcError(f"the provider's {what} is not JSON") from None
        if not isinstance(data, dict):
            raise OidcError(f"the provider's {what} is not a JSON object")
        return data

    def _key_set(self, refresh: bool) -> KeySet:
        with self._lock:
            if self._keys is not None and not refresh:
                return self._keys
        data = self._get_json(self.metadata()["jwks_uri"], "keys (JWKS)")
        try:
            keys = KeySet.import_key_set(data)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError):
            raise OidcError("the provider's keys (JWKS) cannot be read") from None
        with self._lock:
            self._keys = keys
        return keys

    # -- the flow --------------------------------------------------------------------------

    def _oauth(self) -> OAuth2Session:
        session = OAuth2Session(
            client_id=self.settings.client_id,
            client_secret=self.settings.client_secret or None,
            scope=" ".join(self.settings.scopes),
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method=(
                "client_secret_basic" if self.settings.client_secret else "none"
            ),
        )
        session.trust_env = False  # REQUESTS_CA_BUNDLE must not override the system's trust
        return session

    def start(self) -> OidcStart:
        """Where to send the browser, and what the callback must match."""
        meta = self.metadata()
        state = secrets.token_urlsafe(24)
        nonce = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)  # 64 characters, within RFC 7636's 43..128
        extra: dict[str, str] = {"nonce": nonce}
        if self.settings.acr_values:
            extra["acr_values"] = " ".join(self.settings.acr_values)
        with self._oauth() as oauth:
            url, _ = oauth.create_authorization_url(
                meta["authorization_endpoint"], state=state, code_verifier=verifier, **extra
            )
        return OidcStart(url=url, state=state, nonce=nonce, verifier=verifier)

    def finish(
        self, *, code: str, state: str, expected_state: str, nonce: str, verifier: str
    ) -> OidcIdentity:
        """Exchange the code and verify the ID token (see the module docstring)."""
        if not secrets.compare_digest(state.encode(), expected_state.encode()):
            raise OidcError("the answer does not belong to this login (state)")
        meta = self.metadata()
        with self._oauth() as oauth:
            try:
                token = oauth.fetch_token(
                    meta["token_endpoint"],
                    code=code,
                    code_verifier=verifier,
                    timeout=self.settings.timeout_s,
                )
            except Exception as exc:  # Authlib raises its own errors and requests' alike
                raise OidcError(f"the code was not accepted ({type(exc).__name__})") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the provider returned no ID token")
        return self.verify_id_token(id_token, nonce)

    def verify_id_token(self, id_token: str, nonce: str) -> OidcIdentity:
        claims = self._decode(id_token)
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock()),
            leeway=LEEWAY_S,
            iss={"essential": True, "value": self.settings.issuer},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise OidcError(f"the ID token is not valid ({exc.description or exc.error})") from None
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.settings.client_id not in audiences:
            raise OidcError("the ID token is for another client (aud)")
        if len(audiences) > 1 and claims.get("azp") != self.settings.client_id:
            raise OidcError("the ID token names several audiences but not this client (azp)")
        acr = claims.get("acr")
        if not isinstance(acr, str) or not acr:
            raise OidcError("the ID token does not say how you authenticated (acr)")
        if self.settings.acr_values and acr not in self.settings.acr_values:
            raise OidcError(f"the authentication level {acr!r} is not accepted here")
        amr = claims.get("amr")
        methods = tuple(m for m in amr if isinstance(m, str)) if isinstance(amr, list) else ()
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise OidcError("the ID token's subject (sub) is not usable")
        return OidcIdentity(subject=subject, acr=acr, amr=methods, claims=dict(claims))

    def _decode(self, id_token: str) -> dict[str, Any]:
        for refresh in (False, True):
            try:
                token = jwt.decode(id_token, self._key_set(refresh), algorithms=list(ALGORITHMS))
            except InvalidKeyIdError:
                if not refresh:
                    continue  # the provider may have rotated its keys: fetch them once more
                raise OidcError(
                    "the ID token is signed with a key the provider does not publish"
                ) from None
            except UnsupportedAlgorithmError:
                raise OidcError("the ID token's algorithm is not accepted here") from None
            except (ValueError, JoseError):
                raise OidcError("the ID token's signature is not valid") from None
            return dict(token.claims)
        raise OidcError("the ID token's signature is not valid")


def _plain_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


__all__ = ["OidcClient", "OidcError", "OidcIdentity", "OidcStart"]
