"""What each listener says when it starts is true: the standard channel serves HTTPS with mutual
TLS (its handshake is ours, so uvicorn alone would log ``http://``), the gateways HTTPS."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from ncp.gateway.server import TlsFiles, imaging_server
from ncp.security import mtls
from ncp.security.keystore import KeyStore
from ncp.security.trust import TrustList
from tests.security_support import make_node, trust_toml


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def started_lines(server: uvicorn.Server) -> list[str]:
    """Run ``server`` on a free port until it has started; what ``uvicorn.error`` logged."""
    handler = Lines()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        logger.removeHandler(handler)
    return handler.lines


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeyStore, Path]]:
    root = tmp_path_factory.mktemp("listeners")
    at, be = make_node(root, "AT"), make_node(root, "BE")
    (root / "trust.toml").write_text(
        trust_toml(
            {
                "BE": {
                    "standard": "https://localhost/fhir",
                    "tls_ca": str(be.path("ca.pem")),
                    "jwks_file": str(be.path("jwks.json")),
                }
            }
        )
    )
    yield KeyStore.load(at.directory, country="AT"), root / "trust.toml"


def test_the_standard_channel_says_https_with_mutual_tls(keys: tuple[KeyStore, Path]) -> None:
    keystore, trust_file = keys
    trust = TrustList.load(trust_file)
    server = mtls.make_server(
        FastAPI(), mtls.server_ssl_context(keystore, trust), host="127.0.0.1", port=0
    )
    lines = [line for line in started_lines(server) if "://" in line]
    assert lines, "no line names the listener"
    assert not any("http://" in line for line in lines), lines
    assert any("https://127.0.0.1:" in line and "mutual TLS" in line for line in lines), lines


def test_the_imaging_gateway_says_https(keys: tuple[KeyStore, Path]) -> None:
    keystore, _ = keys
    tls = TlsFiles(keystore.server.cert_path, keystore.server.key_path)
    server = imaging_server(FastAPI(), host="127.0.0.1", port=0, tls=tls)
    lines = [line for line in started_lines(server) if "://" in line]
    assert lines and all("https://127.0.0.1:" in line for line in lines), lines
