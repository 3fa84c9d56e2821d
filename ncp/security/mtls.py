"""Mutual TLS on the standard channel, and telling the application which peer is calling.

The node serves HTTPS that requires a client certificate chaining to a CA on the trust list. How
the verified certificate reaches the application (``docs/decisions/0005-mutual-tls-to-the-app.md``):

1. uvicorn listens on plain TCP with a protocol of ours (:func:`mutual_tls_protocol`). For each
   connection it runs the TLS handshake itself with ``loop.start_tls`` and our server
   :class:`ssl.SSLContext` (``CERT_REQUIRED``, trust anchors = the trust list's CAs). A failed
   handshake (no certificate, unknown CA, expired, wrong key usage) is caught here, where the
   peer's address and OpenSSL's reason are both known, and reported as a :class:`RefusalEvent`.
2. On success the connection is handed to uvicorn's own h11 protocol, subclassed only to put the
   verified certificate into every request's ASGI scope as the ASGI TLS extension
   (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM). Nothing is read from headers, so a
   client cannot claim a certificate it did not present.
3. The FastAPI dependency :func:`tls_peer` maps that certificate to a :class:`Peer` with the trust
   list (issuing CA or pinned fingerprint, and subject C = the peer's country) and refuses with
   a FHIR OperationOutcome otherwise: 401 without a certificate, 403 for one that identifies no
   peer. Refusals at both stages go to the ``on_refusal`` hook (the audit trail).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import uuid
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from ncp.config import HttpSection, NodeSettings
from ncp.errors import NcpError
from ncp.security.http_limits import guarded, uvicorn_options
from ncp.security.keystore import KeyStore, subject_country
from ncp.security.trust import (
    JwksUnavailable,
    Peer,
    PeerNotTrusted,
    TrustList,
    fingerprint,
    format_fingerprint,
)

log = logging.getLogger(__name__)

# Modern suites only for TLS 1.2 peers (forward secrecy, AEAD); TLS 1.3 suites are all fine.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
HANDSHAKE_TIMEOUT = 10.0
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


# --- refusals ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefusalEvent:
    """A caller refused on the standard channel, for the audit trail and the log.

    ``stage`` is ``handshake`` (TLS refused the connection: the application never saw it),
    ``http`` (a request refused below the application: a head too slow or too large, a body
    stalled, ambiguous framing; :mod:`ncp.security.http_limits`) or ``request`` (the
    certificate was valid TLS-wise but identifies no trusted peer).
    """

    stage: Literal["handshake", "http", "request"]
    reason: str
    client: str | None
    """The caller's address, ``host:port``."""
    status: int | None = None
    """The HTTP status answered (request stage only)."""
    certificate: str | None = None
    """Subject and SHA-256 fingerprint of the certificate presented, if any."""
    claimed_country: str | None = None
    """Subject C of that certificate: what the caller claims, not what we established."""
    path: str | None = None
    request_id: str | None = None
    """The id the refused caller was given (an HTTP-stage refusal answers with it); else the
    record gets a new one."""
    time: datetime = field(default_factory=lambda: datetime.now(UTC))


RefusalHook = Callable[[RefusalEvent], None]


def audit_refusals(auditor: Any, *, side: str = "provider") -> RefusalHook:
    """A hook that records each refusal with ``auditor`` (an ``ncp.audit.record.Auditor``) as a
    ``refusal`` step with a serious-failure outcome. The claimed country of an untrusted
    certificate goes into the details, not into ``peer_country``: nobody established it."""
    from ncp.audit.models import Action, Outcome
    from ncp.audit.record import AuditEvent

    def record(event: RefusalEvent) -> None:
        auditor.record(
            AuditEvent(
                action=Action.REFUSAL,
                side=side,
                request_id=event.request_id or f"tls-{uuid.uuid4()}",
                outcome=Outcome.SERIOUS_FAILURE,
                reason=f"{_LAYER[event.stage]} ({event.stage}): {event.reason}"[:2000],
                details={
                    k: v
                    for k, v in {
                        "stage": event.stage,
                        "client": event.client,
                        "status": event.status,
                        "certificate": event.certificate,
                        "claimed_country": event.claimed_country,
                        "path": event.path,
                    }.items()
                    if v is not None
                },
            )
        )

    return record


_LAYER = {"handshake": "mutual TLS", "request": "mutual TLS", "http": "HTTP"}


def _report(hook: RefusalHook | None, event: RefusalEvent) -> None:
    # No patient data can be in an event: it is decided before any request body is read.
    log.warning(
        "%s refused (%s) %s: %s%s",
        _LAYER[event.stage],
        event.stage,
        event.client or "?",
        event.reason,
        f" [{event.certificate}]" if event.certificate else "",
    )
    if hook is not None:
        try:
            hook(event)
        except Exception:  # the refusal stands even if recording it failed
            log.exception("on_refusal hook failed")


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} {format_fingerprint(fingerprint(cert))}"


# --- SSL contexts --------------------------------------------------------------------------------


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION


def server_ssl_context(keystore: KeyStore, trust: TrustList) -> ssl.SSLContext:
    """The standard channel's server context: TLS 1.2+, a client certificate REQUIRED and verified
    against the trust list's CAs (and nothing else: not the system's web CAs)."""
    anchors = trust.ca_bundle_pem()
    if not anchors:
        raise NcpError(f"{trust.source}: no peer CA: no client certificate could ever be trusted")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(keystore.server.cert_path, keystore.server.key_path)
    context.load_verify_locations(cadata=anchors)
    context.set_alpn_protocols(["http/1.1"])
    return context


def client_ssl_context(keystore: KeyStore, anchors: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """A client context for calling a peer: our client certificate, the peer's CAs as the only
    trust anchors, host names checked. Pinned fingerprints are checked after the handshake
    (:func:`check_pinned`), which ``ssl`` cannot do itself."""
    if not anchors:
        raise NcpError("no trust anchors for the peer: refusing to call it unauthenticated")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    context.load_cert_chain(keystore.client.cert_path, keystore.client.key_path)
    context.load_verify_locations(
        cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in anchors)
    )
    return context


def check_pinned(peer: Peer, der: bytes | None) -> None:
    """Refuse a peer's server certificate that is not pinned, when the peer pins any."""
    if not peer.tls_fingerprints:
        return
    if der is None:
        raise PeerNotTrusted(f"{peer.country}: no server certificate to check against its pins")
    cert = x509.load_der_x509_certificate(der)
    if fingerprint(cert) not in peer.tls_fingerprints:
        raise PeerNotTrusted(f"{peer.country}: server certificate {_describe(cert)} is not pinned")


# --- the server: TLS handshake, then h11 with the ASGI TLS extension -----------------------------


def tls_extension(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, server_cert_pem: str | None
) -> dict[str, Any]:
    """The ASGI TLS extension (asgiref ``tls`` extension, spec 0.2) for one connection."""
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name: str | None = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        chain = [cert.public_bytes(serialization.Encoding.PEM).decode("ascii")]
        name = cert.subject.rfc4514_string()
    version = ssl_object.version()
    return {
        "server_cert": server_cert_pem,
        # Python's ssl gives the leaf only (the whole verified chain comes in 3.13).
        "client_cert_chain": chain,
        "client_cert_name": name,
        # Never set: with CERT_REQUIRED an unverified certificate does not get this far.
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(version or ""),
        "cipher_suite": None,  # Python's ssl does not expose the IANA number
    }


class _TlsScope:
    """ASGI wrapper for one connection: every request's scope gets the connection's TLS facts."""

    def __init__(self, app: Any, tls: Mapping[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = dict(self.tls)
        await self.app(scope, receive, send)


class _TlsH11Protocol(H11Protocol):
    server_cert_pem: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:  # cannot happen behind _MutualTlsProtocol; fail closed anyway
            transport.abort()
            return
        self.app = _TlsScope(
            self.config.loaded_app, tls_extension(ssl_object, self.server_cert_pem)
        )


class _Gate(asyncio.Protocol):
    """Holds what TLS decrypts between the end of the handshake and the hand-over to h11.

    ``start_tls`` may deliver the first request bytes (sent with the client's Finished) before it
    returns the new transport; they wait here instead of reaching a protocol not yet connected.
    """

    def __init__(self) -> None:
        self.buffer: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _MutualTlsProtocol(asyncio.Protocol):
    """The protocol uvicorn creates per accepted TCP connection: handshake first (within
    ``handshake_timeout``), then h11 (``inner_class``). Also the gateways' TLS
    (:func:`tls_server_protocol`): uvicorn's own TLS gives a client 60 s to finish a handshake."""

    ssl_context: ssl.SSLContext
    on_refusal: RefusalHook | None = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    inner_class: type[H11Protocol] = _TlsH11Protocol
    _handshakes: set[asyncio.Task[None]]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = _loop or asyncio.get_event_loop()
        self.inner = self.inner_class(
            config=config, server_state=server_state, app_state=app_state, _loop=_loop
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Whatever socket we were given: small request/response exchanges must not wait
            # for delayed ACKs (asyncio only does this for sockets created with IPPROTO_TCP).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self.loop.create_task(self._handshake(transport))
        # Keep a reference: the loop holds tasks weakly.
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, raw: asyncio.Transport) -> None:
        peername = raw.get_extra_info("peername")
        client = f"{peername[0]}:{peername[1]}" if peername else None
        gate = _Gate()
        try:
            tls = await self.loop.start_tls(
                raw,
                gate,
                self.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except ssl.SSLError as exc:
            await self._refuse(RefusalEvent("handshake", _ssl_reason(exc), client))
            return
        except (OSError, TimeoutError) as exc:
            reason = f"TLS handshake failed: {type(exc).__name__}: {exc}"
            await self._refuse(RefusalEvent("handshake", reason, client))
            return
        if tls is None or gate.lost:
            return
        tls.set_protocol(self.inner)
        self.inner.connection_made(tls)
        for chunk in gate.buffer:
            self.inner.data_received(chunk)
        if gate.eof:
            self.inner.eof_received()

    async def _refuse(self, event: RefusalEvent) -> None:
        # The hook may write to a database: keep it off the event loop serving other peers.
        await self.loop.run_in_executor(None, _report, self.on_refusal, event)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words an operator can act on."""
    reason = getattr(exc, "reason", None) or ""
    verify = getattr(exc, "verify_message", None)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate: the standard channel requires mutual TLS"
    if reason in ("UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER"):
        return f"TLS version refused: TLS 1.2 or newer is required ({reason})"
    if reason == "NO_SHARED_CIPHER":
        return "no cipher suite in common: ECDHE with AES-GCM or ChaCha20 is required"
    if reason == "HTTP_REQUEST":
        return "plain HTTP on the standard channel: it speaks HTTPS with mutual TLS only"
    if verify:
        return f"client certificate refused: {verify}"
    return f"TLS handshake failed: {reason or exc}"


def tls_server_protocol(
    context: ssl.SSLContext,
    inner: type[H11Protocol],
    *,
    on_refusal: RefusalHook | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> type[asyncio.Protocol]:
    """A uvicorn ``http`` protocol class that runs the TLS handshake with ``context`` itself,
    then hands the connection to ``inner``. Handshake failures go to ``on_refusal``."""
    return type(
        "TlsServerProtocol",
        (_MutualTlsProtocol,),
        {
            "ssl_context": context,
            "on_refusal": staticmethod(on_refusal) if on_refusal else None,
            "handshake_timeout": handshake_timeout,
            "inner_class": inner,
            "_handshakes": set(),
        },
    )


def mutual_tls_protocol(
    context: ssl.SSLContext,
    *,
    on_refusal: RefusalHook | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    server_cert_pem: str | None = None,
    limits: HttpSection | None = None,
) -> type[asyncio.Protocol]:
    """A uvicorn ``http`` protocol class serving HTTPS with ``context`` (see the module doc),
    each connection held to ``limits`` (:mod:`ncp.security.http_limits`; default ``[http]``)."""
    inner: type[H11Protocol] = type(
        "TlsH11Protocol", (_TlsH11Protocol,), {"server_cert_pem": server_cert_pem}
    )

    def http_refusal(status: int, reason: str, client: str | None, request_id: str) -> None:
        event = RefusalEvent("http", reason, client, status=status, request_id=request_id)
        _report(on_refusal, event)

    inner = guarded(
        inner, limits or HttpSection(), render=_outcome_body, on_refusal=http_refusal
    )
    return tls_server_protocol(
        context, inner, on_refusal=on_refusal, handshake_timeout=handshake_timeout
    )


def _outcome_body(status: int, reason: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A refusal below the application, as the standard channel answers every refusal."""
    code = {408: "timeout", 431: "too-costly"}.get(status, "structure")
    body = json.dumps(operation_outcome(reason, code)).encode("utf-8")
    return [(b"content-type", b"application/fhir+json; charset=utf-8")], body


class MutualTlsServer(uvicorn.Server):
    """uvicorn's server, saying truly what it serves when it starts. uvicorn sees plain TCP (the
    handshake is ours, step 1 of the module doc) and would log ``Uvicorn running on http://``
    for a port that answers nothing but HTTPS with a client certificate."""

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        for sock in listeners:
            host, port = sock.getsockname()[:2]
            where = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info(
                "standard channel on https://%s:%d (mutual TLS: a client certificate from the "
                "trust list is required; Ctrl-C to quit)",
                where,
                port,
            )


def make_server(
    app: Any,
    context: ssl.SSLContext,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    on_refusal: RefusalHook | None = None,
    handshake_timeout: float | None = None,
    server_cert_pem: str | None = None,
    log_level: str = "info",
    limits: HttpSection | None = None,
) -> uvicorn.Server:
    """A uvicorn server for ``app`` on the standard channel; ``run()`` it, or ``serve(sockets)``.
    ``limits``: the connection limits (``[http]``); the handshake must end within their
    ``header_timeout_s`` unless ``handshake_timeout`` says otherwise."""
    limits = limits or HttpSection()
    protocol = mutual_tls_protocol(
        context,
        on_refusal=on_refusal,
        handshake_timeout=handshake_timeout or limits.header_timeout_s,
        server_cert_pem=server_cert_pem,
        limits=limits,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        # The peer is who TLS says it is: no X-Forwarded-For may rewrite the client address.
        proxy_headers=False,
        server_header=False,
        log_level=log_level,
        **uvicorn_options(limits),
    )
    return MutualTlsServer(config)


def standard_channel(
    app: FastAPI,
    settings: NodeSettings,
    *,
    host: str = "0.0.0.0",
    port: int | None = None,
    on_refusal: RefusalHook | None = None,
    log_level: str = "info",
) -> uvicorn.Server:
    """A node's standard channel, ready to run: its keys and trust list loaded and checked,
    :func:`tls_peer`'s state installed on ``app``, HTTPS with required client certificates.

    ``port`` defaults to the port of ``urls.standard`` (443 if it names none).
    """
    keystore = KeyStore.load(settings.keys.dir, country=settings.node.country)
    trust = TrustList.load(settings.trust.list, fetcher=MutualTlsJwksFetcher(keystore))
    install(app, trust, on_refusal)
    context = server_ssl_context(keystore, trust)
    if port is None:
        port = urlsplit(settings.urls.standard).port or 443
    server_pem = keystore.server.certificate.public_bytes(serialization.Encoding.PEM).decode()
    log.info("standard channel: mutual TLS on %s:%d, %d peers", host, port, len(trust.peers()))
    return make_server(
        app,
        context,
        host=host,
        port=port,
        on_refusal=on_refusal,
        server_cert_pem=server_pem,
        log_level=log_level,
        limits=settings.http,
    )


def serve(
    app: FastAPI,
    settings: NodeSettings,
    *,
    host: str = "0.0.0.0",
    port: int | None = None,
    on_refusal: RefusalHook | None = None,
) -> None:
    """Run a node's standard channel (:func:`standard_channel`) until stopped."""
    standard_channel(app, settings, host=host, port=port, on_refusal=on_refusal).run()


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: a free one), for ``server.run(sockets=[...])`` in tests."""
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets whose proto says TCP, and
    # with Nagle on, a response written as headers then body waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


# --- the application side ------------------------------------------------------------------------


def operation_outcome(diagnostics: str, code: str = "security") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


class TlsPeerRefused(NcpError):
    """The caller's TLS identity is not a trusted peer; answered with ``status``."""

    def __init__(self, status: int, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.diagnostics)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TlsPeerRefused)
    return JSONResponse(exc.outcome(), status_code=exc.status, media_type="application/fhir+json")


def install(app: FastAPI, trust: TrustList, on_refusal: RefusalHook | None = None) -> None:
    """Give ``app`` the trust list :func:`tls_peer` checks against, and the handler that turns its
    refusals into OperationOutcome answers."""
    app.state.ncp_trust = trust
    app.state.ncp_on_refusal = on_refusal
    app.add_exception_handler(TlsPeerRefused, _refused)


def client_certificate(scope: Mapping[str, Any]) -> x509.Certificate | None:
    """The verified client certificate of the connection, from the ASGI TLS extension."""
    tls = scope.get("extensions", {}).get("tls")
    if not isinstance(tls, Mapping) or tls.get("client_cert_error"):
        return None
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return x509.load_pem_x509_certificate(str(chain[0]).encode("ascii"))


async def tls_peer(request: Request) -> Peer:
    """FastAPI dependency: the trusted peer at the other end of this request's mutual TLS.

    Fails closed: no TLS extension, no certificate, or a certificate that identifies no peer on
    the trust list all refuse the request (401 / 403, FHIR OperationOutcome, refusal event).
    Async on purpose: the check is a cached lookup, not worth a trip through the thread pool;
    only the refusal hook (which may write to a database) runs there.
    """
    trust: TrustList | None = getattr(request.app.state, "ncp_trust", None)
    hook: RefusalHook | None = getattr(request.app.state, "ncp_on_refusal", None)
    client = f"{request.client.host}:{request.client.port}" if request.client else None

    async def refuse(
        status: int, reason: str, cert: x509.Certificate | None = None
    ) -> TlsPeerRefused:
        event = RefusalEvent(
            "request",
            reason,
            client,
            status=status,
            certificate=_describe(cert) if cert is not None else None,
            claimed_country=subject_country(cert) if cert is not None else None,
            path=request.url.path,
        )
        await run_in_threadpool(_report, hook, event)
        return TlsPeerRefused(status, reason)

    if trust is None:
        raise await refuse(500, "mutual TLS is not set up on this node (ncp.security.mtls.install)")
    cert = client_certificate(request.scope)
    if cert is None:
        raise await refuse(
            401,
            "no client certificate: the standard channel requires mutual TLS with a "
            "certificate of a peer on the trust list",
        )
    try:
        peer = trust.match_certificate(cert)
    except PeerNotTrusted as exc:
        raise await refuse(403, str(exc), cert) from None
    request.state.tls_peer = peer
    return peer


TlsPeer = Annotated[Peer, Depends(tls_peer)]
"""A route parameter of this type is the verified calling peer."""


# --- fetching a peer's JWKS over mutual TLS ------------------------------------------------------


class MutualTlsJwksFetcher:
    """Fetches a peer's JWKS from its ``jwks_url`` with this node's client certificate, checking
    the peer's server certificate against its trust list CAs (and pins). Small and bounded: a
    JWKS larger than ``max_bytes`` or slower than ``timeout`` is refused."""

    def __init__(
        self, keystore: KeyStore, *, timeout: float = 5.0, max_bytes: int = 64 * 1024
    ) -> None:
        self.keystore = keystore
        self.timeout = timeout
        self.max_bytes = max_bytes

    def __call__(self, peer: Peer, anchors: Sequence[x509.Certificate]) -> Mapping[str, Any]:
        url = peer.jwks_url
        if not url:
            raise JwksUnavailable(f"{peer.country}: no jwks_url")
        context = client_ssl_context(self.keystore, peer.tls_ca or anchors)
        try:
            with (
                httpx.Client(verify=context, timeout=self.timeout, follow_redirects=False) as http,
                http.stream(
                    "GET", url, headers={"Accept": "application/jwk-set+json, application/json"}
                ) as response,
            ):
                stream = response.extensions.get("network_stream")
                ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
                check_pinned(peer, ssl_object.getpeercert(True) if ssl_object else None)
                if response.status_code != 200:
                    raise JwksUnavailable(f"{url}: HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise JwksUnavailable(f"{url}: larger than {self.max_bytes} bytes")
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        except PeerNotTrusted as exc:
            raise JwksUnavailable(str(exc)) from exc
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise JwksUnavailable(f"{url}: not JSON") from exc
        if not isinstance(document, dict):
            raise JwksUnavailable(f"{url}: not a JSON object")
        return document
