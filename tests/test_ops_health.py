"""/healthz and /readyz of a running ``ncp serve``: ready with its database and archive up, not
ready (and still alive) with the archive (Orthanc) or the database (PostgreSQL) stopped; peers
probed by a TLS handshake, at most once per ``peer_cache_s``, never making the node unready."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ncp.config import FolderArchive
from ncp.ops.health import Check, Readiness, archive_probe, ops_app, peer_probe
from ncp.security.keystore import KeyStore
from ncp.security.mtls import check_pinned, client_ssl_context
from ncp.security.trust import Peer, fingerprint
from tests.ops_node import served_node
from tests.ops_support import A, B, production_keys
from tests.support.node import write_dataset
from tests.support.orthanc import OrthancServer, OrthancUnavailable
from tests.support.postgres import PostgresCluster, PostgresUnavailable, services_required


def _unavailable(reason: str) -> None:
    if services_required():
        pytest.fail(f"{reason} (NCP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _ready(node: object, expected: int, timeout: float = 20.0) -> dict[str, object]:
    """/readyz once it answers ``expected`` (a stopped service may take a moment to be seen)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = node.ops_get("/readyz")  # type: ignore[attr-defined]
        if answer.status_code == expected or time.monotonic() > deadline:
            assert answer.status_code == expected, answer.text
            return dict(answer.json())
        time.sleep(0.2)


@pytest.mark.orthanc
def test_a_stopped_archive_makes_the_node_unready_not_dead(tmp_path: Path) -> None:
    try:
        orthanc = OrthancServer.start()
    except OrthancUnavailable as exc:
        _unavailable(f"Orthanc unavailable: {exc}")
        return
    try:
        files = write_dataset(tmp_path / "files")
        assert files and orthanc.upload(sorted((tmp_path / "files").rglob("*.dcm"))) == files
        archive = {"kind": "dicomweb", "url": orthanc.dicomweb_url, "timeout_s": 5}
        with served_node(tmp_path / "node", archive=archive) as node:
            ready = _ready(node, 200)
            assert ready["status"] == "ready"
            assert ready["checks"]["archive"]["ok"] is True  # type: ignore[index]
            orthanc.stop()
            down = _ready(node, 503)
            assert down["status"] == "not ready"
            checks = down["checks"]
            assert checks["archive"]["ok"] is False  # type: ignore[index]
            assert "ConnectError" in checks["archive"]["detail"]  # type: ignore[index]
            assert checks["database"]["ok"] is True  # type: ignore[index]
            assert node.ops_get("/healthz").status_code == 200
            assert node.process.poll() is None
    finally:
        orthanc.stop()


@pytest.mark.postgres
def test_a_stopped_database_makes_the_node_unready_not_dead(tmp_path: Path) -> None:
    try:
        cluster = PostgresCluster.start()
    except PostgresUnavailable as exc:
        _unavailable(f"PostgreSQL unavailable: {exc}")
        return
    try:
        url = cluster.create_database("ncp_ops")
        with served_node(tmp_path / "node", database_url=url) as node:
            assert _ready(node, 200)["checks"]["database"]["ok"] is True  # type: ignore[index]
            cluster.stop()
            down = _ready(node, 503)
            checks = down["checks"]
            assert checks["database"]["ok"] is False  # type: ignore[index]
            assert checks["archive"]["ok"] is True  # type: ignore[index]
            assert node.ops_get("/healthz").status_code == 200
            metrics = node.ops_get("/metrics")  # the scrape answers without the database
            assert metrics.status_code == 200 and "ncp_http_requests_in_flight" in metrics.text
            assert "ncp_audit_chain_length" not in metrics.text
    finally:
        cluster.stop()


# -- peers ----------------------------------------------------------------------------------------


class CountingTlsServer:
    """A TLS server with client certificates required, counting completed handshakes."""

    def __init__(self, keys: Path, client_ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(keys / "server.pem", keys / "server.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(client_ca)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except (ssl.SSLError, OSError):
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peer_world(tmp_path: Path) -> Iterator[tuple[CountingTlsServer, KeyStore, Path]]:
    production_keys(tmp_path / "a", A)
    production_keys(tmp_path / "b", B)
    keystore = KeyStore.load(tmp_path / "b", country=B)  # B probes A
    server = CountingTlsServer(tmp_path / "a", tmp_path / "b" / "ca.pem")
    try:
        yield server, keystore, tmp_path / "a" / "ca.pem"
    finally:
        server.close()


def _peer(port: int, ca: Path, pins: frozenset[bytes] = frozenset()) -> Peer:
    from ncp.security.keystore import load_certificates

    return Peer(
        A,
        f"https://localhost:{port}/fhir",
        tls_ca=tuple(load_certificates(ca)),
        tls_fingerprints=pins,
    )


def test_a_peer_is_probed_at_most_once_per_cache_period(
    peer_world: tuple[CountingTlsServer, KeyStore, Path],
) -> None:
    server, keystore, a_ca = peer_world
    peer = _peer(server.port, a_ca)
    context = client_ssl_context(keystore, peer.tls_ca)
    probe = peer_probe(peer.standard, context, lambda der: check_pinned(peer, der))
    check = Check("peer AT", probe, 3.0, required=False, cache_s=30.0)

    async def many() -> list[object]:
        return list(await asyncio.gather(*(check.result() for _ in range(20))))

    results = asyncio.run(many())
    assert all(r.ok for r in results), results  # type: ignore[attr-defined]
    time.sleep(0.2)
    assert server.handshakes == 1


def test_a_peer_that_fails_its_pins_or_is_down_is_shown_but_does_not_unready(
    peer_world: tuple[CountingTlsServer, KeyStore, Path], tmp_path: Path
) -> None:
    server, keystore, a_ca = peer_world
    wrong_pin = _peer(server.port, a_ca, frozenset({b"\x00" * 32}))
    context = client_ssl_context(keystore, wrong_pin.tls_ca)
    pinned = Check(
        "peer AT",
        peer_probe(wrong_pin.standard, context, lambda der: check_pinned(wrong_pin, der)),
        3.0,
        required=False,
    )
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down_port = closed.getsockname()[1]
    closed.close()
    down_peer = _peer(down_port, a_ca)
    down = Check(
        "peer DE", peer_probe(down_peer.standard, context, lambda der: None), 3.0, required=False
    )
    archive = Check("archive", archive_probe(FolderArchive(path=tmp_path), 2.0), 2.0)
    ready, results = asyncio.run(Readiness([archive, pinned, down]).report())
    assert ready is True
    by_name = {r.name: r for r in results}
    assert by_name["peer AT"].ok is False and "not pinned" in by_name["peer AT"].detail
    assert by_name["peer DE"].ok is False and "ConnectionRefused" in by_name["peer DE"].detail
    # The right pin passes.
    cert_der = (tmp_path / "a" / "server.pem").read_bytes()
    from cryptography import x509

    good = _peer(
        server.port, a_ca, frozenset({fingerprint(x509.load_pem_x509_certificate(cert_der))})
    )
    ok = Check(
        "peer AT", peer_probe(good.standard, context, lambda der: check_pinned(good, der)), 3.0
    )
    assert asyncio.run(ok.result()).ok


def test_the_operations_app_answers_draining_and_missing_metrics(tmp_path: Path) -> None:
    archive = Check("archive", archive_probe(FolderArchive(path=tmp_path / "gone"), 2.0), 2.0)
    readiness = Readiness([archive], cache_s=60)
    transport = httpx.ASGITransport(app=ops_app(readiness, None))

    async def walk() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
            assert (await client.get("/healthz")).json()["pid"] == os.getpid()
            answer = await client.get("/readyz")
            assert answer.status_code == 503
            assert "is missing" in answer.json()["checks"]["archive"]["detail"]
            (tmp_path / "gone").mkdir()
            assert (await client.get("/readyz")).status_code == 503  # cached for cache_s
            readiness.cache_s = 0
            assert (await client.get("/readyz")).status_code == 200
            readiness.draining = True
            assert (await client.get("/readyz")).json() == {"status": "draining", "checks": {}}
            assert (await client.get("/metrics")).status_code == 404

    asyncio.run(walk())
