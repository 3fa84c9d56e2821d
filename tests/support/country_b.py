"""Country B's node beside a running node A, for tests of B's peer client.

``b_node(root, node_a)`` builds B's node (BE) from settings, as ``ncp serve`` would: B's keys folder
(the test PKI ``running_node`` made for BE), a trust list naming A (AT) with A's CA, its signing
keys and its gateway, B's own SQLite database for B's audit chain, and ``[consumer] peers``.
``trust_changes`` rewrites A's trust list entry (a wrong pin, another CA) and ``extra_peers`` adds
peers (a scripted fake peer, see :class:`FakePeer`).

:class:`FakePeer` is an HTTPS server with mutual TLS that answers from a script (status, headers,
body per request) and records what it received: for the retry tests, where node A cannot be made
to answer 503 on demand.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ncp.audit.models import AuditRecord
from ncp.config import settings_from_mapping
from ncp.consumer.assertions import HpIdentity, isco_role
from ncp.consumer.peer import PeerClient
from ncp.node import Node
from tests.security_support import Node as KeysFolder
from tests.security_support import make_node, trust_toml
from tests.support.node import A, B, RunningNode

HP = HpIdentity(
    subject="BE-HP-0042",
    name="Dr. Anne Peeters",
    role=isco_role("221", "Medical doctors"),
    organisation="UZ Leuven",
    organisation_id="urn:oid:2.16.56.1.1.1.1",
    point_of_care="Emergency department, Gasthuisberg",
    language="nl-BE",
    authentication="http://eidas.europa.eu/LoA/substantial",
)


def a_entry(node_a: RunningNode) -> dict[str, str | list[str]]:
    """A as B's trust list names it: its FHIR base, gateway, CA and signing keys."""
    keys = node_a.ca_file.parent
    entry: dict[str, str | list[str]] = {
        "standard": node_a.url,
        "tls_ca": str(node_a.ca_file),
        "jwks_file": str(keys / "jwks.json"),
    }
    if node_a.imaging_url:
        entry["imaging"] = node_a.imaging_url
    return entry


def b_node(
    root: Path,
    node_a: RunningNode,
    *,
    keys_dir: Path | None = None,
    country: str = B,
    trust_changes: Mapping[str, str | list[str]] | None = None,
    extra_peers: Mapping[str, Mapping[str, str | list[str]]] | None = None,
    consumer: Mapping[str, Any] | None = None,
) -> Node:
    """B's node (see the module doc); ``consumer`` overrides ``[consumer]`` settings."""
    root.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, str | list[str]]] = {
        A: {**a_entry(node_a), **(trust_changes or {})}
    }
    for code, entry in (extra_peers or {}).items():
        entries[code] = dict(entry)
    trust = root / "trust.toml"
    trust.write_text(trust_toml(entries))
    archive = root / "archive"
    archive.mkdir(exist_ok=True)
    consumer_settings: dict[str, Any] = {
        "peers": [A, *(extra_peers or {})],
        "backoff_s": 0.01,
        "retry_after_max_s": 5,
        "connect_timeout_s": 2,
        "timeout_s": 10,
    }
    consumer_settings.update(consumer or {})
    mapping: dict[str, dict[str, Any]] = {
        "node": {"country": country, "name": f"Test node {country}"},
        "urls": {"standard": f"https://ncp.{country.lower()}.test/fhir"},
        "database": {"url": f"sqlite:///{root / 'node-b.db'}"},
        "archive": {"kind": "folder", "path": str(archive)},
        "keys": {"dir": str(keys_dir or node_a.b.keys_dir)},
        "trust": {"list": str(trust)},
        "consumer": consumer_settings,
    }
    # Written out too, for ``ncp ask --config`` (the same settings, read from the file).
    (root / "node.toml").write_text(_toml(mapping))
    settings = settings_from_mapping(mapping, base_dir=root, environ={})
    return Node.from_settings(settings)


def _toml(mapping: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for section, values in mapping.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class Sleeps:
    """A recording stand-in for ``time.sleep`` (retries are asserted, not waited for)."""

    calls: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def b_records(node: Node, request_id: str | None = None) -> list[AuditRecord]:
    """B's audit records (of one correlation id), in chain order."""
    query = select(AuditRecord).order_by(AuditRecord.seq)
    if request_id is not None:
        query = query.where(AuditRecord.request_id == request_id)
    with node.sessions() as session:
        return list(session.scalars(query))


@contextmanager
def b_client(node: Node, sleeps: Sleeps | None = None) -> Iterator[PeerClient]:
    client = PeerClient.from_node(node, sleep=sleeps if sleeps is not None else Sleeps())
    try:
        yield client
    finally:
        client.close()


# --- a scripted peer -----------------------------------------------------------------------------


@dataclass
class Scripted:
    status: int
    body: Mapping[str, Any] | bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Wait this long before answering (a slow peer)."""


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakePeer:
    """A peer's standard channel answering from ``script`` (the last answer repeats)."""

    def __init__(self, keys: KeysFolder, client_ca: Path) -> None:
        self.keys = keys
        self.script: list[Scripted] = []
        self.received: list[Received] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(keys.path("server.pem"), keys.path("server.key"))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                index = min(len(fake.received), len(fake.script)) - 1
                answer = fake.script[index]
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                payload = answer.body
                data = (
                    payload
                    if isinstance(payload, bytes)
                    else json.dumps(payload).encode()
                    if payload is not None
                    else b""
                )
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                rid = self.headers.get("x-request-id")
                if rid:
                    self.send_header("X-Request-ID", rid)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer
            do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://localhost:{self.port}/fhir"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def trust_entry(self) -> dict[str, str | list[str]]:
        return {
            "standard": self.url,
            "tls_ca": str(self.keys.path("ca.pem")),
            "jwks_file": str(self.keys.path("jwks.json")),
        }

    def __enter__(self) -> FakePeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def fake_peer(root: Path, country: str, client_ca: Path) -> FakePeer:
    return FakePeer(make_node(root, country), client_ca)
