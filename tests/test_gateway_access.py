"""Access control of the imaging channel: every QIDO-RS and WADO-RS path, against the edge
gateway before Orthanc and gateway A before a folder archive, over real TLS.

Refused: no token, an expired token, a forged one, another kind of token, a token for another
gateway (audience), a token for other studies, and path tricks (another study's series or
instance under a covered study, percent-encoded characters, dot segments, wildcards, a link
out of the folder archive).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.gateway_support import (
    LOOSE_STUDY,
    OTHER_PATIENT,
    OTHER_SERIES,
    OTHER_STUDY,
    PATIENT,
    SERIES_1A,
    STRANGER_KEY,
    STUDY_1,
    STUDY_2,
    Gateways,
    bearer,
    launch_token,
    start_gateways,
    token,
)
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.orthanc

SOP = f"{SERIES_1A}.1"
OTHER_SOP = f"{OTHER_SERIES}.1"
SECRET_STUDY = "1.2.826.0.1.3680043.10.77.99"
"""A study of PAT200 stored outside the folder archive, linked into it."""

QIDO = [
    "/studies",
    "/series",
    "/instances",
    f"/studies/{STUDY_1}/series",
    f"/studies/{STUDY_1}/instances",
    f"/studies/{STUDY_1}/series/{SERIES_1A}/instances",
]
INSTANCE = f"/studies/{STUDY_1}/series/{SERIES_1A}/instances/{SOP}"
WADO = [
    f"/studies/{STUDY_1}",
    f"/studies/{STUDY_1}/metadata",
    f"/studies/{STUDY_1}/series/{SERIES_1A}",
    f"/studies/{STUDY_1}/series/{SERIES_1A}/metadata",
    INSTANCE,
    f"{INSTANCE}/metadata",
    f"{INSTANCE}/frames/1",
    f"{INSTANCE}/bulk/7FE00010",
]
PATHS = QIDO + WADO
NAMES = ["C", "folder"]


@pytest.fixture(scope="module")
def gateways(
    orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateways]:
    root = tmp_path_factory.mktemp("access")
    outside = write_instance(
        root / "outside" / "secret.dcm",
        make_instance(
            patient_id=PATIENT.value,
            study_uid=SECRET_STUDY,
            series_uid=f"{SECRET_STUDY}.1",
            sop_uid=f"{SECRET_STUDY}.1.1",
        ),
    )
    (root / "archive").mkdir()
    (root / "archive" / "linked.dcm").symlink_to(outside)
    yield from start_gateways(root, orthanc)


def _now() -> datetime:
    return datetime.now(UTC)


def _tokens(base: str, other_base: str) -> dict[str, str | None]:
    return {
        "no token": None,
        "expired": token(base, now=_now() - timedelta(minutes=10)),
        "another gateway": token(other_base),
        "forged": token(base, key=STRANGER_KEY),
        "another kind": launch_token(base, _now()),
        "not yet valid": token(base, now=_now() + timedelta(minutes=10)),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "case", ["no token", "expired", "another gateway", "forged", "another kind", "not yet valid"]
)
def test_every_path_refuses_a_missing_or_invalid_token_with_401(
    gateways: Gateways, name: str, case: str
) -> None:
    base = gateways.bases[name]
    other = gateways.bases["A" if name == "C" else "C"]
    value = _tokens(base, other)[case]
    headers = {} if value is None else bearer(value)
    with gateways.tls.client(headers=headers) as http:
        for path in PATHS:
            response = http.get(base + path)
            assert response.status_code == 401, (case, path, response.text)
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith(f'Bearer realm="{base}"')
            if value is None:
                assert "error=" not in challenge  # RFC 6750 3.1: no error without credentials
            else:
                assert 'error="invalid_token"' in challenge
            assert "application/dicom" not in response.headers.get("content-type", "")


@pytest.mark.parametrize("name", NAMES)
def test_a_token_for_other_studies_gets_403_on_every_study_path(
    gateways: Gateways, name: str
) -> None:
    base = gateways.bases[name]
    other = token(base, (OTHER_STUDY,), patient=OTHER_PATIENT)
    with gateways.tls.client(headers=bearer(other)) as http:
        for path in PATHS:
            response = http.get(base + path)
            if path in ("/studies", "/series", "/instances"):
                # A search across studies is filtered to the token's own.
                assert response.status_code == 200
                assert STUDY_1 not in response.text and STUDY_2 not in response.text
                assert OTHER_STUDY in response.text
            else:
                assert response.status_code == 403, (path, response.text)
                assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("name", NAMES)
def test_a_study_of_another_patient_named_in_the_token_is_refused(
    gateways: Gateways, name: str
) -> None:
    base = gateways.bases[name]
    # LOOSE_STUDY belongs to "pat200": Orthanc's PatientID matching would take it for PAT200.
    with gateways.tls.client(headers=bearer(token(base, (LOOSE_STUDY,)))) as http:
        assert http.get(f"{base}/studies/{LOOSE_STUDY}").status_code == 403
        assert http.get(f"{base}/studies/{LOOSE_STUDY}/metadata").status_code == 403
        assert http.get(f"{base}/studies").json() == []


@pytest.mark.parametrize("name", NAMES)
def test_another_studys_series_or_instance_under_a_covered_study_is_not_served(
    gateways: Gateways, name: str
) -> None:
    base = gateways.bases[name]
    tricks = [
        f"/studies/{STUDY_1}/series/{OTHER_SERIES}",
        f"/studies/{STUDY_1}/series/{OTHER_SERIES}/metadata",
        f"/studies/{STUDY_1}/series/{OTHER_SERIES}/instances",
        f"/studies/{STUDY_1}/series/{OTHER_SERIES}/instances/{OTHER_SOP}",
        f"/studies/{STUDY_1}/series/{SERIES_1A}/instances/{OTHER_SOP}",
        f"/studies/{STUDY_1}/series/{SERIES_1A}/instances/{OTHER_SOP}/metadata",
        f"/studies/{STUDY_1}/series/{SERIES_1A}/instances/{OTHER_SOP}/frames/1",
    ]
    with gateways.tls.client(headers=bearer(token(base))) as http:
        for path in tricks:
            response = http.get(base + path)
            assert response.status_code in (404, 200), (path, response.status_code)
            if response.status_code == 200:  # an empty search, never the other study
                assert response.json() == []
            assert OTHER_SOP not in response.text
        assert http.get(f"{base}/studies/{OTHER_STUDY}/series/{OTHER_SERIES}").status_code == 403


def _raw_get(base: str, ca: Path, path: str, authorization: str) -> int:
    """GET with the path exactly as written (HTTP clients normalise dot segments)."""
    url = httpx.URL(base)
    context = ssl.create_default_context(cafile=str(ca))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: {authorization}\r\nConnection: close\r\n\r\n"
    )
    with (
        socket.create_connection((url.host, url.port or 443)) as raw,
        context.wrap_socket(raw, server_hostname=url.host) as tls,
    ):
        tls.sendall(request.encode("latin-1"))
        head = tls.recv(1024).decode("latin-1")
    return int(head.split(" ", 2)[1])


@pytest.mark.parametrize("name", NAMES)
def test_encoded_characters_dot_segments_and_wildcards_in_the_path_are_refused(
    gateways: Gateways, name: str
) -> None:
    base = gateways.bases[name]
    root = httpx.URL(base).path
    auth = f"Bearer {token(base)}"
    tricks = [
        f"{root}/studies/{STUDY_1}/series/../../studies/{OTHER_STUDY}",
        f"{root}/studies/{STUDY_1}/../{OTHER_STUDY}",
        f"{root}/studies/{STUDY_1}%2F..%2F{OTHER_STUDY}",
        f"{root}/studies/{STUDY_1.replace('.', '%2E', 1)}",
        f"{root}/studies/{STUDY_1}%00",
        f"{root}/studies/1.2.826.0.1.3680043.10.77.*",
        f"{root}/studies/1.2.826.0.1.3680043.10.77.?",
        f"{root}/studies/..%2F..%2F..%2Fetc%2Fpasswd",
        f"{root}/studies/{STUDY_1}/series/{SERIES_1A}/instances/{SOP}/bulk/..%2F..",
        f"{root}/studies/{STUDY_1}/series/{SERIES_1A}/instances/{SOP}/bulk/../../x",
    ]
    for path in tricks:
        status = _raw_get(base, gateways.tls.ca, path, auth)
        assert status in (400, 404), (path, status)
    with gateways.tls.client(headers={"Authorization": auth}) as http:
        for query in ("StudyInstanceUID=*", "StudyInstanceUID=1.2.826.*", "PatientID=%00"):
            assert http.get(f"{base}/studies?{query}").status_code == 400, query
        # A wildcard on a text attribute is matched by us, within the token's studies only.
        found = http.get(f"{base}/studies?PatientID=*").json()
        assert {d["0020000D"]["Value"][0] for d in found} == {STUDY_1, STUDY_2}


def test_a_link_out_of_the_folder_archive_is_never_followed(gateways: Gateways) -> None:
    base = gateways.bases["folder"]
    with gateways.tls.client(headers=bearer(token(base, (SECRET_STUDY,)))) as http:
        assert http.get(f"{base}/studies/{SECRET_STUDY}").status_code == 404
        assert http.get(f"{base}/studies").json() == []


@pytest.mark.parametrize("name", NAMES)
def test_bad_headers_are_refused(gateways: Gateways, name: str) -> None:
    base = gateways.bases[name]
    value = token(base)
    with gateways.tls.client() as http:
        basic = http.get(f"{base}/studies", headers={"Authorization": "Basic YTpi"})
        assert basic.status_code == 401
        assert 'error="invalid_request"' in basic.headers["www-authenticate"]
        in_query = http.get(f"{base}/studies", params={"access_token": value})
        assert in_query.status_code == 401, "tokens are read from the header only"
        twice = http.get(
            f"{base}/studies",
            headers=[("Authorization", f"Bearer {value}"), ("Authorization", f"Bearer {value}")],
        )
        assert twice.status_code == 400


@pytest.mark.parametrize("name", NAMES)
def test_refusals_are_audited(gateways: Gateways, name: str) -> None:
    base = gateways.bases[name]
    audit = gateways.audits[name]
    before = len(audit.records())
    forged = token(base, key=STRANGER_KEY)
    other = token(base, (OTHER_STUDY,), patient=OTHER_PATIENT)
    with gateways.tls.client() as http:
        assert http.get(f"{base}/studies/{STUDY_1}", headers=bearer(forged)).status_code == 401
        assert http.get(f"{base}/studies/{STUDY_1}", headers=bearer(other)).status_code == 403
    records = audit.records()[before:]
    assert [r.action for r in records] == ["refusal", "refusal"]
    assert all(r.outcome == 8 for r in records)
    assert records[0].token_jti is None, "a forged token's id is not quoted"
    assert records[1].token_jti is not None, "a signed token's id is recorded with its refusal"
    assert "does not cover study" in (records[1].reason or "")
