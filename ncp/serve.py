"""``ncp serve --config FILE``: run a node's standard channel (and its option A gateway).

This module is part of the composition root (with :mod:`ncp.node` and :mod:`ncp.app`): it
assembles the servers of the roles a node's configuration enables, so that ``provider/``,
``consumer/``, ``gateway/`` and ``viewer/`` never need to know of each other.

The standard channel is HTTPS with mutual TLS (``ncp.security.mtls``): the handshake requires a
client certificate of a peer on the trust list, or of this node's own CA (its national systems,
for report ingest; the application then tells the two apart). Handshake refusals are written to
the audit chain as ``refusal`` records; request-stage refusals are audited by the application.

The HP portal (``ncp.portal``) is served on ``listen.portal_port`` when ``portal.enabled``:
HTTPS with the node's server certificate (:func:`portal_server`).

The imaging channel (option A) is served from the same process on ``listen.imaging_port`` when
``urls.imaging`` is set (``ncp.gateway.app.build_gateway_app``): HTTPS with
the node's server certificate; image access tokens authorise its requests, not certificates.

The viewer channel (option B) is served on ``listen.viewer_port`` when ``urls.viewer`` is set
(``ncp.viewer.launch.build_option_b_app``): HTTPS with the node's server certificate and no
client certificate (browsers have none); a one-time launch code opens a session.

Country B's retrieval workers (``ncp.consumer.service``) run in the same process when
``[retrieval] enabled``: the lanes' worker threads and the retention purge, started once the
listeners are up; on SIGTERM the jobs under way are handed back (queued again after the instance
each is receiving) for another replica or the next start to resume.

Each role is a function of :data:`ROLES` that returns its server (or, for work without a
listener, its :class:`~ncp.ops.runner.NamedWorker`), or None when the node's configuration does
not enable it; a new role is one function and one line there. Around them,
:func:`serve` adds what operators need (docs/operations.md): every role's app observed
(request ids, latency by route, a log line per request: :mod:`ncp.ops.observe`), the metrics of
the audit trail and the database, the operations listener (``listen.ops_port``: /healthz,
/readyz, /metrics) and a graceful stop on SIGTERM (:mod:`ncp.ops.runner`). ``ncp serve`` checks
the configuration first (:mod:`ncp.ops.checks`) and does not start on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
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
from ncp.ops.health import Check, Readiness, archive_probe, database_probe, peer_probe
from ncp.ops.logs import LOG_FORMATS, LogFormat, configure_logging
from ncp.ops.metrics import Metrics
from ncp.ops.observe import ObservedApp
from ncp.ops.runner import NamedServer, NamedWorker, ops_server, run_servers
from ncp.security.keys import KeySet
from ncp.security.mtls import (
    audit_refusals,
    check_pinned,
    client_ssl_context,
    make_server,
    server_ssl_context,
)
from ncp.viewer.launch import build_option_b_app

log = logging.getLogger(__name__)


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


def own_keys(node: Node) -> Callable[[str], KeySet | None]:
    """The keys that verify the image access tokens the node itself issued (the gateway's and
    the viewer's): the node's published signing keys for its own country, None for any other
    issuer."""

    def keys(issuer: str) -> KeySet | None:
        # Resolved per token, so a rotated signing key is accepted as soon as it signs.
        return node.keystore.published_keys() if issuer == node.country else None

    return keys


def gateway_app(node: Node) -> Any | None:
    """The option A DICOMweb gateway app, or None when the node publishes no ``urls.imaging``."""
    settings = node.settings
    if not settings.urls.imaging:
        return None
    return build_gateway_app(
        archive=settings.archive,
        public_base=settings.urls.imaging,
        issuer=node.country,
        keys=own_keys(node),
        auditor=node.auditor,
        side=Side.GATEWAY,
        limits=settings.gateway,
        tokens=settings.tokens,
        clock=node.clock,
        # Retrieves list a study's instances from the node's index, not the archive.
        index=NodeIndex(node.sessions),
    )


def node_tls(node: Node) -> TlsFiles:
    """The node's server certificate and key, as every browser- and gateway-facing HTTPS
    listener presents them (the standard channel has its own context: mutual TLS)."""
    return TlsFiles(node.keystore.server.cert_path, node.keystore.server.key_path)


def page_server(
    node: Node, app: Any, *, host: str, port: int, log_level: str, label: str
) -> uvicorn.Server:
    """A listener for pages and images (the option B viewer, the HP portal): the server every
    HTTPS listener of the node runs (no WebSockets, no Server header, the lifespan required),
    with the node's server certificate, uvicorn's plain h11 protocol and the node's connection
    limits; ``label`` says what the start-up line names as served."""
    return imaging_server(
        app,
        host=host,
        port=port,
        tls=node_tls(node),
        log_level=log_level,
        protocol=H11Protocol,
        limits=node.settings.http,
        label=label,
    )


def node_imaging_server(
    node: Node, app: Any, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Server:
    """The option A gateway's server: HTTPS with the node's server certificate, the node's
    connection limits, refusals below the app audited by the gateway."""
    return imaging_server(
        app,
        host=host,
        port=port,
        tls=node_tls(node),
        log_level=log_level,
        limits=node.settings.http,
        on_refusal=protocol_refusals(app),
    )


def viewer_app(node: Node) -> Any | None:
    """The option B viewer app, or None when the node publishes no ``urls.viewer``."""
    settings = node.settings
    if not settings.urls.viewer:
        return None
    return build_option_b_app(
        archive=settings.archive,
        public_base=settings.urls.viewer,
        issuer=node.country,
        keys=own_keys(node),
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
    return page_server(
        node, app, host=host, port=port, log_level=log_level, label="option B viewer"
    )


def portal_server(node: Node, *, host: str, log_level: str = "info") -> uvicorn.Server:
    """The HP portal (``ncp.portal``): HTTPS with the node's server certificate. Proxy headers
    are not read: the lock-out counts failures per client address, which a forged
    X-Forwarded-For must not change."""
    from ncp.portal.app import build_portal_app

    settings = node.settings
    if not settings.portal.url:
        raise ConfigError("portal.enabled needs portal.url (the portal's public https:// URL)")
    port = _port(settings.listen.portal_port, settings.portal.url, "portal.url")
    return page_server(
        node, build_portal_app(node), host=host, port=port, log_level=log_level, label="HP portal"
    )


def _port(listen_port: int, url: str, setting: str) -> int:
    if listen_port:
        return listen_port
    parts = urlsplit(url)
    if not parts.scheme:
        raise ConfigError(f"{setting} is not set: the node does not know where it is served")
    return parts.port or (443 if parts.scheme == "https" else 80)


# -- the roles ------------------------------------------------------------------------------------

Role = Callable[[Node, str], NamedServer | NamedWorker | None]
"""A role of the node: (node, log level) -> its server (or worker), or None when the config does
not enable it."""


def standard_role(node: Node, log_level: str) -> NamedServer | None:
    """The standard channel (provider): always served, HTTPS with mutual TLS."""
    settings = node.settings
    if not settings.urls.standard.startswith("https://"):
        raise ConfigError("urls.standard must be an https:// URL: the standard channel is HTTPS")
    port = _port(settings.listen.standard_port, settings.urls.standard, "urls.standard")
    server = standard_server(
        node, build_app(node), host=settings.listen.host, port=port, log_level=log_level
    )
    return NamedServer("standard", server)


def imaging_role(node: Node, log_level: str) -> NamedServer | None:
    """The option A gateway, when the node publishes ``urls.imaging``."""
    gateway = gateway_app(node)
    if gateway is None:
        log.info("urls.imaging is not set: the option A gateway is not served")
        return None
    settings = node.settings
    port = _port(settings.listen.imaging_port, settings.urls.imaging, "urls.imaging")
    server = node_imaging_server(
        node, gateway, host=settings.listen.host, port=port, log_level=log_level
    )
    return NamedServer("imaging", server)


def viewer_role(node: Node, log_level: str) -> NamedServer | None:
    """The option B viewer, when the node publishes ``urls.viewer``."""
    viewer = viewer_app(node)
    if viewer is None:
        log.info("urls.viewer is not set: the option B viewer is not served")
        return None
    settings = node.settings
    port = _port(settings.listen.viewer_port, settings.urls.viewer, "urls.viewer")
    server = node_viewer_server(
        node, viewer, host=settings.listen.host, port=port, log_level=log_level
    )
    return NamedServer("viewer", server)


def portal_role(node: Node, log_level: str) -> NamedServer | None:
    """Country B's HP portal, when ``portal.enabled``."""
    if not node.settings.portal.enabled:
        return None
    server = portal_server(node, host=node.settings.listen.host, log_level=log_level)
    return NamedServer("portal", server)


def retrieval_role(node: Node, log_level: str) -> NamedServer | NamedWorker | None:
    """Country B's retrieval workers (every lane) and the retention purge, when
    ``[retrieval] enabled``."""
    if not node.settings.retrieval.enabled:
        return None
    from ncp.consumer.service import RetrievalService
    from ncp.consumer.wiring import default_wiring, retrieval_env

    wiring = default_wiring(node)
    env = retrieval_env(node, wiring.access)
    return NamedWorker("retrieval", RetrievalService(env, closing=(env.close, wiring.close)))


ROLES: tuple[Role, ...] = (
    standard_role,
    imaging_role,
    viewer_role,
    portal_role,
    retrieval_role,
)
"""Every role ``ncp serve`` may run, in start order (one line per role)."""


def role_parts(node: Node, log_level: str = "info") -> list[NamedServer | NamedWorker]:
    """The servers and workers of the roles the node's configuration enables."""
    return [named for role in ROLES if (named := role(node, log_level)) is not None]


def role_servers(node: Node, log_level: str = "info") -> list[NamedServer]:
    """The servers of the roles the node's configuration enables."""
    return [p for p in role_parts(node, log_level) if isinstance(p, NamedServer)]


# -- operations -----------------------------------------------------------------------------------


def node_metrics(node: Node) -> Metrics:
    """The node's metrics: its audit trail counted as it is written, its database at scrapes."""
    metrics = Metrics()
    node.auditor.observers.append(metrics.observe_audit)
    metrics.watch_database(node.sessions)
    return metrics


def observe(servers: list[NamedServer], metrics: Metrics | None) -> None:
    """Wrap each server's app in :class:`ObservedApp` (before the server loads it)."""
    for named in servers:
        config = named.server.config
        app: Any = config.app  # an ASGI app object: every role builds one, none is a string
        config.app = ObservedApp(app, listener=named.name, metrics=metrics)


def probed_peers(node: Node) -> list[str]:
    """The peers this node calls: those it asks (``consumer.peers``) and those whose signing
    keys it fetches (``jwks_url``). Peers that only call this node are not probed."""
    wanted = list(node.settings.consumer.peers)
    wanted += [p.country for p in node.trust.peers() if p.jwks_url and p.country not in wanted]
    return wanted


def node_readiness(node: Node) -> Readiness:
    """The database and the archive (required), the peers this node calls (informative)."""
    ops = node.settings.ops
    checks = [
        Check("database", database_probe(node.engine), ops.check_timeout_s),
        Check(
            "archive",
            archive_probe(node.settings.archive, ops.check_timeout_s),
            ops.check_timeout_s,
        ),
    ]
    for country in probed_peers(node):
        peer = node.trust.peer(country)
        context = client_ssl_context(node.keystore, peer.tls_ca or node.trust.ca_certificates())

        def pinned(der: bytes | None, peer: Any = peer) -> None:
            check_pinned(peer, der)

        checks.append(
            Check(
                f"peer {country}",
                peer_probe(peer.standard, context, pinned),
                ops.peer_timeout_s,
                required=False,
                cache_s=ops.peer_cache_s,
            )
        )
    return Readiness(checks, cache_s=ops.readiness_cache_s)


def serve(node: Node, *, log_level: str = "info", log_format: LogFormat | None = None) -> int:
    """Run the node's roles and its operations listener until SIGTERM/SIGINT; returns the exit
    code. ``log_format``: set up the process's log (``ncp serve``); None leaves it alone."""
    settings = node.settings
    parts = role_parts(node, log_level)
    servers = [p for p in parts if isinstance(p, NamedServer)]
    workers = [p for p in parts if isinstance(p, NamedWorker)]
    metrics = node_metrics(node)
    observe(servers, metrics)
    readiness = node_readiness(node)
    ops = None
    if settings.listen.ops_port:
        ops = ops_server(
            readiness,
            metrics,
            host=settings.listen.ops_host,
            port=settings.listen.ops_port,
            log_level=log_level,
            limits=settings.http,
        )
    if log_format is not None:
        configure_logging(log_format, log_level)  # after every server's Config: see ops.logs
    return asyncio.run(
        run_servers(
            servers,
            grace_s=settings.ops.shutdown_grace_s,
            ops=ops,
            readiness=readiness,
            workers=workers,
        )
    )


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``ncp`` command's sub-commands."""
    parser = subparsers.add_parser(
        "serve",
        help="run the node: the standard channel (FHIR, mutual TLS), the option A gateway, the "
        "option B viewer, the portal and the retrieval workers its config enables",
    )
    parser.add_argument("--config", required=True, help="the node's TOML file")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (default: text)",
    )
    parser.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ncp.ops.checks import Findings, check_node

    configure_logging(args.log_format, args.log_level)
    config = Path(args.config)
    settings = load_settings(config)
    findings = Findings()
    check_node(settings, config, findings)
    for problem in findings.warnings:
        log.warning("%s", problem.line())
    if findings.errors:
        raise ConfigError(
            "\n".join(p.line() for p in findings.errors)
            + f"\nncp serve does not start with errors (`ncp check-config --config {config}`)"
        )
    node = Node.from_settings(settings)
    try:
        return serve(node, log_level=args.log_level, log_format=args.log_format)
    finally:
        node.close()
