"""``ncp edge --config FILE``: the option C edge gateway, run by country A before its national
archive.

Stateless apart from its own audit database: it trusts A's signing keys (a JWKS file, re-read
when A rotates), holds no database of A's node, and serves the same DICOMweb gateway as option A
(:func:`ncp.gateway.app.build_gateway_app`) over HTTPS with its own server certificate, at the
public base that A writes into option C tokens (``edge.audience``, node A's ``urls.edge``).

Like ``ncp serve`` it is observed (request ids, latency by route, one log line per request,
``--log-format json``), counts its audit trail in Prometheus metrics, answers /healthz, /readyz
(its audit database and the archive) and /metrics on ``listen.ops_port`` when set, and stops
gracefully on SIGTERM (docs/operations.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from ncp.config import EdgeSettings, load_edge_settings
from ncp.errors import ConfigError

log = logging.getLogger(__name__)


def edge_port(settings: EdgeSettings) -> int:
    """The port to bind: ``listen.port``, or the port of the audience URL when 0."""
    if settings.listen.port:
        return settings.listen.port
    parts = urlsplit(settings.edge.audience)
    if parts.port:
        return parts.port
    return 443 if parts.scheme == "https" else 80


def build_edge_app(settings: EdgeSettings) -> Any:
    """The edge gateway's app from its settings (opens its audit database, migrating it)."""
    # Imported here: `ncp --help` and the other commands need none of the gateway's stack.
    from ncp.audit.models import Side
    from ncp.audit.record import Auditor
    from ncp.gateway.access import JwksFileKeys
    from ncp.gateway.app import build_gateway_app
    from ncp.store.db import make_engine, migrate, session_factory

    if urlsplit(settings.edge.audience).scheme != "https":
        raise ConfigError("edge.audience: the edge gateway serves HTTPS only")
    keys = JwksFileKeys(settings.edge.jwks, settings.edge.country)
    engine = make_engine(settings.database.url)
    migrate(engine)
    sessions = session_factory(engine)
    auditor = Auditor(sessions, country=settings.edge.country)
    app = build_gateway_app(
        archive=settings.archive,
        public_base=settings.edge.audience,
        issuer=settings.edge.country,
        keys=keys,
        auditor=auditor,
        side=Side.EDGE,
        limits=settings.gateway,
        tokens=settings.tokens,
    )
    # For the operations of `ncp edge`: readiness reads the audit database, metrics count
    # the records the auditor writes.
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.auditor = auditor
    return app


def run_edge(
    settings: EdgeSettings, *, log_level: str = "info", log_format: str | None = None
) -> int:
    """Serve the edge gateway until SIGTERM/SIGINT (gracefully); returns the exit code."""
    import asyncio

    from ncp.audit.record import install_log_filter
    from ncp.gateway.server import TlsFiles, imaging_server, protocol_refusals
    from ncp.ops.health import Check, Readiness, archive_probe, database_probe
    from ncp.ops.logs import LogFormat, configure_logging
    from ncp.ops.metrics import Metrics
    from ncp.ops.observe import ObservedApp
    from ncp.ops.runner import NamedServer, ops_server, run_servers

    tls = TlsFiles(settings.tls.certificate, settings.tls.key)
    for path in tls:
        if not path.is_file():
            raise ConfigError(f"tls: {path}: no such file")
    app = build_edge_app(settings)
    metrics = Metrics()
    app.state.auditor.observers.append(metrics.observe_audit)
    metrics.watch_database(app.state.sessions)
    host, port = settings.listen.host, edge_port(settings)
    observed = ObservedApp(app, listener="edge", metrics=metrics)
    edge = NamedServer(
        "edge",
        imaging_server(
            observed,
            host=host,
            port=port,
            tls=tls,
            log_level=log_level,
            limits=settings.http,
            on_refusal=protocol_refusals(app),
        ),
    )
    timeout = settings.ops.check_timeout_s
    readiness = Readiness(
        [
            Check("database", database_probe(app.state.engine), timeout),
            Check("archive", archive_probe(settings.archive, timeout), timeout),
        ],
        cache_s=settings.ops.readiness_cache_s,
    )
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
        configure_logging(cast(LogFormat, log_format), log_level)
    install_log_filter()
    return asyncio.run(
        run_servers([edge], grace_s=settings.ops.shutdown_grace_s, ops=ops, readiness=readiness)
    )


def register(subparsers: Any) -> None:
    """Add ``edge`` to the ``ncp`` command."""
    edge = subparsers.add_parser(
        "edge", help="run the option C edge gateway in front of the national archive"
    )
    edge.add_argument("--config", type=Path, required=True, help="the edge gateway's TOML file")
    edge.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    edge.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line (default: text)",
    )
    edge.set_defaults(handler=_cmd_edge)


def _cmd_edge(args: argparse.Namespace) -> int:
    return run_edge(
        load_edge_settings(args.config), log_level=args.log_level, log_format=args.log_format
    )
