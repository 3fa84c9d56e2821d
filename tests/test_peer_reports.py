"""Country B reads reports through its peer client: the list's report entries (preliminary
flagged, linked to their study), a report Bundle with versions and its ``_history`` newest first,
JSON and XML, refusals typed; against a node A of its own (the tests ingest reports)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ncp.consumer.model import PeerContext, PeerRefused
from ncp.consumer.peer import PeerClient
from ncp.consumer.results import ListFilters
from ncp.node import Node
from tests.support.country_b import HP, b_client, b_node, b_records
from tests.support.node import PATIENTS, A, RunningNode, running_node, studies_of
from tests.test_report_api import ingest, make_report, report_id_of

S1, S2 = studies_of("PAT100")
S101 = studies_of("PAT101")[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("peer-reports")) as running:
        yield running


@pytest.fixture(scope="module")
def reports(node: RunningNode) -> dict[str, str]:
    """S1's report in versions 1 (preliminary) and 2 (final); S2's, final; PAT101's."""
    bundles = [
        make_report(S1, status="preliminary", findings="Pending."),
        make_report(S1, version=2, findings="Small nodule in the left lower lobe."),
        make_report(S2),
        make_report(S101),
    ]
    for bundle in bundles:
        assert ingest(node, bundle).status_code == 201
    return {
        "s1": report_id_of(bundles[0]),
        "s2": report_id_of(bundles[2]),
        "pat101": report_id_of(bundles[3]),
    }


@pytest.fixture(scope="module")
def b(node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    made = b_node(tmp_path_factory.mktemp("peer-reports-b"), node)
    yield made
    made.close()


@pytest.fixture(scope="module")
def client(b: Node) -> Iterator[PeerClient]:
    with b_client(b) as c:
        yield c


@pytest.fixture(scope="module")
def context(client: PeerClient, reports: dict[str, str]) -> PeerContext:
    hp = client.hp_assertion(A, HP)
    return client.confirm(A, hp, PATIENTS["PAT100"].ref, purpose="TREAT", informed=True)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_the_list_links_reports_and_studies(
    client: PeerClient, context: PeerContext, reports: dict[str, str], fmt: str
) -> None:
    listed = client.metadata_list(context, page_size=2, fmt=fmt)  # type: ignore[arg-type]
    assert listed.pages == 2 and listed.total == 4
    assert sorted(r.report_id for r in listed.reports) == sorted([reports["s1"], reports["s2"]])
    s1 = next(r for r in listed.reports if r.report_id == reports["s1"])
    assert s1.status == "current" and s1.doc_status == "final" and not s1.preliminary
    assert s1.study_uid == S1 and s1.version is None and s1.language == "en"
    assert s1.size and s1.title == "CT report" and s1.modalities == ("CT",)
    study = listed.study_of(s1)
    assert study is not None and study.study_uid == S1
    assert listed.reports_of(S1) == (s1,)


def test_superseded_versions_are_listed_when_asked(
    client: PeerClient, context: PeerContext, reports: dict[str, str]
) -> None:
    listed = client.metadata_list(context, ListFilters(include_superseded=True))
    versions = sorted(
        (r.status, r.doc_status, r.version) for r in listed.reports if r.report_id == reports["s1"]
    )
    assert versions == [("current", "final", None), ("superseded", "preliminary", "1")]
    old = next(r for r in listed.reports if r.version == "1")
    assert old.preliminary


def test_free_text_finds_reports_by_title(
    client: PeerClient, context: PeerContext, reports: dict[str, str]
) -> None:
    listed = client.metadata_list(context, ListFilters(text="MR report"))
    assert [r.report_id for r in listed.reports] == [reports["s2"]]


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_a_report_reads_with_its_sections(
    client: PeerClient, context: PeerContext, reports: dict[str, str], fmt: str
) -> None:
    report = client.report(context, reports["s1"], fmt=fmt)  # type: ignore[arg-type]
    assert (report.version, report.status, report.preliminary) == ("2", "final", False)
    assert report.patient == PATIENTS["PAT100"].ref and report.study_uids == (S1,)
    findings = report.section("59776-5")
    assert findings is not None
    assert findings.paragraphs == ("Small nodule in the left lower lobe.",)
    assert report.conclusion == "Normal study."
    assert report.organisation == "Radiology Wien" and "Lena Berger" in report.authors
    assert report.replaces is not None and report.quirks == ()
    assert report.bundle["resourceType"] == "Bundle"


def test_an_older_version_reads_as_preliminary(
    client: PeerClient, context: PeerContext, reports: dict[str, str]
) -> None:
    first = client.report(context, reports["s1"], version="1")
    assert (first.version, first.status, first.preliminary) == ("1", "preliminary", True)
    findings = first.section("59776-5")
    assert findings is not None and findings.paragraphs == ("Pending.",)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_the_history_is_newest_first(
    client: PeerClient, context: PeerContext, reports: dict[str, str], b: Node, fmt: str
) -> None:
    rid = f"history-{fmt}"
    history = client.report_history(context, reports["s1"], fmt=fmt, request_id=rid)  # type: ignore[arg-type]
    assert [v.version for v in history.versions] == ["2", "1"]
    assert [v.status for v in history.versions] == ["final", "preliminary"]
    assert history.latest is not None and history.latest.version == "2"
    assert history.versions[0].replaces is not None and history.versions[1].replaces is None
    [mine] = b_records(b, rid)
    assert (mine.action, mine.interaction, mine.outcome) == ("report-read", "history-instance", 0)
    assert mine.details["versions"] == ["2", "1"] and mine.studies == [S1]


def test_another_patients_report_is_refused_as_unknown(
    client: PeerClient, context: PeerContext, reports: dict[str, str]
) -> None:
    with pytest.raises(PeerRefused) as refused:
        client.report(context, reports["pat101"])
    assert refused.value.status == 404 and refused.value.code == "not-found"
    assert "no" in refused.value.diagnostics.lower()


def test_a_report_id_that_is_no_fhir_id_is_not_sent(
    client: PeerClient, context: PeerContext
) -> None:
    with pytest.raises(ValueError, match="FHIR id"):
        client.report(context, "../metadata")
