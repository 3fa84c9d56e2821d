"""The folder catalogue is built before the gateway serves (issue 13, item 6): the first search
after a start was answered only once every header of the archive had been read (about 20 s for
the demo's 7,800 instances); now the server accepts requests once the catalogue is built, and a
catalogue a minute old is refreshed behind the requests, not in front of one."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from ncp.config import FolderArchive
from ncp.gateway.catalogue import FolderUpstream
from tests.gateway_support import STUDY_1, bearer, serve_gateway, token, write_studies


def test_the_first_search_reads_no_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_studies(tmp_path / "archive")
    scans: list[float] = []
    real = FolderUpstream._scan

    def counted(self: FolderUpstream) -> None:
        scans.append(time.monotonic())
        real(self)

    monkeypatch.setattr(FolderUpstream, "_scan", counted)
    served = serve_gateway(tmp_path, FolderArchive(path=tmp_path / "archive"), None)
    try:
        assert len(scans) == 1, "built while the server started"
        signed = token(served.base, (STUDY_1,))
        r = httpx.get(f"{served.base}/studies", headers=bearer(signed), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1
        assert len(scans) == 1, "the first search read nothing"
        catalogue = served.app.state.gateway.archive
        assert isinstance(catalogue, FolderUpstream)
        catalogue._scanned_at -= 120  # a minute old and more: refreshed in the background
        r = httpx.get(f"{served.base}/studies", headers=bearer(signed), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1
        deadline = time.monotonic() + 5
        while len(scans) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(scans) == 2
    finally:
        served.stop()
