"""The portal's parts without a browser: the list's view model from a generated patient's list
(as country A serves it), the catalogues and locales, ``ncp portal`` accounts on the command
line, and sessions shared by two replicas of B on one database (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ncp.cli import main
from ncp.node import Node
from ncp.portal.accounts import AccountError, HpProfile, create_account, hash_password
from ncp.portal.app import SESSION_COOKIE
from ncp.portal.i18n import (
    LANGUAGES,
    Translator,
    catalogues,
    from_accept_language,
    page_language,
)
from ncp.portal.listview import COLUMNS, ROW_KEYS, ListContext, build_list
from ncp.store.portal import HpAccount
from tests.portal_support import client, csrf_of, login
from tests.support.portal import PASSWORD, Clock, add_hp, portal_node, totp_now
from tests.support.portal_data import GeneratedList, as_read, generated_list


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GeneratedList:
    return generated_list(tmp_path_factory.mktemp("portal-units"), studies=300)


def _model(generated: GeneratedList, tag: str = "en") -> dict[str, Any]:
    ctx = ListContext(peer="AT", throughput=10e6, report_url=lambda r: f"/reports/{r}")
    listed, manifests = as_read(
        generated.patient, generated.document_references, generated.imaging_studies
    )
    return build_list(listed, manifests, Translator(tag), ctx)


def test_view_model_of_300_generated_studies(generated: GeneratedList) -> None:
    model = _model(generated)
    rows = model["rows"]
    assert model["version"] == 2 and model["skipped"] == 0
    assert model["columns"] == list(COLUMNS)
    assert len(rows) == 300 and all(r["kind"] == "study" for r in rows)
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert [r["started"] for r in rows] == sorted((r["started"] for r in rows), reverse=True)
    # Every report A lists is linked to its study, by the study's UID.
    reports = [d for d in generated.document_references if "docStatus" in d]
    linked = {r["report"]["id"] for r in rows if r["report"]}
    assert linked == {d["id"] for d in reports}
    assert sum(r["report"]["preliminary"] for r in rows if r["report"]) == sum(
        d["docStatus"] == "preliminary" for d in reports
    )
    studies = {s["id"]: s for s in generated.imaging_studies}
    for row in rows:
        study = studies[row["id"]]
        assert (row["series"], row["instances"]) == (
            study["numberOfSeries"], study["numberOfInstances"],
        )  # fmt: skip
        assert row["size_bytes"] > 0 and row["download_s"] == round(row["size_bytes"] / 10e6, 1)
        assert row["modalities"] and row["country"] == "AT"
        assert row["report"] is None or row["report"]["url"] == f"/reports/{row['report']['id']}"


def test_coded_values_in_the_hps_language(generated: GeneratedList) -> None:
    english = {r["id"]: r for r in _model(generated, "en")["rows"]}
    for tag, chest in (("de-AT", "Thorax"), ("fr-BE", "Thorax"), ("nl-BE", "Bekken")):
        rows = _model(generated, tag)["rows"]
        sites = {s["display"] for r in rows for s in r["body_sites"]}
        assert chest in sites, (tag, sorted(sites)[:10])
        row = next(r for r in rows if r["body_sites"])
        assert row["body_site_display"] != english[row["id"]]["body_site_display"] or tag == "fr-BE"
    german = _model(generated, "de-AT")["rows"][0]
    assert german["started_display"][2] == "." and german["report"]["status_display"] in (
        "Endgültig", "Vorläufig", "Geändert",
    )  # fmt: skip


def test_a_report_without_its_study_is_a_row_of_its_own(generated: GeneratedList) -> None:
    reports = [d for d in generated.document_references if "docStatus" in d]
    listed, _ = as_read(generated.patient, reports[:3], [])
    model = build_list(listed, {}, Translator("en"), ListContext(peer="AT"))
    assert [r["kind"] for r in model["rows"]] == ["report"] * 3
    assert all(r["report"] and r["download_display"] == "" for r in model["rows"])


def test_unreadable_entries_are_counted_not_shown(generated: GeneratedList) -> None:
    manifest = next(d for d in generated.document_references if "docStatus" not in d)
    no_date = json.loads(json.dumps(manifest))
    del no_date["context"]["period"], no_date["date"]
    listed, _ = as_read(generated.patient, [no_date], [])
    # A's own warnings (entries it could not build) are counted with what B cannot place.
    listed = dataclasses.replace(listed, warnings=("entry 7: no manifest could be built",))
    model = build_list(listed, {}, Translator("en"), ListContext(peer="AT"))
    assert model["rows"] == [] and model["skipped"] == 2


def test_catalogues_hold_the_same_keys() -> None:
    found = catalogues()
    assert set(found) == set(LANGUAGES)
    assert len({frozenset(c) for c in found.values()}) == 1
    for lang, messages in found.items():
        for key, text in messages.items():
            assert text.strip(), (lang, key)
            assert "<" not in text, (lang, key)  # messages are text, never markup


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        ("de-AT,de;q=0.9,en;q=0.5", "de-AT"),
        ("nl-BE, fr-BE;q=0.8", "fr-BE"),
        ("es, it;q=0.5", "en"),
        ("fr;q=0, de;q=0.1", "de"),
        ("<script>", "en"),
    ],
)
def test_language_from_accept_language(header: str | None, expected: str) -> None:
    assert from_accept_language(header) == expected
    assert page_language(expected) in LANGUAGES


def test_accounts_check_what_the_assertion_needs(tmp_path: Path) -> None:
    node = portal_node(tmp_path)
    try:
        profile = HpProfile("u1", "Dr. X", "221", "Medical doctors", "Org", "urn:oid:1.2",
                            "ED", "de-AT")  # fmt: skip
        with pytest.raises(AccountError, match="12 characters"):
            create_account(node.sessions, profile, password="short")
        for change, match in (
            ({"role_code": "doctor"}, "ISCO-08"),
            ({"organisation_id": "Org"}, "URI"),
            ({"language": "not a tag!"}, "BCP 47"),
            ({"username": "a b"}, "no spaces"),
        ):
            bad = HpProfile(**{**profile.__dict__, **change})
            with pytest.raises(AccountError, match=match):
                create_account(node.sessions, bad, password=PASSWORD)
        assert create_account(node.sessions, profile, password=PASSWORD)
        with pytest.raises(AccountError, match="taken"):
            create_account(node.sessions, profile, password=PASSWORD)
        with node.sessions() as session:
            row = session.scalars(select(HpAccount)).one()
        assert row.password_hash and row.password_hash.startswith("$argon2id$")
        assert PASSWORD not in row.password_hash and hash_password(PASSWORD) != row.password_hash
    finally:
        node.close()


def test_ncp_portal_add_user_and_users(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    node = portal_node(tmp_path)
    node.close()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ncountry = "BE"\n[database]\nurl = "sqlite:///{tmp_path / "node-b.db"}"\n'
        f'[archive]\nkind = "folder"\npath = "{tmp_path / "archive"}"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("NCP_PORTAL_PASSWORD", PASSWORD)
    code = main(["portal", "add-user", "--config", str(config), "--username", "dr.maes",
                 "--name", "Dr. Maes", "--organisation", "AZ Brugge",
                 "--organisation-id", "urn:oid:1.2.3", "--point-of-care", "Radiology",
                 "--language", "nl-BE", "--json"])  # fmt: skip
    assert code == 0
    made = json.loads(capsys.readouterr().out)
    assert len(made["totp_secret"]) >= 16
    assert made["otpauth_uri"].startswith("otpauth://totp/") and "dr.maes" in made["otpauth_uri"]
    assert main(["portal", "users", "--config", str(config), "--json"]) == 0
    users = json.loads(capsys.readouterr().out)
    assert [u["username"] for u in users] == ["dr.maes"] and users[0]["password"] is True
    again = main(["portal", "add-user", "--config", str(config), "--username", "dr.maes",
                  "--name", "X", "--organisation", "O", "--organisation-id", "urn:oid:1",
                  "--point-of-care", "P"])  # fmt: skip
    assert again == 2 and "taken" in capsys.readouterr().err


@pytest.fixture
def replicas(tmp_path: Path, db_url: str) -> Iterator[tuple[Node, Node, Clock]]:
    clock = Clock()
    first = portal_node(tmp_path, clock=clock, database_url=db_url, max_failures_account=2)
    second = portal_node(tmp_path, clock=clock, database_url=db_url, max_failures_account=2)
    yield first, second, clock
    first.close()
    second.close()


def test_sessions_work_across_replicas(replicas: tuple[Node, Node, Clock]) -> None:
    one, two, clock = replicas
    secret = add_hp(one)
    assert secret is not None
    a, b = client(one), client(two)
    login(a, secret, clock)
    cookie = {"Cookie": f"{SESSION_COOKIE}={a.cookies[SESSION_COOKIE]}"}
    assert b.get("/account", headers=cookie).status_code == 200  # the other replica knows it
    # The same TOTP code at the other replica is refused: accepted once across the node.
    fresh = client(two)
    page = fresh.get("/login")
    fresh.post("/login", data={"username": "dr.peeters", "password": PASSWORD,
                               "csrf_token": csrf_of(page.text)})  # fmt: skip
    page = fresh.get("/login/totp")
    replay = fresh.post("/login/totp", data={"code": totp_now(secret, clock),
                                             "csrf_token": csrf_of(page.text)})  # fmt: skip
    assert replay.status_code == 401
    # A logout at one replica ends the session at the other.
    token = csrf_of(b.get("/", headers=cookie).text)
    assert b.post("/logout", headers=cookie, data={"csrf_token": token},
                  follow_redirects=False).status_code == 303  # fmt: skip
    assert a.get("/account", follow_redirects=False).status_code == 303


def test_lock_out_counts_failures_across_replicas(replicas: tuple[Node, Node, Clock]) -> None:
    one, two, _clock = replicas
    add_hp(one)
    for node in (one, two):
        c = client(node)
        page = c.get("/login")
        r = c.post("/login", data={"username": "dr.peeters", "password": "wrong password!",
                                   "csrf_token": csrf_of(page.text)})  # fmt: skip
    assert r.status_code == 429 and "locked" in r.text


def test_the_confirm_template_renders_the_contract_types_as_text() -> None:
    from datetime import UTC, datetime

    from ncp.config import NodeSection
    from ncp.portal.app import templates
    from ncp.portal.patients import Confirmed
    from ncp.security.claims import PatientRef

    now = datetime.now(UTC)
    confirmed = Confirmed(
        key="k1", peer="AT", patient=PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "<b>1234</b>"),
        display="<script>x()</script>", purpose="ETREAT", informed=False, hp_assertion="a.b.c",
        trc="d.e.f", expires_at=now, confirmed_at=now,
    )  # fmt: skip
    html = templates().get_template("confirm.html").render(
        t=Translator("de-AT"), lang="de", session=None, hp=None, csrf="tok",
        node=NodeSection(country="BE"), version="x", request_id="r",
        confirmed=confirmed, expired=True, expired_at="6. Dez. 2026, 17:00", error=None,
    )  # fmt: skip
    assert "Behandlungsbeziehung bestätigen" in html
    assert "<script>x()</script>" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;1234&lt;/b&gt;" in html
    assert "endete um 6. Dez. 2026, 17:00" in html  # the reason it is asked again
    # An emergency confirmation is asked again as an emergency, visibly so.
    assert 'value="ETREAT" checked' in html and 'class="choice emergency"' in html
    assert 'name="csrf_token" value="tok"' in html and 'name="patient" value="k1"' in html
    assert "a.b.c" not in html and "d.e.f" not in html  # the signed pair never reaches a page


def test_a_session_gives_the_hp_identity_of_b_s_assertions(tmp_path: Path) -> None:
    from ncp.consumer.assertions import AssertionSigner
    from ncp.portal.identity import NotAuthenticated, hp_identity
    from ncp.portal.login import LOCAL_ACR
    from ncp.portal.sessions import SessionStore

    clock = Clock()
    node = portal_node(tmp_path, clock=clock)
    try:
        add_hp(node, language="nl-BE")
        with node.sessions() as session:
            account = session.scalars(select(HpAccount)).one()
        store = SessionStore(node.sessions, node.settings.portal, clock)
        _token, pending = store.open("totp", language="en", source="t", data={})
        with pytest.raises(NotAuthenticated):
            hp_identity(pending)
        _token, active = store.open(
            "active", language="nl-BE", source="t", account_id=account.id, acr=LOCAL_ACR
        )
        identity = hp_identity(active)
        assert identity.subject == "dr.peeters" and identity.authentication == LOCAL_ACR
        assert identity.role.code == "221" and identity.language == "nl-BE"
        signer = AssertionSigner(node.keystore, lifetime=timedelta(minutes=30), clock=clock)
        compact = signer.hp_assertion(identity, "https://ncp.at.test/fhir")
        payload = json.loads(base64.urlsafe_b64decode(compact.split(".")[1] + "=="))
        assert payload["acr"] == LOCAL_ACR and payload["sub"] == "dr.peeters"
        assert payload["extensions"]["ihe_iua"]["subject_organization_id"] == "urn:oid:1.2.3.4.5"
    finally:
        node.close()


@pytest.mark.parametrize(
    ("portal", "message"),
    [
        ({"enabled": True}, "needs portal.url"),
        ({"url": "http://portal.example.be"}, "https"),
        ({"default_language": "es"}, "en, de, fr"),
        ({"enabled": True, "url": "https://p.example", "local_accounts": False}, "oidc"),
        ({"idle_timeout_s": 10}, "greater than or equal"),
        ({"oidc": {"issuer": "https://idp", "client_id": "c", "scopes": ["profile"]}}, "openid"),
    ],
)
def test_unsafe_portal_settings_are_refused(portal: dict[str, Any], message: str) -> None:
    from ncp.config import settings_from_mapping
    from ncp.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(
            {"node": {"country": "BE"}, "archive": {"kind": "folder", "path": "a"},
             "portal": portal},
            base_dir=Path("."),
        )  # fmt: skip


def test_ncp_serve_assembles_the_portal_over_https(tmp_path: Path) -> None:
    from ncp.serve import portal_server

    node = portal_node(tmp_path, port=8999)
    try:
        server = portal_server(node, host="127.0.0.1")
        assert server.config.port == 8999 and server.config.proxy_headers is False
        # HTTPS by the node's own TLS step (ncp.security.mtls.tls_server_protocol: the
        # handshake within [http] limits), the connections held to [http] like every listener.
        protocol: Any = server.config.http
        assert isinstance(protocol.ssl_context, ssl.SSLContext)
        assert protocol.ssl_context.verify_mode == ssl.CERT_NONE  # a browser has no certificate
        assert protocol.inner_class.limits == node.settings.http
    finally:
        node.close()


def test_thumbnails_forget_ended_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the thumbnail broker holds per portal session goes at logout, and for a session
    that just stopped once it has been idle for the portal's idle timeout: a long-running
    portal does not grow with every session it has seen."""
    from datetime import UTC, datetime

    from ncp.consumer.model import PeerUnreachable
    from ncp.portal.patients import Confirmed
    from ncp.portal.thumbnails import FAILURE_TTL_S, Thumbnails
    from ncp.security.claims import PatientRef

    now = [1000.0]
    broker = Thumbnails(
        Any,  # type: ignore[arg-type]  # never asked: the fetch below is replaced
        lambda peer: ssl.create_default_context(),
        session_lifetime_s=300,
        idle_s=900,
        monotonic=lambda: now[0],
    )

    def unreachable(*_: Any) -> None:
        raise PeerUnreachable("A is down", peer="AT")

    monkeypatch.setattr(broker, "_fetch", unreachable)
    moment = datetime.now(UTC)
    confirmed = Confirmed("p1", "AT", PatientRef("urn:oid:1.2.3", "42"), "X", "TREAT", True,
                          "hp", "trc", moment, moment)  # fmt: skip
    broker.offer("session-1", "p1", ["1.2.3.1", "1.2.3.2"])
    assert broker.get("session-1", confirmed, "1.2.3.1") is None  # A unreachable: remembered
    assert broker.held() == (1, 0, 1)
    now[0] += 60  # the failure is remembered for its time to live
    broker.offer("session-2", "p1", ["1.2.3.1"])
    assert broker.held() == (2, 0, 1)
    now[0] += 900  # session-1 unused for 960 s > 900: ended (and its failure is long stale)
    assert FAILURE_TTL_S < 900
    broker.offer("session-2", "p1", ["1.2.3.1"])  # session-2 unused for exactly 900 s: kept
    assert broker.held() == (1, 0, 0)
    broker.forget("session-2")  # logout
    assert broker.held() == (0, 0, 0)


def test_the_audit_view_shows_a_query_decoded() -> None:
    from ncp.portal.auditview import _readable_query

    sent = (
        "patient.identifier=urn%3Aoid%3A1.2.40.0.10.1.4.3.1%7CPAT102&_count=1000"
        "&family=%C3%98rsted"
    )
    assert _readable_query(sent) == (
        "patient.identifier=urn:oid:1.2.40.0.10.1.4.3.1|PAT102, _count=1000, family=Ørsted"
    )
    assert _readable_query("no parameters") == "no parameters"
