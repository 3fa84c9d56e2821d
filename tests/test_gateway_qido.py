"""QIDO-RS through the gateways (A and the edge before Orthanc, A before a folder), over real
TLS: searches across the token's studies (one archive search for them all) give exactly what
study-by-study searches give, filtered on our side to the token's patient; ``limit`` and
``offset`` page exactly; an answer cut by the server's maximum says so; every search is audited
before it is answered, and a lost record fails it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncp.audit.record import AuditError
from ncp.gateway import qido
from ncp.gateway.dicomjson import (
    ISSUER_OF_PATIENT_ID,
    PATIENT_ID,
    RETRIEVE_URL,
    SERIES_UID,
    SOP_UID,
    STUDY_UID,
    single_text,
)
from ncp.gateway.upstream import DicomwebUpstream, studies_of
from tests.gateway_support import (
    LOOSE_STUDY,
    OTHER_STUDY,
    ROOT,
    STUDY_1,
    STUDY_2,
    Gateways,
    audit_db,
    bearer,
    gateway_app,
    start_gateways,
    token,
)
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.orthanc

NAMES = ["A", "C", "folder"]
GONE_STUDY = f"{ROOT}.404"
"""Named in tokens, stored nowhere."""


@pytest.fixture(scope="module")
def gateways(
    orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateways]:
    yield from start_gateways(tmp_path_factory.mktemp("qido"), orthanc)


def _get(g: Gateways, name: str, path: str, studies: tuple[str, ...], **params: Any) -> Any:
    base = g.bases[name]
    with g.tls.client() as http:
        return http.get(f"{base}{path}", params=params, headers=bearer(token(base, studies)))


def _uids(items: list[dict[str, Any]], tag: str) -> list[str | None]:
    return [single_text(item, tag) for item in items]


@pytest.mark.parametrize("name", NAMES)
def test_a_search_across_the_tokens_studies_is_exactly_the_patients_studies(
    gateways: Gateways, name: str
) -> None:
    named = (STUDY_2, LOOSE_STUDY, OTHER_STUDY, GONE_STUDY, STUDY_1)
    answer = _get(gateways, name, "/studies", named)
    assert answer.status_code == 200, answer.text
    items = answer.json()
    # pat200's study (Orthanc would match it), PAT201's and a study not stored are left out.
    assert _uids(items, STUDY_UID) == [STUDY_1, STUDY_2]
    for item in items:
        url = single_text(item, RETRIEVE_URL)
        assert url == f"{gateways.bases[name]}/studies/{single_text(item, STUDY_UID)}"
    # The same as asking study by study.
    one_by_one = [
        item
        for study in (STUDY_1, STUDY_2)
        for item in _get(gateways, name, "/studies", named, StudyInstanceUID=study).json()
    ]
    assert items == one_by_one


def test_an_archive_that_caps_its_answers_still_gives_every_study(gateways: Gateways) -> None:
    class Capped(DicomwebUpstream):
        """Orthanc as if ``LimitFindResults`` were 1."""

        async def _json(self, path: str, params: Any = None) -> list[Any]:
            return (await super()._json(path, params))[:1]

    async def ask() -> list[dict[str, Any]]:
        archive = Capped(
            gateways.orthanc.dicomweb_url, timeout_s=10, retry_after_s=1, chunk_bytes=65536
        )
        try:
            named = [STUDY_2, STUDY_1, GONE_STUDY, OTHER_STUDY]
            return await studies_of(archive, named, {STUDY_UID, PATIENT_ID})
        finally:
            await archive.aclose()

    found = [single_text(item, STUDY_UID) for item in asyncio.run(ask())]
    assert sorted(found) == sorted([STUDY_1, STUDY_2, OTHER_STUDY])  # type: ignore[type-var]


def test_a_repeated_search_asks_no_issuer_and_still_refuses_another_domain(
    gateways: Gateways, tmp_path: Any
) -> None:
    # STUDY_2's answers name another issuing domain for the same Patient ID: the study is not
    # the token's patient's. The first search asks the archive for issuers; the next, with every
    # study's patient remembered, asks only for Patient IDs and still leaves STUDY_2 out.
    class Recording(DicomwebUpstream):
        asked: ClassVar[list[set[str]]] = []

        async def _json(self, path: str, params: Any = None) -> list[Any]:
            items = await super()._json(path, params)
            if path == "/studies":
                self.asked.append({v for k, v in params or () if k == "includefield"})
                for item in items:
                    if single_text(item, STUDY_UID) == STUDY_2 and ISSUER_OF_PATIENT_ID in item:
                        item[ISSUER_OF_PATIENT_ID] = {"vr": "LO", "Value": ["1.2.3.999"]}
            return items

    base = "https://gw.at.example/dicomweb"

    async def search_twice() -> list[list[str | None]]:
        archive = Recording(
            gateways.orthanc.dicomweb_url, timeout_s=10, retry_after_s=1, chunk_bytes=65536
        )
        app = gateway_app(archive, base, audit_db(tmp_path / "audit.db"))
        headers = bearer(token(base, (STUDY_1, STUDY_2)))
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        try:
            async with httpx.AsyncClient(transport=transport) as http:
                answers = [await http.get(f"{base}/studies", headers=headers) for _ in range(2)]
        finally:
            await archive.aclose()
        assert all(a.status_code == 200 for a in answers)
        return [_uids(a.json(), STUDY_UID) for a in answers]

    first, second = asyncio.run(search_twice())
    assert first == second == [STUDY_1]
    assert [ISSUER_OF_PATIENT_ID in fields for fields in Recording.asked] == [True, False]
    assert all(PATIENT_ID in fields for fields in Recording.asked)


@pytest.mark.parametrize("name", NAMES)
def test_series_and_instances_across_studies_are_of_the_patients_studies_only(
    gateways: Gateways, name: str
) -> None:
    named = (STUDY_1, STUDY_2, LOOSE_STUDY, OTHER_STUDY, GONE_STUDY)
    series = _get(gateways, name, "/series", named).json()
    assert sorted(_uids(series, SERIES_UID)) == sorted(  # type: ignore[type-var]
        {i.series for i in gateways.instances if i.study in (STUDY_1, STUDY_2)}
    )
    instances = _get(gateways, name, "/instances", named).json()
    assert sorted(_uids(instances, SOP_UID)) == sorted(  # type: ignore[type-var]
        gateways.sops(STUDY_1) | gateways.sops(STUDY_2)
    )
    assert set(_uids(instances, STUDY_UID)) == {STUDY_1, STUDY_2}


@pytest.mark.parametrize("name", NAMES)
def test_a_study_of_another_patient_is_refused_when_asked_for_by_path(
    gateways: Gateways, name: str
) -> None:
    named = (STUDY_1, LOOSE_STUDY)
    assert _get(gateways, name, f"/studies/{LOOSE_STUDY}/series", named).status_code == 403
    assert _get(gateways, name, f"/studies/{STUDY_1}/series", named).status_code == 200


@pytest.mark.parametrize("name", ["C", "folder"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(limit=st.none() | st.integers(0, 6), offset=st.none() | st.integers(0, 6))
def test_limit_and_offset_page_exactly(
    gateways: Gateways, name: str, limit: int | None, offset: int | None
) -> None:
    named = (STUDY_1, STUDY_2, LOOSE_STUDY)
    everything = _get(gateways, name, "/instances", named).json()
    assert len(everything) == 4
    params = {k: v for k, v in (("limit", limit), ("offset", offset)) if v is not None}
    page = _get(gateways, name, "/instances", named, **params)
    start = offset or 0
    assert page.json() == everything[start : None if limit is None else start + limit]
    assert "Warning" not in page.headers


@pytest.mark.parametrize("name", NAMES)
def test_an_answer_cut_by_the_servers_maximum_says_so(
    gateways: Gateways, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = (STUDY_1, STUDY_2)
    everything = _get(gateways, name, "/instances", named).json()
    monkeypatch.setattr(qido, "MAX_LIMIT", 3)
    cut = _get(gateways, name, "/instances", named)
    assert cut.json() == everything[:3]
    assert "Additional results can be requested" in cut.headers["Warning"]
    asked = _get(gateways, name, "/instances", named, limit=3)
    assert asked.json() == everything[:3] and "Warning" not in asked.headers
    too_many = _get(gateways, name, "/instances", named, limit=50)
    assert too_many.json() == everything[:3] and "Warning" in too_many.headers
    rest = _get(gateways, name, "/instances", named, offset=3)
    assert rest.json() == everything[3:] and "Warning" not in rest.headers
    both = _get(gateways, name, "/instances", named, fuzzymatching="true").headers["Warning"]
    assert "Additional results" in both and "fuzzymatching is not supported" in both


@pytest.mark.parametrize("name", NAMES)
def test_each_search_is_audited_with_the_studies_it_shows(gateways: Gateways, name: str) -> None:
    before = len(gateways.audits[name].records())
    answer = _get(gateways, name, "/studies", (STUDY_1, STUDY_2, LOOSE_STUDY), limit=1)
    records = gateways.audits[name].records()[before:]
    assert len(records) == 1
    record = records[0]
    assert record.action == "list-query" and record.request_id == answer.headers["X-Request-ID"]
    assert record.studies == [STUDY_1]
    assert record.details["results"] == 1 and record.size_bytes == len(answer.content)


@pytest.mark.parametrize("name", NAMES)
def test_a_search_whose_record_is_lost_is_not_answered(
    gateways: Gateways, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lost(event: object) -> None:
        raise AuditError("the database is gone")

    monkeypatch.setattr(gateways.apps[name].state.gateway.audit.auditor, "record", lost)
    for path in ("/studies", "/series", f"/studies/{STUDY_1}/instances"):
        answer = _get(gateways, name, path, (STUDY_1, STUDY_2))
        assert answer.status_code == 500, path
        assert STUDY_1 not in answer.text
