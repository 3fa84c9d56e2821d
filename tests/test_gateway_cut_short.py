"""A transfer cut short is logged in one line, with its reason and request id, not with a
traceback (issue 13, item 7): the client still sees the broken body (no close delimiter, no
last chunk), and the audit record keeps the details."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway_support import ServedGateway, bearer, fetch, serve_gateway, token
from tests.test_gateway_staleness import (
    DEFAULT,
    STUDY,
    FixedIndex,
    TranscodeFailingArchive,
    _retrieves,
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedGateway]:
    archive = TranscodeFailingArchive()  # leaves an instance out: the transfer breaks
    archive.series_counts = 3
    gateway = serve_gateway(tmp_path, archive, None, index=FixedIndex())
    try:
        yield gateway
    finally:
        gateway.stop()


def test_a_transfer_cut_short_logs_one_line(
    served: ServedGateway, caplog: pytest.LogCaptureFixture
) -> None:
    request_id = "cut-short-0001"
    headers = {**bearer(token(served.base, (STUDY,))), "Accept": DEFAULT}
    headers["X-Request-ID"] = request_id
    with caplog.at_level(logging.INFO), httpx.Client(timeout=30.0) as http:
        status, _, body, error = fetch(http, f"{served.base}/studies/{STUDY}", headers)
        served.stop()  # the server's log is complete once it stopped
    assert status == 200 and error is not None and body
    server_lines = [r for r in caplog.records if r.name.startswith("uvicorn")]
    assert [r.levelno for r in server_lines if r.levelno >= logging.WARNING] == [logging.WARNING]
    (line,) = [r for r in server_lines if r.levelno >= logging.WARNING]
    assert line.exc_info is None and "Traceback" not in caplog.text
    message = line.getMessage()
    assert "\n" not in message
    assert request_id in message and "sent 2 of the 3 instances" in message
    assert _retrieves(served)[-1].request_id == request_id
