"""Country B's node with the portal, for the portal's tests and benchmark.

:func:`portal_node` makes B's test PKI (BE) and a trusted peer A (AT) on its trust list, B's
settings with ``[portal]`` enabled, and the node (SQLite, migrated). :class:`Clock` is a clock
the tests move (idle timeout, lock-out expiry). :func:`serve_portal` serves the portal over
HTTPS with B's server certificate on a free loopback port, as ``ncp serve`` does
(``ncp.serve.portal_server``), until the context ends. :func:`add_hp` creates an account and
returns its TOTP secret; :func:`totp_now` the code an authenticator app would show.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import uvicorn

from ncp.config import settings_from_mapping
from ncp.node import Node
from ncp.portal.accounts import HpProfile, create_account
from ncp.portal.app import ListSource, build_portal_app
from ncp.portal.oidc import OidcClient
from ncp.security.mtls import bind
from tests.security_support import make_node, trust_toml

B, A = "BE", "AT"
PASSWORD = "correct horse battery staple"


class Clock:
    """A settable aware-UTC clock (starts at the real time)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def portal_node(
    root: Path,
    *,
    clock: Clock | None = None,
    port: int = 0,
    database_url: str | None = None,
    **portal: Any,
) -> Node:
    """B's node with the portal under ``root``; the PKI and trust list are made once per root,
    so several replicas of one node share them (and ``database_url``)."""
    root.mkdir(parents=True, exist_ok=True)
    trust = root / "trust.toml"
    if not trust.exists():
        _make_pki(root, trust)
    settings = settings_from_mapping(
        {
            "node": {"country": B, "name": "NCPeH-BE imaging (test)"},
            "urls": {"standard": "https://ncp.be.test/fhir"},
            "database": {"url": database_url or f"sqlite:///{root / 'node-b.db'}"},
            "archive": {"kind": "folder", "path": str(root / "archive")},
            "keys": {"dir": str(root / B.lower())},
            "trust": {"list": str(trust)},
            "listen": {"portal_port": port},
            "portal": {"enabled": True, "url": f"https://localhost:{port or 8447}", **portal},
        },
        base_dir=root,
    )
    return Node.from_settings(settings, clock=clock)


def _make_pki(root: Path, trust: Path) -> None:
    make_node(root, B)
    a = make_node(root, A)
    trust.write_text(
        trust_toml(
            {
                A: {
                    "standard": "https://ncp.at.test/fhir",
                    "tls_ca": str(a.path("ca.pem")),
                    "jwks_file": str(a.path("jwks.json")),
                }
            }
        )
    )
    (root / "archive").mkdir(exist_ok=True)


def add_hp(
    node: Node,
    username: str = "dr.peeters",
    *,
    name: str = "Dr. An Peeters",
    language: str = "en",
    password: str | None = PASSWORD,
    oidc_subject: str | None = None,
) -> str | None:
    return create_account(
        node.sessions,
        HpProfile(
            username=username,
            name=name,
            role_code="221",
            role_display="Medical doctors",
            organisation="UZ Leuven",
            organisation_id="urn:oid:1.2.3.4.5",
            point_of_care="Emergency department",
            language=language,
        ),
        password=password,
        oidc_subject=oidc_subject,
        clock=node.clock,
    )


def totp_now(secret: str, clock: Clock | None = None) -> str:
    moment = clock() if clock is not None else datetime.now(UTC)
    return pyotp.TOTP(secret).at(moment)


def totp_next(secret: str, clock: Clock | None = None) -> str:
    """The next step's code (accepted within the window: a fresh code after one was used)."""
    moment = clock() if clock is not None else datetime.now(UTC)
    return pyotp.TOTP(secret).at(moment, counter_offset=1)


@dataclass
class ServedPortal:
    url: str
    node: Node


@contextmanager
def serve_portal(
    node: Node,
    *,
    list_source: ListSource | None = None,
    oidc: OidcClient | None = None,
) -> Iterator[ServedPortal]:
    sock = bind()
    port = sock.getsockname()[1]
    app = build_portal_app(node, list_source=list_source, oidc=oidc)
    config = uvicorn.Config(
        app,
        ws="none",
        lifespan="on",
        proxy_headers=False,
        log_level="warning",
        ssl_certfile=str(node.keystore.server.cert_path),
        ssl_keyfile=str(node.keystore.server.key_path),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("the portal did not start")
    try:
        yield ServedPortal(f"https://localhost:{port}", node)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
