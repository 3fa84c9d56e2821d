"""Login through a national identity provider: the portal's OpenID Connect client against a
small fake provider served over HTTP on loopback (discovery, authorization code with PKCE,
token endpoint, JWKS, signed ID tokens). The browser's part of the flow is played by the test:
it follows the portal's redirect to the provider's authorization endpoint, "logs in" there and
brings the code back to the portal's callback."""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import uvicorn
from fastapi import FastAPI, Form, Header, Request
from fastapi.responses import JSONResponse
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from sqlalchemy import select

from ncp.audit.models import Action, AuditRecord, Outcome
from ncp.config import OidcSection
from ncp.node import Node
from ncp.portal.app import SESSION_COOKIE
from ncp.portal.oidc import OidcClient
from ncp.security.mtls import bind
from ncp.store.portal import PortalSession
from tests.portal_support import client
from tests.support.portal import Clock, add_hp, portal_node

CLIENT_ID, CLIENT_SECRET = "ncp-portal-be", "s3cret-of-the-portal"
LOA_HIGH = "http://eidas.europa.eu/LoA/high"
LOA_LOW = "http://eidas.europa.eu/LoA/low"


@dataclass
class FakeProvider:
    """What the fake provider will do; tests change it to misbehave."""

    issuer: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, {"kid": "k1"}))
    subject: str = "BE-eID-0042"
    acr: str | None = LOA_HIGH
    nonce_override: str | None = None
    aud_override: str | None = None
    sign_with: RSAKey | None = None
    exp_in: int = 300
    alg: str = "RS256"
    jwks_reads: int = 0
    hmac_key: OctKey = field(default_factory=lambda: OctKey.import_key(CLIENT_SECRET.encode()))
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)

    def authorize(self, url: str) -> str:
        """The provider's login page: check the request, return the redirect with a code."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert "openid" in query["scope"].split() and query["nonce"] and query["state"]
        code = secrets.token_urlsafe(16)
        self.codes[code] = query
        return f"{query['redirect_uri']}?code={code}&state={query['state']}"

    def app(self) -> FastAPI:
        api = FastAPI()

        @api.get("/.well-known/openid-configuration")
        def discovery() -> dict[str, Any]:
            return {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }

        @api.get("/jwks")
        def jwks() -> dict[str, Any]:
            self.jwks_reads += 1
            return {"keys": [self.key.as_dict(private=False)]}

        @api.post("/token")
        def token(
            request: Request,
            grant_type: str = Form(),
            code: str = Form(),
            code_verifier: str = Form(),
            redirect_uri: str = Form(),
            authorization: str = Header(""),
        ) -> JSONResponse:
            self.token_requests.append({"code": code, "verifier": code_verifier})
            expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            if authorization != f"Basic {expected}":
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            asked = self.codes.pop(code, None)
            if asked is None or grant_type != "authorization_code":
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            challenge = (
                base64.urlsafe_b64encode(hashlib.sha256(code_verifier.encode()).digest())
                .rstrip(b"=")
                .decode()
            )
            if challenge != asked["code_challenge"] or redirect_uri != asked["redirect_uri"]:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            now = int(time.time())
            claims: dict[str, Any] = {
                "iss": self.issuer,
                "sub": self.subject,
                "aud": self.aud_override or CLIENT_ID,
                "iat": now,
                "exp": now + self.exp_in,
                "nonce": self.nonce_override or asked["nonce"],
                "amr": ["hwk", "pin"],
            }
            if self.acr is not None:
                claims["acr"] = self.acr
            signer = self.sign_with or self.key
            header = {"alg": self.alg, "kid": self.key.kid}
            id_token = jwt.encode(header, claims, self.hmac_key if self.alg == "HS256" else signer)
            return JSONResponse(
                {"access_token": "at", "token_type": "Bearer", "id_token": id_token}
            )

        return api


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    sock = bind()
    fake.issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def node(tmp_path: Path, provider: FakeProvider) -> Iterator[Node]:
    made = portal_node(
        tmp_path,
        clock=Clock(),
        oidc={
            "issuer": provider.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "acr_values": [LOA_HIGH, "http://eidas.europa.eu/LoA/substantial"],
            "display_name": "BE eID",
        },
    )
    add_hp(made, "dr.janssens", name="Dr. Jan Janssens", password=None, oidc_subject="BE-eID-0042")
    yield made
    made.close()


def _round_trip(node: Node, provider: FakeProvider, oidc: OidcClient | None = None):  # type: ignore[no-untyped-def]
    c = client(node, oidc=oidc) if oidc is not None else client(node)
    assert "Log in with BE eID" in c.get("/login").text
    start = c.get("/login/oidc", follow_redirects=False)
    assert start.status_code == 303
    location = start.headers["location"]
    assert location.startswith(f"{provider.issuer}/authorize?")
    assert parse_qs(urlsplit(location).query)["acr_values"] == [
        f"{LOA_HIGH} http://eidas.europa.eu/LoA/substantial"
    ]
    back = provider.authorize(location)
    path = back.removeprefix(node.settings.portal.url)
    return c, c.get(path, follow_redirects=False)


def _audit(node: Node) -> list[AuditRecord]:
    with node.sessions() as session:
        return list(session.scalars(select(AuditRecord).order_by(AuditRecord.seq)))


def test_login_through_the_identity_provider(node: Node, provider: FakeProvider) -> None:
    c, callback = _round_trip(node, provider)
    assert callback.status_code == 200 and 'http-equiv="refresh"' in callback.text
    assert SESSION_COOKIE in callback.headers["set-cookie"]
    account = c.get("/account")
    assert account.status_code == 200 and LOA_HIGH in account.text
    with node.sessions() as session:
        row = session.scalars(select(PortalSession)).one()
    assert row.state == "active" and row.acr == LOA_HIGH and row.amr == "hwk pin"
    # PKCE: the verifier the portal sent hashes to the challenge (checked by the provider).
    assert len(provider.token_requests) == 1
    login = [r for r in _audit(node) if r.action == Action.HP_LOGIN][-1]
    assert login.outcome == Outcome.SUCCESS and login.details["acr"] == LOA_HIGH
    assert login.actor_id == "dr.janssens"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"nonce_override": "another-nonce"}, "nonce"),
        ({"acr": LOA_LOW}, "not accepted"),
        ({"acr": None}, "acr"),
        ({"aud_override": "someone-else"}, "aud"),
        ({"exp_in": -600}, "not valid"),
        ({"sign_with": RSAKey.generate_key(2048, {"kid": "k1"})}, "signature"),
        ({"subject": "BE-eID-9999"}, "not registered"),
        ({"alg": "HS256"}, "algorithm is not accepted"),
    ],
)
def test_id_tokens_that_fail_a_check_are_refused(
    node: Node, provider: FakeProvider, change: dict[str, Any], reason: str
) -> None:
    for name, value in change.items():
        setattr(provider, name, value)
    c, callback = _round_trip(node, provider)
    assert callback.status_code in (401, 403)
    assert reason in html.unescape(callback.text), html.unescape(callback.text)[
        callback.text.find('role="alert"') :
    ][:300]
    assert c.get("/account", follow_redirects=False).status_code == 303
    with node.sessions() as session:
        assert not [s for s in session.scalars(select(PortalSession)) if s.state == "active"]
    failed = [r for r in _audit(node) if r.action == Action.HP_LOGIN]
    assert failed and failed[-1].outcome == Outcome.MINOR_FAILURE


def test_a_callback_with_another_state_is_refused(node: Node, provider: FakeProvider) -> None:
    c = client(node)
    start = c.get("/login/oidc", follow_redirects=False)
    back = provider.authorize(start.headers["location"])
    forged = back.split("&state=")[0] + "&state=forged"
    r = c.get(forged.removeprefix(node.settings.portal.url))
    assert r.status_code == 401 and "state" in r.text
    assert provider.token_requests == []  # the code was never exchanged


def test_a_callback_without_its_login_is_refused(node: Node, provider: FakeProvider) -> None:
    c = client(node)
    start = c.get("/login/oidc", follow_redirects=False)
    back = provider.authorize(start.headers["location"])
    stranger = client(node)  # another browser: no login cookie of this flow
    r = stranger.get(back.removeprefix(node.settings.portal.url))
    assert r.status_code == 400 and provider.token_requests == []


def test_discovery_must_name_the_configured_issuer(provider: FakeProvider) -> None:
    settings = OidcSection(issuer=provider.issuer + "/other", client_id=CLIENT_ID)
    with pytest.raises(Exception, match=r"answered 404|another issuer"):
        OidcClient(settings, "https://portal/cb").metadata()


def test_plain_http_issuers_are_refused_off_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        OidcSection(issuer="http://idp.example.be", client_id=CLIENT_ID)


def test_a_rotated_provider_key_is_fetched_once_more(node: Node, provider: FakeProvider) -> None:
    assert node.settings.portal.oidc is not None
    shared = OidcClient(
        node.settings.portal.oidc, f"{node.settings.portal.url}/login/oidc/callback"
    )
    _c, first = _round_trip(node, provider, shared)
    assert first.status_code == 200
    _c, again = _round_trip(node, provider, shared)
    assert again.status_code == 200 and provider.jwks_reads == 1  # the keys are kept
    provider.key = RSAKey.generate_key(2048, {"kid": "k2"})  # the provider rotates its key
    _c, second = _round_trip(node, provider, shared)
    assert second.status_code == 200, second.text
    assert provider.jwks_reads == 2
