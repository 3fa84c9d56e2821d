"""The real DICOMweb client works unchanged against both gateways, with Orthanc as the archive.

Gateway A (option A, as ``ncp serve`` builds it) and the edge gateway (option C, as
``ncp edge`` builds it) both front the same Orthanc; a third gateway fronts the same files as a
folder archive. Each serves HTTPS with A's test server certificate, and dicomweb-client talks to
them through a ``requests`` session that trusts A's CA.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pydicom
import pytest

from tests.gateway_support import (
    AS_STORED,
    LOOSE_STUDY,
    OTHER_STUDY,
    SERIES_1A,
    SERIES_1B,
    STUDY_1,
    STUDY_2,
    Gateways,
    bearer,
    multipart_parts,
    start_gateways,
    token,
)
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def gateways(
    orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateways]:
    yield from start_gateways(tmp_path_factory.mktemp("gw"), orthanc)


GATEWAYS = ["A", "C", "folder"]


@pytest.mark.parametrize("name", GATEWAYS)
def test_search_for_studies_lists_exactly_the_tokens_studies_of_its_patient(
    gateways: Gateways, name: str
) -> None:
    client = gateways.client(name, (STUDY_1, STUDY_2, OTHER_STUDY, LOOSE_STUDY))
    found = client.search_for_studies()
    uids = {pydicom.Dataset.from_json(d).StudyInstanceUID for d in found}
    # OTHER_STUDY is PAT201's and LOOSE_STUDY "pat200"'s: a PAT200 token shows neither.
    assert uids == {STUDY_1, STUDY_2}
    for item in found:
        url = item["00081190"]["Value"][0]
        assert url.startswith(gateways.bases[name] + "/studies/")


@pytest.mark.parametrize("name", GATEWAYS)
def test_search_matches_exactly_on_our_side(gateways: Gateways, name: str) -> None:
    client = gateways.client(name)
    by_date = client.search_for_studies(search_filters={"StudyDate": "20230101-20231231"})
    assert [d["0020000D"]["Value"][0] for d in by_date] == [STUDY_2]
    # Orthanc would match "pat200" and "PAT*"-style values loosely; we match case-sensitively.
    assert client.search_for_studies(search_filters={"PatientID": "pat200"}) == []
    assert len(client.search_for_studies(search_filters={"PatientID": "PAT2*"})) == 2
    series = client.search_for_series(STUDY_1)
    assert {d["0020000E"]["Value"][0] for d in series} == {SERIES_1A, SERIES_1B}
    instances = client.search_for_instances(STUDY_1, SERIES_1A)
    assert {d["00080018"]["Value"][0] for d in instances} == gateways.sops(STUDY_1, SERIES_1A)
    everywhere = client.search_for_series()
    assert {d["0020000D"]["Value"][0] for d in everywhere} == {STUDY_1, STUDY_2}


@pytest.mark.parametrize("name", GATEWAYS)
def test_metadata_and_retrieve_at_every_level(gateways: Gateways, name: str) -> None:
    client = gateways.client(name)
    metadata = client.retrieve_study_metadata(STUDY_1)
    assert {d["00080018"]["Value"][0] for d in metadata} == gateways.sops(STUDY_1)
    assert len(client.retrieve_series_metadata(STUDY_1, SERIES_1A)) == 2
    sop = sorted(gateways.sops(STUDY_1, SERIES_1B))[0]
    one = client.retrieve_instance_metadata(STUDY_1, SERIES_1B, sop)
    assert one["00080018"]["Value"] == [sop]

    study = client.retrieve_study(STUDY_1)
    assert {ds.SOPInstanceUID for ds in study} == gateways.sops(STUDY_1)
    series = client.retrieve_series(STUDY_1, SERIES_1A)
    assert {ds.SOPInstanceUID for ds in series} == gateways.sops(STUDY_1, SERIES_1A)
    instance = client.retrieve_instance(STUDY_1, SERIES_1B, sop)
    assert instance.SOPInstanceUID == sop
    streamed = list(client.iter_study(STUDY_1))
    assert {ds.SOPInstanceUID for ds in streamed} == gateways.sops(STUDY_1)
    assert len(list(client.iter_series(STUDY_1, SERIES_1A))) == 2


def _parts(response: httpx.Response) -> list[bytes]:
    return multipart_parts(response.headers["content-type"], response.content)


def test_a_plain_http_client_gets_the_same_bytes_through_both_gateways(
    gateways: Gateways,
) -> None:
    with gateways.tls.client() as http:
        answers = {}
        for name in GATEWAYS:
            base = gateways.bases[name]
            response = http.get(
                f"{base}/studies/{STUDY_1}", headers={**bearer(token(base)), "Accept": AS_STORED}
            )
            assert response.status_code == 200
            answers[name] = sorted(_parts(response))
    direct = httpx.get(
        f"{gateways.orthanc.dicomweb_url}/studies/{STUDY_1}", headers={"Accept": AS_STORED}
    )
    files = sorted(i.path.read_bytes() for i in gateways.instances if i.study == STUDY_1)
    assert answers["A"] == answers["C"] == sorted(_parts(direct))
    assert answers["folder"] == files


@pytest.mark.parametrize("name", GATEWAYS)
def test_nothing_of_the_archive_leaks(gateways: Gateways, name: str) -> None:
    archive = f"127.0.0.1:{gateways.orthanc.http_port}"
    base = gateways.bases[name]
    with gateways.tls.client(headers=bearer(token(base))) as http:
        for path in (
            "/studies",
            f"/studies/{STUDY_1}/series",
            f"/studies/{STUDY_1}/instances",
            f"/studies/{STUDY_1}/metadata",
        ):
            response = http.get(base + path)
            assert response.status_code == 200
            assert archive not in response.text
            for uri in _uris(response.json()):
                assert uri.startswith(base + "/studies/"), uri


def _uris(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "BulkDataURI" and isinstance(item, str):
                yield item
            elif key == "Value" and value.get("vr") == "UR" and isinstance(item, list):
                yield from (v for v in item if isinstance(v, str))
            else:
                yield from _uris(item)
    elif isinstance(value, list):
        for item in value:
            yield from _uris(item)


def test_bulk_data_uris_in_metadata_lead_back_through_the_gateway(gateways: Gateways) -> None:
    base = gateways.bases["A"]
    with gateways.tls.client(headers=bearer(token(base))) as http:
        metadata = http.get(f"{base}/studies/{STUDY_1}/series/{SERIES_1A}/metadata").json()
        uris = [u for u in _uris(metadata) if "/bulk/" in u]
        assert uris, "Orthanc offers the pixel data as bulk data"
        answer = http.get(
            uris[0], headers={"Accept": 'multipart/related; type="application/octet-stream"'}
        )
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("multipart/related")


def test_frames_are_served_where_the_archive_offers_them(gateways: Gateways) -> None:
    base = gateways.bases["C"]
    sop = sorted(gateways.sops(STUDY_1, SERIES_1A))[0]
    client = gateways.client("C")
    frames = client.retrieve_instance_frames(STUDY_1, SERIES_1A, sop, frame_numbers=[1])
    assert len(frames) == 1 and len(frames[0]) == 8 * 8 * 2
    with gateways.tls.client(headers=bearer(token(base))) as http:
        path = f"{base}/studies/{STUDY_1}/series/{SERIES_1B}/instances/{sop}/frames/1"
        assert http.get(path).status_code == 404, "an instance of another series"
    folder = gateways.bases["folder"]
    with gateways.tls.client(headers=bearer(token(folder))) as http:
        path = f"{folder}/studies/{STUDY_1}/series/{SERIES_1A}/instances/{sop}/frames/1"
        assert http.get(path).status_code == 404, "a folder archive offers no frames"


@pytest.mark.parametrize("name", GATEWAYS)
def test_every_transfer_is_audited_with_instances_and_bytes(gateways: Gateways, name: str) -> None:
    base = gateways.bases[name]
    audit = gateways.audits[name]
    before = len(audit.records())
    with gateways.tls.client() as http:
        response = http.get(
            f"{base}/studies/{STUDY_1}", headers={**bearer(token(base)), "Accept": AS_STORED}
        )
        assert response.status_code == 200
    records = audit.records()[before:]
    assert [r.action for r in records] == ["image-transfer-begin", "image-retrieve"]
    begin, record = records
    assert begin.studies == [STUDY_1] and begin.token_jti == record.token_jti
    assert record.action == "image-retrieve" and record.outcome == 0
    assert record.side == ("edge" if name == "C" else "gateway")
    assert record.num_instances == 3
    assert record.size_bytes == len(response.content)
    assert sorted(record.details["instances"]) == sorted(gateways.sops(STUDY_1))
    assert record.studies == [STUDY_1]
    assert record.patient_id == "PAT200"
    assert record.token_jti
    with gateways.tls.client(headers=bearer(token(base))) as http:
        assert http.get(f"{base}/studies", params={"PatientID": "PAT2*"}).status_code == 200
    search = audit.records()[-1]
    assert search.action == "list-query" and search.query == "PatientID=PAT2%2A"
    assert sorted(search.studies) == sorted([STUDY_1, STUDY_2])
