"""The imaging channel's HTTP server: one uvicorn configuration for option A (``ncp serve``) and
option C (``ncp edge``), so both gateways (and the benches that measure them) run the same way.

Retrieved parts go straight to the transport under ``RelayH11Protocol`` (decision 0006). The
caller is who TLS says it is: no ``X-Forwarded-For`` may rewrite the client that audit records.
No WebSockets and no ``Server`` header: the channel is DICOMweb only. The lifespan is required,
so an app that cannot start (its audit database, say) stops the server instead of serving.

Every connection is held to the ``[http]`` limits (:mod:`ncp.security.http_limits`): the TLS
handshake and each request head within ``header_timeout_s``, idle connections closed, heads
bounded, ambiguous framing refused. The handshake runs in our protocol
(:func:`ncp.security.mtls.tls_server_protocol`, without client certificates: tokens authorise
here), because uvicorn's own TLS gives a client 60 s to finish it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ncp.config import HttpSection
from ncp.gateway.relay import RelayH11Protocol
from ncp.gateway.stream import install_cut_short_filter
from ncp.security.http_limits import ProtocolRefusal, guarded, uvicorn_options


class TlsFiles(NamedTuple):
    """The server's certificate chain and private key, PEM files."""

    certificate: Path
    key: Path


def gateway_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """The gateway's server context: TLS 1.2+, modern suites, no client certificate."""
    from ncp.security.mtls import TLS12_CIPHERS

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.load_cert_chain(tls.certificate, tls.key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def imaging_server(
    app: Any,
    *,
    host: str,
    port: int,
    tls: TlsFiles | None,
    log_level: str = "info",
    protocol: type[asyncio.Protocol] | str = RelayH11Protocol,
    limits: HttpSection | None = None,
    on_refusal: ProtocolRefusal | None = None,
    label: str = "imaging channel (DICOMweb)",
) -> uvicorn.Server:
    """A server for a gateway ``app``; ``tls`` None (plain HTTP) and another ``protocol`` exist
    for measuring alternatives only: the deployed channel is HTTPS under the relay's protocol.
    ``limits``: the connection limits (``[http]``); ``on_refusal``: where refusals below the
    app go (:func:`protocol_refusals`); ``label``: what the start-up line says is served (the
    viewer and the portal run under this server too, with uvicorn's plain h11 protocol)."""
    from ncp.security.mtls import tls_server_protocol

    install_cut_short_filter()  # a transfer cut short: one line, not a traceback
    limits = limits or HttpSection()
    http: type[asyncio.Protocol] | str = protocol
    handshake_ours = False
    if isinstance(protocol, type) and issubclass(protocol, H11Protocol):
        inner = guarded(protocol, limits, on_refusal=on_refusal)
        http = inner
        if tls is not None:
            http = tls_server_protocol(
                gateway_ssl_context(tls), inner, handshake_timeout=limits.header_timeout_s
            )
            tls, handshake_ours = None, True  # our protocol runs the handshake
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        ws="none",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        log_level=log_level,
        ssl_certfile=None if tls is None else str(tls.certificate),
        ssl_keyfile=None if tls is None else str(tls.key),
        **uvicorn_options(limits),
    )
    return _HttpsServer(config, label) if handshake_ours else uvicorn.Server(config)


class _HttpsServer(uvicorn.Server):
    """uvicorn's server, saying truly what it serves: it sees plain TCP (the TLS handshake is
    our protocol's) and would log ``Uvicorn running on http://`` for an HTTPS-only port."""

    def __init__(self, config: uvicorn.Config, label: str) -> None:
        super().__init__(config)
        self.label = label

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        for sock in listeners:
            host, port = sock.getsockname()[:2]
            where = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info(
                "%s on https://%s:%d (Ctrl-C to quit)", self.label, where, port
            )


def protocol_refusals(app: Any) -> ProtocolRefusal | None:
    """The audit hook for refusals below a gateway app (408, 431, 400 on framing): a
    ``refusal`` record of the gateway's side, with the client's address."""
    gateway = getattr(app.state, "gateway", None)
    if gateway is None:
        return None
    audit = gateway.audit

    def record(status: int, reason: str, client: str | None, request_id: str) -> None:
        from ncp.audit.models import Action, Outcome
        from ncp.gateway.auditing import RequestInfo

        info = RequestInfo(request_id=request_id, path="", query="", client=client)
        audit.auditor.record(
            audit.event(
                info,
                Action.REFUSAL,
                None,
                outcome=Outcome.SERIOUS_FAILURE,
                reason=f"HTTP {status}: {reason}",
                details={"status": status, "stage": "http"},
            )
        )

    return record
