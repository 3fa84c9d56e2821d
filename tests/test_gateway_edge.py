"""``ncp edge --config FILE``: the edge gateway as the installed command runs it, with its own
TLS certificate, A's JWKS file, and its own audit database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ncp.cli import main
from tests.gateway_support import (
    AS_STORED,
    STUDY_1,
    STUDY_2,
    Tls,
    audit_db,
    bearer,
    free_port,
    token,
    write_jwks,
    write_studies,
)
from tests.support.token_factory import new_key

A_SIGNING = new_key("at-edge-1")
ROTATED = new_key("at-edge-2")


@dataclass
class Edge:
    base: str
    tls: Tls
    jwks: Path
    audit: Path
    process: subprocess.Popen[bytes]


def _config(root: Path, port: int, tls: Tls, archive: str) -> Path:
    path = root / "edge.toml"
    path.write_text(
        f"""
[edge]
country = "AT"
audience = "https://localhost:{port}/dicomweb"
jwks = "jwks.json"

[archive]
{archive}

[tls]
certificate = "{tls.cert}"
key = "{tls.key}"

[listen]
host = "127.0.0.1"

[database]
url = "sqlite:///edge-audit.db"

[gateway]
max_transfers = 2
"""
    )
    return path


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    root = tmp_path_factory.mktemp("edge")
    write_studies(root / "archive")
    tls = Tls(root / "pki")
    write_jwks(root / "jwks.json", A_SIGNING)
    port = free_port()
    config = _config(root, port, tls, 'kind = "folder"\npath = "archive"')
    # The console script of the installation under test (a PATH lookup may find another one).
    command = [str(Path(sys.executable).with_name("ncp"))]
    log = (root / "edge.log").open("wb")
    process = subprocess.Popen(
        [*command, "edge", "--config", str(config), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"https://localhost:{port}/dicomweb"
    try:
        _wait_ready(base, tls, process, root / "edge.log")
        yield Edge(base, tls, root / "jwks.json", root / "edge-audit.db", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


def _wait_ready(base: str, tls: Tls, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    with tls.client() as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ncp edge exited: {log.read_text()[-2000:]}")
            try:
                http.get(f"{base}/studies")
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ncp edge not ready: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)


def test_the_edge_serves_a_study_to_a_token_signed_by_a(edge: Edge) -> None:
    with edge.tls.client(headers=bearer(token(edge.base, key=A_SIGNING, option="C"))) as http:
        studies = http.get(f"{edge.base}/studies")
        assert studies.status_code == 200
        found = {d["0020000D"]["Value"][0] for d in studies.json()}
        assert found == {STUDY_1, STUDY_2}
        study = http.get(f"{edge.base}/studies/{STUDY_1}", headers={"Accept": AS_STORED})
        assert study.status_code == 200
        assert study.content.count(b"Content-Type: application/dicom") == 3
    records = audit_db(edge.audit).records()
    retrieve = [r for r in records if r.action == "image-retrieve"][-1]
    assert retrieve.side == "edge" and retrieve.option == "C"
    assert retrieve.num_instances == 3 and retrieve.size_bytes == len(study.content)


def test_the_edge_refuses_tokens_it_cannot_trust(edge: Edge) -> None:
    stranger = new_key("at-edge-1")
    with edge.tls.client() as http:
        assert http.get(f"{edge.base}/studies").status_code == 401
        forged = bearer(token(edge.base, key=stranger))
        assert http.get(f"{edge.base}/studies", headers=forged).status_code == 401


def test_keys_rotated_by_a_are_picked_up_without_a_restart(edge: Edge) -> None:
    headers = bearer(token(edge.base, key=ROTATED))
    with edge.tls.client(headers=headers) as http:
        assert http.get(f"{edge.base}/studies").status_code == 401
        write_jwks(edge.jwks, A_SIGNING, ROTATED)
        assert http.get(f"{edge.base}/studies").status_code == 200
    assert edge.process.poll() is None


def test_a_bad_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[edge]\ncountry = "at"\n')
    assert main(["edge", "--config", str(config)]) == 2
    assert "edge.country" in capsys.readouterr().err
    tls = Tls(tmp_path / "pki")
    write_jwks(tmp_path / "jwks.json", A_SIGNING)
    plain = _config(tmp_path, 8443, tls, 'kind = "folder"\npath = "."').read_text()
    config.write_text(plain.replace("https://localhost", "http://localhost"))
    assert main(["edge", "--config", str(config)]) == 2
    assert "HTTPS only" in capsys.readouterr().err
