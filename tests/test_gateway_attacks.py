"""Attacks on the gateway's paths and queries, generated: whatever a caller with a valid token
for PAT200's studies writes, nothing of another study or patient comes back, and nothing
answers 500. In process (ASGI) against a folder archive, for speed; the same checks run over
TLS against Orthanc in test_gateway_access.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncp.config import FolderArchive
from tests.gateway_support import (
    LOOSE_STUDY,
    OTHER_SERIES,
    OTHER_STUDY,
    SERIES_1A,
    STUDY_1,
    STUDY_2,
    audit_db,
    bearer,
    gateway_app,
    token,
    write_studies,
)

BASE = "https://gw.at.example/dicomweb"
FORBIDDEN = (OTHER_STUDY, OTHER_SERIES, LOOSE_STUDY, "PAT201", "pat200")

SEGMENTS = st.sampled_from(
    [
        "studies", "series", "instances", "metadata", "frames", "bulk", "1", "7FE00010",
        STUDY_1, STUDY_2, OTHER_STUDY, LOOSE_STUDY, SERIES_1A, OTHER_SERIES, f"{OTHER_SERIES}.1",
        f"{SERIES_1A}.1", "..", ".", "", "%2e%2e", "%2F", "*", "?", "1.2.*", "%00", "%252e",
        "\\", "..;", "rendered",
    ]
)  # fmt: skip
QUERY_KEYS = st.sampled_from(
    ["PatientID", "StudyInstanceUID", "00100020", "includefield", "limit", "offset",
     "SeriesInstanceUID", "Modality", "access_token", "fuzzymatching"]
)  # fmt: skip
QUERY_VALUES = st.sampled_from(
    ["*", "PAT201", "pat200", "PAT2*", OTHER_STUDY, f"{STUDY_1},{OTHER_STUDY}", "all", "-1",
     "100000000000", "true", "", "?", "%00", "00100020", "PatientID"]
)  # fmt: skip


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> object:
    root = tmp_path_factory.mktemp("attacks")
    write_studies(root / "archive")
    return gateway_app(FolderArchive(path=root / "archive"), BASE, audit_db(root / "audit.db"))


async def _get(app: object, path: str, params: list[tuple[str, str]]) -> httpx.Response:
    headers = bearer(token(BASE, (STUDY_1, STUDY_2, LOOSE_STUDY)))
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="https://gw.at.example") as http:
        url = httpx.URL(f"https://gw.at.example/dicomweb/{path}", params=params)
        return await http.get(url, headers=headers)


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(SEGMENTS, min_size=0, max_size=8),
    params=st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=3),
)
def test_nothing_of_another_study_or_patient_ever_comes_back(
    app: object, segments: list[str], params: list[tuple[str, str]]
) -> None:
    response = asyncio.run(_get(app, "/".join(segments), params))
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        for value in FORBIDDEN:
            assert value.encode() not in response.content, (segments, params)
