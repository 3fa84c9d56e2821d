"""The imaging channel's HTTP server: one uvicorn configuration for option A (``ncp serve``) and
option C (``ncp edge``), so both gateways (and the benches that measure them) run the same way.

Retrieved parts go straight to the transport under ``RelayH11Protocol`` (decision 0006). The
caller is who TLS says it is: no ``X-Forwarded-For`` may rewrite the client that audit records.
No WebSockets and no ``Server`` header: the channel is DICOMweb only. The lifespan is required,
so an app that cannot start (its audit database, say) stops the server instead of serving.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, NamedTuple

import uvicorn

from ncp.gateway.relay import RelayH11Protocol
from ncp.gateway.stream import install_cut_short_filter


class TlsFiles(NamedTuple):
    """The server's certificate chain and private key, PEM files."""

    certificate: Path
    key: Path


def imaging_server(
    app: Any,
    *,
    host: str,
    port: int,
    tls: TlsFiles | None,
    log_level: str = "info",
    protocol: type[asyncio.Protocol] | str = RelayH11Protocol,
) -> uvicorn.Server:
    """A server for a gateway ``app``; ``tls`` None (plain HTTP) and another ``protocol`` exist
    for measuring alternatives only: the deployed channel is HTTPS under the relay's protocol."""
    install_cut_short_filter()  # a transfer cut short: one line, not a traceback
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        log_level=log_level,
        ssl_certfile=None if tls is None else str(tls.certificate),
        ssl_keyfile=None if tls is None else str(tls.key),
    )
    return uvicorn.Server(config)
