"""Mutual TLS on the standard channel, over real TLS on loopback: who gets in, who is refused
and how, and that the application learns which trusted country is calling."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from ncp.config import settings_from_mapping
from ncp.security import mtls
from ncp.security.keystore import KeyStore
from ncp.security.trust import JwksUnavailable, Peer, TrustList, fingerprint, format_fingerprint
from tests.security_support import cert_of, expired_window, make_node, trust_toml, write_client


@dataclass
class Channel:
    """Country AT's standard channel, served on a free loopback port for the whole module."""

    url: str
    root: Path
    keystore: KeyStore
    trust: TrustList
    events: list[mtls.RefusalEvent]
    creds: dict[str, tuple[Path, Path] | None]

    def client(self, who: str, **tls: Any) -> httpx.Client:
        context = ssl.create_default_context(cafile=self.root / "at" / "ca.pem")
        creds = self.creds[who]
        if creds is not None:
            context.load_cert_chain(*creds)
        if "ciphers" in tls:
            context.set_ciphers(tls.pop("ciphers"))
        for name, value in tls.items():
            setattr(context, name, value)
        return httpx.Client(verify=context, base_url=self.url, timeout=5.0)

    def refusals(self, count: int = 1) -> list[mtls.RefusalEvent]:
        """Refusal events arrive from the server's thread pool: wait for them briefly."""
        deadline = time.monotonic() + 3.0
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.events)


def _app(keystore: KeyStore) -> FastAPI:
    app = FastAPI()

    @app.get("/who")
    def who(peer: mtls.TlsPeer, request: Request) -> dict[str, Any]:
        tls = request.scope["extensions"]["tls"]
        return {"country": peer.country, "tls_version": tls["tls_version"]}

    @app.get("/open")
    def open_route() -> dict[str, str]:
        # No dependency: only the handshake stands between a caller and this route.
        return {"ok": "yes"}

    @app.get("/jwks.json")
    def jwks() -> dict[str, Any]:
        return keystore.jwks()

    return app


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Channel]:
    root = tmp_path_factory.mktemp("mtls")
    at, be, fr, eu = (make_node(root, c) for c in ("AT", "BE", "FR", "EU"))
    extra = root / "extra"
    start, end = expired_window()
    creds: dict[str, tuple[Path, Path] | None] = {
        "BE": (be.path("client.pem"), be.path("client.key")),
        "none": None,
        "FR untrusted CA": (fr.path("client.pem"), fr.path("client.key")),
        "BE expired": write_client(extra, "be-old", be.ca, "BE", not_before=start, not_after=end),
        "BE server cert": (be.path("server.pem"), be.path("server.key")),
        "FR by BE's CA": write_client(extra, "fake-fr", be.ca, "FR"),
        "LU by shared CA": write_client(extra, "lu", eu.ca, "LU"),
        "PT by shared CA": write_client(extra, "pt", eu.ca, "PT"),
    }
    pt_pin = format_fingerprint(fingerprint(cert_of(extra / "pt.pem")))
    (root / "trust.toml").write_text(
        trust_toml(
            {
                "BE": {
                    "standard": "https://localhost/fhir",
                    "tls_ca": str(be.path("ca.pem")),
                    "jwks_file": str(be.path("jwks.json")),
                },
                "PT": {
                    "standard": "https://localhost/fhir",
                    "tls_fingerprint": pt_pin,
                    "jwks_file": str(be.path("jwks.json")),
                },
            },
            shared_ca=[str(eu.path("ca.pem"))],
        )
    )
    keystore = KeyStore.load(at.directory, country="AT")
    trust = TrustList.load(root / "trust.toml")
    events: list[mtls.RefusalEvent] = []
    app = _app(keystore)
    mtls.install(app, trust, events.append)
    server = mtls.make_server(
        app,
        mtls.server_ssl_context(keystore, trust),
        on_refusal=events.append,
        log_level="warning",
    )
    sock = mtls.bind()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    port = sock.getsockname()[1]
    yield Channel(f"https://localhost:{port}", root, keystore, trust, events, creds)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture()
def ch(channel: Channel) -> Channel:
    channel.events.clear()
    return channel


# --- admitted ------------------------------------------------------------------------------------


def test_a_trusted_peer_gets_in_and_the_app_knows_its_country(ch: Channel) -> None:
    with ch.client("BE") as client:
        first = client.get("/who")
        second = client.get("/who")  # same kept-alive connection: the scope has it again
    assert first.status_code == 200 == second.status_code
    assert first.json() == {"country": "BE", "tls_version": 0x0304}
    assert ch.events == []


def test_tls12_is_accepted_and_reported(ch: Channel) -> None:
    with ch.client("BE", maximum_version=ssl.TLSVersion.TLSv1_2) as client:
        assert client.get("/who").json() == {"country": "BE", "tls_version": 0x0303}


def test_a_peer_pinned_by_fingerprint_under_a_shared_ca_gets_in(ch: Channel) -> None:
    with ch.client("PT by shared CA") as client:
        assert client.get("/who").json()["country"] == "PT"


def test_a_request_sent_with_the_clients_finished_is_not_lost(ch: Channel) -> None:
    # The request rides in the same TCP write as the end of the client's handshake, so TLS may
    # decrypt it before the connection is handed to HTTP: it must wait there, not vanish.
    context = ssl.create_default_context(cafile=ch.root / "at" / "ca.pem")
    context.load_cert_chain(*(ch.creds["BE"] or ()))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    port = int(ch.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())  # client Finished and the request, in one write
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
                continue
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b'{"country":"BE","tls_version":772}')


# --- refused during the handshake ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("none", "no client certificate: the standard channel requires mutual TLS"),
        ("FR untrusted CA", "client certificate refused: unable to get local issuer certificate"),
        ("BE expired", "client certificate refused: certificate has expired"),
        ("BE server cert", "client certificate refused: unsuitable certificate purpose"),
    ],
)
def test_handshake_refusals_never_reach_the_app_and_are_reported(
    ch: Channel, who: str, reason: str
) -> None:
    with ch.client(who) as client, pytest.raises(httpx.TransportError):
        client.get("/open")
    [event] = ch.refusals()
    assert event.stage == "handshake" and event.reason == reason
    assert event.client is not None and event.client.startswith("127.0.0.1:")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_below_1_2_is_refused(ch: Channel) -> None:
    with (
        ch.client(
            "BE",
            minimum_version=ssl.TLSVersion.TLSv1_1,
            maximum_version=ssl.TLSVersion.TLSv1_1,
            ciphers="DEFAULT:@SECLEVEL=0",  # so the client really offers TLS 1.1
        ) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get("/open")
    [event] = ch.refusals()
    assert event.reason.startswith("TLS version refused: TLS 1.2 or newer is required")


def test_plain_http_is_refused(ch: Channel) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(ch.url.replace("https:", "http:") + "/open")
    [event] = ch.refusals()
    assert event.reason.startswith("plain HTTP on the standard channel")


# --- refused by the application ------------------------------------------------------------------


def _outcome(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/fhir+json"
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    [issue] = body["issue"]
    assert issue["severity"] == "error" and issue["code"] == "security"
    return str(issue["diagnostics"])


def test_a_trusted_ca_vouching_for_another_country_gets_403(ch: Channel) -> None:
    with ch.client("FR by BE's CA") as client:
        response = client.get("/who")
    assert response.status_code == 403
    assert "names country 'FR' but is trusted only for BE" in _outcome(response)
    [event] = ch.refusals()
    assert (event.stage, event.status, event.claimed_country, event.path) == (
        "request",
        403,
        "FR",
        "/who",
    )
    assert event.certificate is not None and "sha256:" in event.certificate


def test_a_country_not_on_the_trust_list_gets_403(ch: Channel) -> None:
    with ch.client("LU by shared CA") as client:
        response = client.get("/who")
    assert response.status_code == 403
    assert "issued by no peer's CA and matches no pinned fingerprint" in _outcome(response)
    assert ch.refusals()[0].claimed_country == "LU"


def test_without_the_tls_extension_the_dependency_fails_closed(channel: Channel) -> None:
    app = _app(channel.keystore)
    events: list[mtls.RefusalEvent] = []
    mtls.install(app, channel.trust, events.append)
    # Plain ASGI: no TLS, no certificate, as behind a server that does not set the extension.
    response = _plain_get(app, "/who")
    assert response.status_code == 401
    assert "no client certificate" in _outcome(response)
    assert events[0].status == 401
    bare = _app(channel.keystore)  # install() never called: no trust list to check against
    bare.add_exception_handler(mtls.TlsPeerRefused, mtls._refused)
    assert _plain_get(bare, "/who").status_code == 500


def _plain_get(app: FastAPI, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return await client.get(path)

    return asyncio.run(get())


def test_a_node_serves_its_standard_channel_from_its_settings(ch: Channel) -> None:
    settings = settings_from_mapping(
        {
            "node": {"country": "AT"},
            "urls": {"standard": "https://localhost:8443/fhir"},
            "archive": {"kind": "folder", "path": "dicom"},
            "keys": {"dir": "at"},
            "trust": {"list": "trust.toml"},
        },
        base_dir=ch.root,
    )
    seen: list[mtls.RefusalEvent] = []
    server = mtls.standard_channel(
        _app(ch.keystore), settings, host="127.0.0.1", on_refusal=seen.append, log_level="error"
    )
    assert server.config.port == 8443
    sock = mtls.bind()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        url = f"https://localhost:{sock.getsockname()[1]}"
        context = ssl.create_default_context(cafile=ch.root / "at" / "ca.pem")
        context.load_cert_chain(*(ch.creds["FR by BE's CA"] or ()))
        with httpx.Client(verify=context, base_url=url) as client:
            assert client.get("/who").status_code == 403
        assert seen and seen[0].status == 403
        context.load_cert_chain(*(ch.creds["BE"] or ()))
        with httpx.Client(verify=context, base_url=url) as client:
            assert client.get("/who").json()["country"] == "BE"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --- fetching a peer's JWKS over mutual TLS ------------------------------------------------------


def test_a_peer_jwks_is_fetched_over_mutual_tls(ch: Channel) -> None:
    at_ca = cert_of(ch.root / "at" / "ca.pem")
    peer = Peer("AT", standard=ch.url, tls_ca=(at_ca,), jwks_url=f"{ch.url}/jwks.json")
    be_keys = KeyStore.load(ch.root / "be")
    trust = TrustList({"AT": peer}, inline_keys={}, fetcher=mtls.MutualTlsJwksFetcher(be_keys))
    kid = ch.keystore.current_signing_key().kid
    assert kid in trust.key_set("AT", kid=kid).keys

    pinned_elsewhere = Peer(
        "AT",
        standard=ch.url,
        tls_ca=(at_ca,),
        tls_fingerprints=frozenset({b"\0" * 32}),
        jwks_url=f"{ch.url}/jwks.json",
    )
    with pytest.raises(JwksUnavailable, match=r"server certificate .* is not pinned"):
        mtls.MutualTlsJwksFetcher(be_keys)(pinned_elsewhere, ())
    # Fetching with a client certificate the server does not trust fails at the handshake.
    fr_keys = KeyStore.load(ch.root / "fr")
    with pytest.raises(JwksUnavailable, match=r"jwks\.json: "):
        mtls.MutualTlsJwksFetcher(fr_keys)(peer, ())


# --- the audit hook ------------------------------------------------------------------------------


def test_refusals_become_audit_events() -> None:
    recorded: list[Any] = []

    class Auditor:
        def record(self, event: Any) -> None:
            recorded.append(event)

    hook = mtls.audit_refusals(Auditor())
    hook(
        mtls.RefusalEvent("request", "names country 'FR'", "127.0.0.1:5", 403, "CN=x", "FR", "/who")
    )
    [event] = recorded
    assert str(event.action) == "refusal" and int(event.outcome) == 8
    assert event.reason == "mutual TLS (request): names country 'FR'"
    assert event.details["claimed_country"] == "FR" and event.peer_country is None
