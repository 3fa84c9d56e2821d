"""Country B's peer client against a real node A over mutual TLS (``node_a``): typed results of
``$match``, the list (every page, JSON and XML, with filters), manifests and ``$imaging-access``
(options A, B, C; emergency as ``stat``); A's refusals reaching the caller typed with A's text;
trust failures refused before anything is sent; B's audit record of every request.

Reports with versions are in tests/test_peer_reports.py (a node of their own: they ingest);
retries against a scripted server in tests/test_peer_retries.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from ncp.audit.chain import verify as verify_chain
from ncp.audit.models import Action, Outcome
from ncp.cli import main
from ncp.config import settings_from_mapping
from ncp.consumer.assertions import AssertionSigner, context_of, own_claims
from ncp.consumer.model import (
    PeerAnswerInvalid,
    PeerContext,
    PeerNotAllowed,
    PeerRefused,
    PeerUnreachable,
    PeerUntrusted,
)
from ncp.consumer.peer import PeerClient
from ncp.consumer.results import ListFilters, PatientQuery
from ncp.errors import ConfigError
from ncp.node import Node
from ncp.security.access import AccessVerifier
from ncp.security.claims import HP_ASSERTION, IMAGE_ACCESS, TRC, VIEWER_LAUNCH
from ncp.security.keystore import KeyStore
from ncp.security.replay import MemoryReplayGuard
from ncp.security.tokens import verify
from ncp.security.trust import TrustList, fingerprint, format_fingerprint
from tests.security_support import cert_of
from tests.support import node as node_support
from tests.support.country_b import HP, Sleeps, b_client, b_node, b_records
from tests.support.node import (
    EDGE_URL,
    PATIENTS,
    SYSTEM,
    UNTRUSTED,
    VIEWER_URL,
    A,
    RunningNode,
    studies_of,
)

node_a = node_support.node_a  # the fixture: a real node A on loopback
PAT100 = PATIENTS["PAT100"]


@pytest.fixture(scope="module")
def b(node_a: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = b_node(tmp_path_factory.mktemp("node-b"), node_a)
    yield node
    node.close()


@pytest.fixture(scope="module")
def client(b: Node) -> Iterator[PeerClient]:
    with b_client(b) as c:
        yield c


@pytest.fixture(scope="module")
def context(client: PeerClient) -> PeerContext:
    hp = client.hp_assertion(A, HP)
    return client.confirm(A, hp, PAT100.ref, purpose="TREAT", informed=True)


def last_seq(node: Node) -> int:
    records = b_records(node)
    return records[-1].seq if records else 0


# --- assertions --------------------------------------------------------------------------------


def test_b_signs_the_hp_assertion_with_acr_and_the_trc_bound_to_it(
    client: PeerClient,
    context: PeerContext,
    node_a: RunningNode,
) -> None:
    keys = KeyStore.load(node_a.b.keys_dir, country="BE").published_keys()
    now = datetime.now(UTC)
    hp = verify(HP_ASSERTION, context.hp_assertion, keys, audience=node_a.url, issuer="BE", now=now)
    trc = verify(TRC, context.trc, keys, audience=node_a.url, issuer="BE", now=now)
    assert hp.authentication_context == HP.authentication
    assert (hp.subject, hp.subject_name, hp.point_of_care) == (
        HP.subject,
        HP.name,
        HP.point_of_care,
    )
    assert trc.patient == PAT100.ref and trc.purpose_of_use == "TREAT" and trc.informed
    assert trc.expires_at <= hp.expires_at
    assert context.expires_at == min(hp.expires_at, trc.expires_at)
    assert context_of(A, context.hp_assertion, context.trc) == context


def test_acr_is_optional_and_checked_like_every_claim() -> None:
    from dataclasses import replace

    from ncp.security.claims import ClaimProblem, HpAssertion
    from tests.support.token_factory import hp_claims

    without = hp_claims()
    assert without.authentication_context is None and "acr" not in without.to_payload()
    with_acr = replace(without, authentication_context="urn:example:acr:2fa")
    payload = with_acr.to_payload()
    assert payload["acr"] == "urn:example:acr:2fa"
    assert HpAssertion.from_payload(payload) == with_acr
    with pytest.raises(ClaimProblem, match="acr"):
        replace(without, authentication_context=" ")
    with pytest.raises(ClaimProblem, match="acr"):
        HpAssertion.from_payload({**payload, "acr": 2})


def test_an_emergency_may_go_ahead_uninformed_but_treatment_may_not(client: PeerClient) -> None:
    hp = client.hp_assertion(A, HP)
    emergency = client.confirm(A, hp, PAT100.ref, purpose="EMERGENCY", informed=False)
    assert own_claims(TRC, emergency.trc).purpose_of_use == "ETREAT"
    with pytest.raises(ValueError, match="ncp_informed"):
        client.confirm(A, hp, PAT100.ref, purpose="TREATMENT", informed=False)


def test_a_trc_is_only_signed_under_an_assertion_for_the_same_peer(
    client: PeerClient, node_a: RunningNode
) -> None:
    keystore = KeyStore.load(node_a.b.keys_dir, country="BE")
    signer = AssertionSigner(
        keystore, lifetime=timedelta(minutes=5), clock=lambda: datetime.now(UTC)
    )
    elsewhere = signer.hp_assertion(HP, "https://ncp.de.test/fhir")
    with pytest.raises(ValueError, match="another peer"):
        client.confirm(A, elsewhere, PAT100.ref, purpose="TREAT", informed=True)


def test_confirming_is_audited_on_b(client: PeerClient, b: Node) -> None:
    hp = client.hp_assertion(A, HP)
    client.confirm(A, hp, PAT100.ref, purpose="TREAT", informed=True, request_id="confirm-1")
    [record] = b_records(b, "confirm-1")
    assert (record.side, record.action, record.outcome) == ("consumer", "trc-confirm", 0)
    assert (record.patient_id, record.peer_country, record.actor_id) == ("PAT100", A, HP.subject)


# --- Patient/$match ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "outcome", "found"),
    [
        (
            PatientQuery(PAT100.ref, family="Gruber", birth_date=date(1980, 5, 17)),
            "certain",
            ["PAT100"],
        ),
        (PatientQuery(PAT100.ref), "probable", ["PAT100"]),
        (
            PatientQuery(PAT100.ref, family="Gruber", birth_date=date(1981, 1, 1)),
            "possible",
            ["PAT100"],
        ),
        (
            PatientQuery(family="Huber", birth_date=date(1975, 3, 2)),
            "ambiguous",
            ["PAT101", "PAT102"],
        ),
        (PatientQuery(PATIENTS["PAT100"].ref.__class__(SYSTEM, "PAT999")), "no-match", []),
    ],
    ids=["certain", "probable", "possible", "ambiguous", "no-match"],
)
def test_match_gives_each_outcome_typed(
    client: PeerClient,
    b: Node,
    node_a: RunningNode,
    query: PatientQuery,
    outcome: str,
    found: list[str],
) -> None:
    hp = client.hp_assertion(A, HP)
    rid = f"match-{outcome}"
    result = client.match(A, hp, query, request_id=rid)
    assert result.outcome == outcome
    assert sorted(c.patient.value for c in result.candidates) == found
    assert all(c.patient.system == SYSTEM for c in result.candidates)
    assert (result.certain is not None) == (outcome == "certain")
    if outcome == "ambiguous":
        assert all(c.grade != "certain" for c in result.candidates)
    [mine] = b_records(b, rid)
    assert (mine.action, mine.side, mine.peer_country) == ("patient-identify", "consumer", A)
    assert mine.outcome == (Outcome.MINOR_FAILURE if outcome == "no-match" else Outcome.SUCCESS)
    assert mine.details["result"] == outcome and mine.query == query.text()
    assert mine.actor_name == HP.name and mine.details["acr"] == HP.authentication
    # A's record carries the same correlation id: one exchange, both sides.
    [theirs] = node_a.audit_records(rid)
    assert theirs.action == "patient-identify" and theirs.peer_country == "BE"


def test_match_in_xml_reads_the_same(client: PeerClient) -> None:
    hp = client.hp_assertion(A, HP)
    query = PatientQuery(family="Huber", birth_date=date(1975, 3, 2))
    assert client.match(A, hp, query, fmt="xml") == client.match(A, hp, query)


# --- the list ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_the_list_follows_every_page(
    client: PeerClient, context: PeerContext, b: Node, fmt: str
) -> None:
    rid = f"list-pages-{fmt}"
    listed = client.metadata_list(context, page_size=1, fmt=fmt, request_id=rid)  # type: ignore[arg-type]
    assert listed.pages == 2 and listed.total == 2
    assert sorted(s.study_uid for s in listed.studies) == sorted(studies_of("PAT100"))
    assert listed.reports == () and listed.quirks == ()
    ct = next(s for s in listed.studies if s.modalities == ("CT",))
    assert ct.size and ct.accession and ct.custodian == "Test node AT"
    assert ct.date is not None and ct.date.tzinfo is not None
    records = b_records(b, rid)
    assert [r.details["page"] for r in records] == [1, 2]
    assert all(r.action == "list-query" and r.outcome == 0 for r in records)
    wanted = "application/fhir+xml" if fmt == "xml" else "application/fhir+json"
    assert {r.details["content_type"] for r in records} == {wanted}
    assert "_offset=1" in records[1].query and "_offset" not in records[0].query


def test_the_list_in_one_page_equals_the_list_in_pages(
    client: PeerClient, context: PeerContext
) -> None:
    whole = client.metadata_list(context)
    assert whole.pages == 1
    assert whole.studies == client.metadata_list(context, page_size=1, fmt="xml").studies


@pytest.mark.parametrize(
    ("filters", "modalities"),
    [
        (ListFilters(modalities=("MR",)), ["MR"]),
        (ListFilters(modalities=("MR", "CT")), ["CT", "MR"]),
        (ListFilters(modalities=("US",)), []),
        (ListFilters(date_from=date(2024, 1, 1), date_to=date(2024, 12, 31)), ["CT", "MR"]),
        (ListFilters(date_to=date(2023, 12, 31)), []),
        (ListFilters(text="angiography"), []),
        (ListFilters(study_uids=(studies_of("PAT100")[1],)), ["MR"]),
    ],
)
def test_the_list_filters_reach_a(
    client: PeerClient, context: PeerContext, filters: ListFilters, modalities: list[str]
) -> None:
    listed = client.metadata_list(context, filters)
    assert sorted(m for s in listed.studies for m in s.modalities) == modalities
    found = client.imaging_studies(context, filters)
    assert sorted(m for s in found.manifests for m in s.modalities) == modalities


def test_manifests_in_pages_say_what_to_verify(client: PeerClient, context: PeerContext) -> None:
    listed = client.imaging_studies(context, page_size=1, fmt="xml")
    assert listed.pages == 2
    by_uid = listed.by_uid()
    ct, mr = (by_uid[uid] for uid in studies_of("PAT100"))
    assert (ct.instance_count, mr.instance_count) == (2, 1)
    assert ct.patient == PAT100.ref and ct.modalities == ("CT",)
    [series] = ct.series
    assert [i.sop_instance_uid for i in series.instances] == [
        f"{ct.study_uid}.1.1",
        f"{ct.study_uid}.1.2",
    ]
    assert all(i.sop_class_uid.startswith("1.2.840.10008.") for i in series.instances)
    assert series.size == ct.size and ct.size and ct.size > 0
    assert ct.viewer is not None and ct.viewer.startswith(VIEWER_URL)


def test_manifests_by_uid_for_the_jobs(client: PeerClient, context: PeerContext) -> None:
    unknown = "1.2.826.0.1.3680043.10.543.999"
    found = client.manifests(context, [*studies_of("PAT100"), unknown])
    assert sorted(found) == sorted(studies_of("PAT100"))
    # Another patient's study is simply not this patient's: absent, never someone else's.
    assert client.manifests(context, studies_of("PAT101")) == {}


# --- $imaging-access ---------------------------------------------------------------------------


def test_option_a_grants_a_token_for_a_gateway(
    client: PeerClient,
    context: PeerContext,
    node_a: RunningNode,
) -> None:
    studies = studies_of("PAT100")
    grant = client.imaging_access(context, studies, "A", "normal", request_id="access-a")
    assert grant.option == "A" and grant.studies == tuple(studies)
    assert grant.base_url == node_a.imaging_url
    assert grant.expires_at > datetime.now(UTC)
    a_keys = node_a.node.keystore.published_keys()
    verifier = AccessVerifier(a_keys, audience=grant.base_url, issuer=A)
    claims = verifier.check(grant.token, study_uid=studies[0], now=datetime.now(UTC))
    assert claims.priority == "routine" and claims.purpose_of_use == "TREAT"
    [theirs] = node_a.audit_records("access-a")
    assert theirs.action in ("access-token-issue", "access-token-renew")
    assert theirs.token_jti == claims.jti


def test_option_c_grants_a_token_for_the_edge(client: PeerClient, context: PeerContext) -> None:
    grant = client.imaging_access(context, studies_of("PAT100")[:1], "C", "batch")
    assert grant.base_url == EDGE_URL and grant.option == "C"


def test_an_emergency_travels_as_stat_with_etreat(
    client: PeerClient,
    node_a: RunningNode,
    b: Node,
) -> None:
    hp = client.hp_assertion(A, HP)
    emergency = client.confirm(A, hp, PAT100.ref, purpose="EMERGENCY", informed=False)
    grant = client.imaging_access(
        emergency, studies_of("PAT100"), "A", "emergency", request_id="access-stat"
    )
    claims = verify(
        IMAGE_ACCESS,
        grant.token,
        node_a.node.keystore.published_keys(),
        audience=grant.base_url,
        issuer=A,
        now=datetime.now(UTC),
    )
    assert (claims.priority, claims.purpose_of_use) == ("stat", "ETREAT")
    [mine] = b_records(b, "access-stat")
    assert (mine.priority, mine.purpose, mine.option) == ("stat", "ETREAT", "A")
    assert mine.details["lane"] == "emergency" and mine.token_jti == claims.jti
    [theirs] = node_a.audit_records("access-stat")
    assert (theirs.priority, theirs.purpose) == ("stat", "ETREAT")


def test_option_b_gives_a_one_time_viewer_url(
    client: PeerClient,
    context: PeerContext,
    node_a: RunningNode,
    b: Node,
) -> None:
    study = studies_of("PAT100")[0]
    grant = client.viewer_launch(context, [study], request_id="access-b")
    assert grant.url.startswith(f"{VIEWER_URL}/launch?code=")
    code = grant.url.partition("code=")[2]
    claims = verify(
        VIEWER_LAUNCH,
        code,
        node_a.node.keystore.published_keys(),
        audience=VIEWER_URL,
        issuer=A,
        now=datetime.now(UTC),
        replay=MemoryReplayGuard(),
    )
    assert claims.studies == (study,) and claims.preferred_language == HP.language
    [mine] = b_records(b, "access-b")
    assert (mine.action, mine.option) == ("viewer-launch", "B")


def test_imaging_access_is_not_for_option_b(client: PeerClient, context: PeerContext) -> None:
    with pytest.raises(ValueError, match="viewer_launch"):
        client.imaging_access(context, studies_of("PAT100"), "B", "normal")  # type: ignore[arg-type]


# --- refusals from A, typed with A's text --------------------------------------------------------


def test_a_study_of_another_patient_is_refused_with_a_text(
    client: PeerClient,
    context: PeerContext,
    b: Node,
    node_a: RunningNode,
) -> None:
    theirs = studies_of("PAT101")[0]
    with pytest.raises(PeerRefused) as refused:
        client.imaging_access(context, [theirs], "A", "normal", request_id="wrong-patient")
    assert refused.value.status == 403 and refused.value.peer == A
    assert refused.value.code == "forbidden"
    assert theirs in refused.value.diagnostics
    assert "not available for the patient" in refused.value.diagnostics
    [mine] = b_records(b, "wrong-patient")
    assert (mine.outcome, mine.reason) == (Outcome.SERIOUS_FAILURE, refused.value.diagnostics)
    assert mine.details["status"] == 403 and mine.details["attempts"] == 1
    [theirs_record] = node_a.audit_records("wrong-patient")
    assert theirs_record.reason == refused.value.diagnostics


def test_an_expired_trc_is_refused_by_a_with_its_text(
    client: PeerClient,
    node_a: RunningNode,
    b: Node,
) -> None:
    past = datetime.now(UTC) - timedelta(hours=3)
    keystore = KeyStore.load(node_a.b.keys_dir, country="BE")
    signer = AssertionSigner(keystore, lifetime=timedelta(hours=1), clock=lambda: past)
    hp = signer.hp_assertion(HP, node_a.url)
    expired = context_of(A, hp, signer.trc(hp, PAT100.ref, purpose="TREAT", informed=True))
    assert expired.expires_at < datetime.now(UTC)
    with pytest.raises(PeerRefused) as refused:
        client.metadata_list(expired, request_id="expired-trc")
    assert refused.value.status == 401
    assert "expired" in refused.value.diagnostics
    [mine] = b_records(b, "expired-trc")
    assert mine.outcome == Outcome.SERIOUS_FAILURE and "expired" in (mine.reason or "")


def test_a_peer_not_on_the_trust_list_is_refused_before_any_connection(
    client: PeerClient, context: PeerContext, b: Node
) -> None:
    elsewhere = PeerContext(
        UNTRUSTED, context.hp_assertion, context.trc, PAT100.ref, context.expires_at
    )
    before = last_seq(b)
    with pytest.raises(PeerNotAllowed, match="not among the peers"):
        client.metadata_list(elsewhere, request_id="not-trusted")
    [mine] = b_records(b, "not-trusted")
    assert mine.seq > before and mine.outcome == Outcome.SERIOUS_FAILURE
    assert mine.peer_country == UNTRUSTED and "status" not in mine.details
    with pytest.raises(PeerNotAllowed):
        client.hp_assertion(UNTRUSTED, HP)
    typo = PeerContext("at ", context.hp_assertion, context.trc, PAT100.ref, context.expires_at)
    with pytest.raises(PeerNotAllowed):
        client.report(typo, "r1", request_id="typo-peer")
    [mine] = b_records(b, "typo-peer")
    assert mine.peer_country is None and mine.details["peer"] == "at "


def test_config_naming_a_peer_the_trust_list_lacks_is_refused(
    b: Node,
    node_a: RunningNode,
) -> None:
    settings = b.settings.consumer.model_copy(update={"peers": [A, "LU"]})
    with pytest.raises(ConfigError, match=r"consumer\.peers: LU is not on the trust list"):
        PeerClient(keystore=b.keystore, trust=b.trust, auditor=b.auditor, settings=settings)
    own = b.settings.consumer.model_copy(update={"peers": ["BE"]})
    with pytest.raises(ConfigError, match="own country"):
        PeerClient(keystore=b.keystore, trust=b.trust, auditor=b.auditor, settings=own)
    with pytest.raises(ConfigError, match=r"consumer\.peers"):
        settings_from_mapping(
            {
                "node": {"country": "BE"},
                "archive": {"kind": "folder", "path": "x"},
                "consumer": {"peers": ["at"]},
            },
            base_dir=Path("."),
            environ={},
        )


def test_a_b_that_a_does_not_trust_gets_no_answer(
    node_a: RunningNode,
    tmp_path: Path,
) -> None:
    """FR's node (A does not trust its CA) calling A: A closes the handshake; B is told,
    without retrying, and A audited the refusal."""
    fr_keys = node_a.root / UNTRUSTED.lower()
    fr = b_node(tmp_path / "fr", node_a, keys_dir=fr_keys, country=UNTRUSTED)
    sleeps = Sleeps()
    try:
        with b_client(fr, sleeps) as c:
            hp = c.hp_assertion(A, HP)
            after = node_a.last_seq()
            with pytest.raises(PeerUnreachable) as failed:
                c.match(A, hp, PatientQuery(PAT100.ref), request_id="fr-call")
        assert sleeps.calls == []
        assert "client certificate" in str(failed.value) or isinstance(failed.value, PeerUntrusted)
        refusals = node_a.wait_for_audit(lambda r: r.action == "refusal", after=after)
        assert refusals and all(r.outcome == Outcome.SERIOUS_FAILURE for r in refusals)
        [mine] = b_records(fr, "fr-call")
        assert mine.outcome in (Outcome.SERIOUS_FAILURE, Outcome.MAJOR_FAILURE)
    finally:
        fr.close()


# --- trust: pins and CAs, checked before anything is sent ----------------------------------------


def _pinned_client(
    node_a: RunningNode,
    root: Path,
    pin: str,
) -> tuple[Node, PeerClient, Sleeps]:
    node = b_node(root, node_a, trust_changes={"tls_fingerprint": pin})
    sleeps = Sleeps()
    return node, PeerClient.from_node(node, sleep=sleeps), sleeps


def test_a_server_certificate_not_matching_the_pin_is_refused_before_sending(
    node_a: RunningNode,
    tmp_path: Path,
) -> None:
    wrong = format_fingerprint(fingerprint(cert_of(node_a.ca_file)))
    node, c, sleeps = _pinned_client(node_a, tmp_path / "wrong-pin", wrong)
    try:
        hp = c.hp_assertion(A, HP)
        after = node_a.last_seq()
        with pytest.raises(PeerUntrusted, match="not pinned"):
            c.match(A, hp, PatientQuery(PAT100.ref), request_id="wrong-pin")
        assert sleeps.calls == []
        # A never saw the request: no record of it (A audits every $match, even refused ones).
        assert node_a.audit_records("wrong-pin") == []
        assert all(r.request_id != "wrong-pin" for r in node_a.audit_records()[after:])
        [mine] = b_records(node, "wrong-pin")
        assert mine.outcome == Outcome.SERIOUS_FAILURE and "not pinned" in (mine.reason or "")
    finally:
        c.close()
        node.close()


def test_the_right_pin_is_accepted(node_a: RunningNode, tmp_path: Path) -> None:
    server = node_a.ca_file.parent / "server.pem"
    right = format_fingerprint(fingerprint(cert_of(server)))
    node, c, _ = _pinned_client(node_a, tmp_path / "right-pin", right)
    try:
        hp = c.hp_assertion(A, HP)
        assert c.match(A, hp, PatientQuery(PAT100.ref)).outcome == "probable"
    finally:
        c.close()
        node.close()


def test_a_server_certificate_from_another_ca_is_refused_and_not_retried(
    node_a: RunningNode,
    tmp_path: Path,
) -> None:
    other_ca = node_a.root / "de" / "ca.pem"
    node = b_node(tmp_path / "other-ca", node_a, trust_changes={"tls_ca": str(other_ca)})
    sleeps = Sleeps()
    try:
        with b_client(node, sleeps) as c:
            hp = c.hp_assertion(A, HP)
            with pytest.raises(PeerUntrusted, match=r"TLS with .* failed: .*certificate"):
                c.match(A, hp, PatientQuery(PAT100.ref), request_id="other-ca")
        assert sleeps.calls == []
        assert node_a.audit_records("other-ca") == []
    finally:
        node.close()


def test_a_next_link_to_another_server_is_not_followed() -> None:
    from ncp.consumer.channel import PeerChannel, RetryPolicy
    from ncp.security.trust import Peer

    peer = Peer("AT", "https://ncp.at.example/fhir")
    import ssl

    channel = PeerChannel(
        peer,
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
        connect_timeout_s=1,
        timeout_s=1,
        policy=RetryPolicy(),
    )
    try:
        assert channel.on_peer("https://ncp.at.example/fhir/DocumentReference?_offset=1")
        for url in (
            "https://evil.example/fhir/DocumentReference",
            "https://ncp.at.example/fhirx/DocumentReference",
            "http://ncp.at.example/fhir/DocumentReference",
            "https://ncp.at.example:444/fhir/DocumentReference",
            "https://ncp.at.example/other",
        ):
            assert not channel.on_peer(url), url
            with pytest.raises(PeerAnswerInvalid):
                channel.request("GET", url, headers={})
    finally:
        channel.close()


def test_the_trust_list_of_b_is_what_the_client_uses(b: Node) -> None:
    assert isinstance(b.trust, TrustList)
    with b_client(b) as c:
        assert [p.country for p in c.peers()] == [A]


def test_b_audit_chain_stays_intact(b: Node) -> None:
    with b.sessions() as session:
        result = verify_chain(session)
    assert result.ok, result.first_broken
    records = b_records(b)
    assert records and all(r.side == "consumer" for r in records)
    actions = {r.action for r in records}
    assert {"patient-identify", "list-query", "access-token-issue", "viewer-launch"} <= actions
    assert all(r.request_id and (r.peer_country or "peer" in r.details) for r in records)
    patient_level = [
        r for r in records if r.action in (Action.LIST_QUERY, Action.ACCESS_TOKEN_ISSUE)
    ]
    assert all(r.patient_id and r.actor_id == HP.subject for r in patient_level)
    assert all(len(r.details["policies"]) == 2 for r in patient_level)


# --- ncp ask -------------------------------------------------------------------------------------

HP_TOML = """
subject = "BE-HP-0042"
name = "Dr. Anne Peeters"
role = "221"
role_display = "Medical doctors"
organisation = "UZ Leuven"
organisation_id = "urn:oid:2.16.56.1.1.1.1"
point_of_care = "Emergency department, Gasthuisberg"
language = "nl-BE"
authentication = "http://eidas.europa.eu/LoA/substantial"
"""


def test_ncp_ask_asks_as_country_b(
    b: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hp = tmp_path / "hp.toml"
    hp.write_text(HP_TOML)
    base = [
        "ask",
        "--config",
        str(Path(b.settings.trust.list).parent / "node.toml"),
        "--peer",
        A,
        "--hp",
        str(hp),
    ]
    patient = ["--patient", f"{SYSTEM}|PAT100"]
    identify = ["match", "--identifier", f"{SYSTEM}|PAT100", "--family", "Gruber"]
    assert main([*base, "--json", *identify, "--birth-date", "1980-05-17"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "certain"

    assert main([*base, "--xml", "list", *patient, "--modality", "MR"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 studies, 0 reports") and studies_of("PAT100")[1] in out

    assert main([*base, "--json", "list", *patient, "--manifests", "--page-size", "1"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["pages"] == 2 and len(listed["manifests"]) == 2

    study = studies_of("PAT100")[0]
    assert main([*base, "access", *patient, "--study", study, "--option", "B"]) == 0
    assert f"{VIEWER_URL}/launch?code=" in capsys.readouterr().out

    theirs = studies_of("PAT101")[0]
    assert main([*base, "access", *patient, "--study", theirs]) == 1
    assert "not available for the patient" in capsys.readouterr().err

    assert main([*base, "access", "--patient", "no-system", "--study", study]) == 2
    hp.write_text(HP_TOML + 'extra = "x"\n')
    assert main([*base, *identify]) == 2
