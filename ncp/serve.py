"""``ncp serve --config FILE``: run a node's standard channel (and its option A gateway).

This module is part of the composition root (with :mod:`ncp.node` and :mod:`ncp.app`): it
assembles the servers of the roles a node's configuration enables, so that ``provider/``,
``consumer/``, ``gateway/`` and ``viewer/`` never need to know of each other.

The standard channel is HTTPS with mutual TLS (``ncp.security.mtls``): the handshake requires a
client certificate of a peer on the trust list, or of this node's own CA (its national systems,
for report ingest; the application then tells the two apart). Handshake refusals are written to
the audit chain as ``refusal`` records; request-stage refusals are audited by the application.

The imaging channel (option A) is served from the same process on ``listen.imaging_port`` when
``urls.imaging`` is set (``ncp.gateway.app.build_gateway_app``): HTTPS with
the node's server certificate; image access tokens authorise its requests, not certificates.

The viewer channel (option B) is served on ``listen.viewer_port`` when ``urls.viewer`` is set
(``ncp.viewer.launch.build_option_b_app``): HTTPS with the node's server certificate and no
client certificate (browsers have none); a one-time launch code opens a session.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ncp.app import build_app
from ncp.audit.models import Side
from ncp.config import load_settings
from ncp.errors import ConfigError
from ncp.gateway.app import build_gateway_app
from ncp.gateway.server import TlsFiles, imaging_server, protocol_refusals
from ncp.gateway.studyindex import NodeIndex
from ncp.node import Node
from ncp.security.keys import KeySet
from ncp.security.mtls import audit_refusals, make_server, server_ssl_context
from ncp.viewer.launch import build_option_b_app

log = logging.getLogger(__name__)

EXIT_OK = 0


def node_ssl_context(node: Node) -> ssl.SSLContext:
    """The standard channel's server context: peers' CAs (trust list) and this node's own CA
    as trust anchors, a client certificate required."""
    context = server_ssl_context(node.keystore, node.trust)
    own = "".join(
        ca.public_bytes(serialization.Encoding.PEM).decode("ascii")
        for ca in node.keystore.ca_certificates
    )
    if own:
        context.load_verify_locations(cadata=own)
    return context


def standard_server(
    node: Node, app: FastAPI, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Server:
    """The standard channel's server for ``app``, handshake refusals audited."""
    server_pem = node.keystore.server.certificate.public_bytes(serialization.Encoding.PEM)
    return make_server(
        app,
        node_ssl_context(node),
        host=host,
        port=port,
        on_refusal=audit_refusals(node.auditor),
        server_cert_pem=server_pem.decode("ascii"),
        log_level=log_level,
        limits=node.settings.http,
    )


def gateway_app(node: Node) -> Any | None:
    """The option A DICOMweb gateway app, or None when the node publishes no ``urls.imaging``."""
    settings = node.settings
    if not settings.urls.imaging:
        return None

    def own_keys(issuer: str) -> KeySet | None:
        # Resolved per token, so a rotated signing key is accepted as soon as it signs.
        return node.keystore.published_keys() if issuer == node.country else None

    return build_gateway_app(
        archive=settings.archive,
        public_base=settings.urls.imaging,
        issuer=node.country,
        keys=own_keys,
        auditor=node.auditor,
        side=Side.GATEWAY,
        limits=settings.gateway,
        tokens=settings.tokens,
        clock=node.clock,
        # Retrieves list a study's instances from the node's index, not the archive.
        index=NodeIndex(node.sessions),
    )


def node_imaging_server(
    node: Node, app: Any, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Server:
    """The option A gateway's server: HTTPS with the node's server certificate, the node's
    connection limits, refusals below the app audited by the gateway."""
    tls = TlsFiles(node.keystore.server.cert_path, node.keystore.server.key_path)
    return imaging_server(
        app,
        host=host,
        port=port,
        tls=tls,
        log_level=log_level,
        limits=node.settings.http,
        on_refusal=protocol_refusals(app),
    )


def viewer_app(node: Node) -> Any | None:
    """The option B viewer app, or None when the node publishes no ``urls.viewer``."""
    settings = node.settings
    if not settings.urls.viewer:
        return None

    def own_keys(issuer: str) -> KeySet | None:
        return node.keystore.published_keys() if issuer == node.country else None

    return build_option_b_app(
        archive=settings.archive,
        public_base=settings.urls.viewer,
        issuer=node.country,
        keys=own_keys,
        replay=node.replay,
        sessions=node.sessions,
        auditor=node.auditor,
        settings=settings.viewer,
        leeway_s=settings.tokens.leeway_s,
        clock=node.clock,
    )


def node_viewer_server(
    node: Node, app: Any, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Server:
    """The viewer's server: HTTPS with the node's server certificate, uvicorn's plain h11
    protocol (the relay protocol of the imaging channel is for DICOM streams, not pages and
    images), the node's connection limits like every listener."""
    tls = TlsFiles(node.keystore.server.cert_path, node.keystore.server.key_path)
    return imaging_server(
        app,
        host=host,
        port=port,
        tls=tls,
        log_level=log_level,
        protocol=H11Protocol,
        limits=node.settings.http,
    )


def _port(listen_port: int, url: str, setting: str) -> int:
    if listen_port:
        return listen_port
    parts = urlsplit(url)
    if not parts.scheme:
        raise ConfigError(f"{setting} is not set: the node does not know where it is served")
    return parts.port or (443 if parts.scheme == "https" else 80)


def serve(node: Node, *, log_level: str = "info") -> None:
    """Run the node's servers until stopped (Ctrl-C / SIGTERM)."""
    settings = node.settings
    if not settings.urls.standard.startswith("https://"):
        raise ConfigError("urls.standard must be an https:// URL: the standard channel is HTTPS")
    host = settings.listen.host
    servers = [
        standard_server(
            node,
            build_app(node),
            host=host,
            port=_port(settings.listen.standard_port, settings.urls.standard, "urls.standard"),
            log_level=log_level,
        )
    ]
    gateway = gateway_app(node)
    if gateway is not None:
        port = _port(settings.listen.imaging_port, settings.urls.imaging, "urls.imaging")
        servers.append(
            node_imaging_server(node, gateway, host=host, port=port, log_level=log_level)
        )
    else:
        log.info("urls.imaging is not set: the option A gateway is not served")
    viewer = viewer_app(node)
    if viewer is not None:
        port = _port(settings.listen.viewer_port, settings.urls.viewer, "urls.viewer")
        servers.append(node_viewer_server(node, viewer, host=host, port=port, log_level=log_level))
    else:
        log.info("urls.viewer is not set: the option B viewer is not served")

    async def run_all() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(run_all())


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``ncp`` command's sub-commands."""
    parser = subparsers.add_parser(
        "serve",
        help="run the node: the standard channel (FHIR, mutual TLS), the option A gateway and the "
        "option B viewer",
    )
    parser.add_argument("--config", required=True, help="the node's TOML file")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    settings = load_settings(Path(args.config))
    node = Node.from_settings(settings)
    try:
        serve(node, log_level=args.log_level)
    finally:
        node.close()
    return EXIT_OK
