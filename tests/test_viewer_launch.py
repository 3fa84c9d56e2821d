"""Option B at A: launch codes from A's real ``$imaging-access`` (over mutual TLS) exchanged
for viewer sessions on the viewer's own HTTPS listener, and the attacks on that exchange.

Each refusal is checked three ways: the status, a page a person can read (never a stack
trace), and the audit record (``viewer-launch`` refused, or ``refusal``) naming the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from ncp.audit.models import AuditRecord
from ncp.security.claims import VIEWER_LAUNCH
from ncp.security.tokens import issue
from ncp.serve import viewer_app
from ncp.store.models import UsedToken, ViewerSession
from ncp.viewer.sessions import COOKIE, session_id
from tests.support.node import PATIENTS, RunningNode, running_node, studies_of
from tests.support.token_factory import B_KEY, launch_claims
from tests.support.viewer import (
    CT_ACCESSION,
    CT_SERIES,
    CT_STUDY,
    launch_url,
    path_of,
    viewer_client,
    write_ct_series,
)

MR_STUDY = studies_of("PAT100")[1]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    root = tmp_path_factory.mktemp("viewer-node")
    with running_node(
        root, viewer=True, archive_extra=lambda folder: write_ct_series(folder, n=8, size=64)
    ) as running:
        yield running


@pytest.fixture
def browser(node: RunningNode) -> Iterator[httpx.Client]:
    with viewer_client(node) as client:
        yield client


def launched(node: RunningNode, client: httpx.Client, studies: list[str], **iid: str) -> str:
    """Launch and return the cookie's value (the client keeps it too)."""
    answer = client.get(path_of(launch_url(node, studies, **iid)))
    assert answer.status_code == 303, answer.text
    return str(client.cookies[COOKIE])


def viewer_launch_records(node: RunningNode, after: int) -> list[AuditRecord]:
    return [r for r in node.audit_records() if r.seq > after and r.action == "viewer-launch"]


def assert_readable_refusal(answer: httpx.Response, status: int, words: str) -> None:
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("text/html")
    assert "Traceback" not in answer.text and 'File "' not in answer.text
    assert words in answer.text
    assert "<script" not in answer.text
    assert COOKIE not in answer.headers.get("set-cookie", "")


def test_a_launch_opens_a_session_in_a_secure_cookie(
    node: RunningNode, browser: httpx.Client
) -> None:
    before = node.last_seq()
    url = launch_url(node, [CT_STUDY, MR_STUDY], locale="de-AT", studyUID=CT_STUDY)
    answer = browser.get(path_of(url))
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/viewer/?study={CT_STUDY}"
    cookie = answer.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"secure", "httponly", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=Strict" in cookie and "Path=/;" in cookie + ";"
    assert cookie.startswith(f"{COOKIE}=")
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))  # type: ignore[union-attr]
    assert 0 < max_age <= node.node.settings.viewer.session_lifetime_s
    secret = browser.cookies[COOKIE]
    with node.node.sessions() as session:
        row = session.get(ViewerSession, session_id(secret))
        assert row is not None and secret not in row.id  # only its hash is kept
        assert set(row.studies) == {CT_STUDY, MR_STUDY} and row.locale == "de-AT"
        assert row.patient_value == "PAT100" and row.subject
    context = browser.get("/viewer/context").json()
    assert context["language"] == "de" and context["labels"]["reset"] == "Zurücksetzen"
    [record] = viewer_launch_records(node, before)
    assert record.outcome == 0 and record.side == "viewer" and record.option == "B"
    assert record.token_jti and record.patient_id == "PAT100"
    assert record.details["first_study"] == CT_STUDY


def test_a_replayed_code_is_refused_with_a_page_and_audited(
    node: RunningNode, browser: httpx.Client
) -> None:
    url = launch_url(node, [CT_STUDY])
    assert browser.get(path_of(url)).status_code == 303
    before = node.last_seq()
    with viewer_client(node) as other:  # another browser with the same link
        again = other.get(path_of(url), headers={"Accept-Language": "fr-BE,fr;q=0.9"})
    assert_readable_refusal(again, 403, "has been used already")
    # Nobody is known yet: the page speaks the browser's language.
    assert 'lang="fr"' in again.text and "ne peuvent pas être ouvertes" in again.text
    [record] = viewer_launch_records(node, before)
    assert record.outcome == 8 and "used already" in (record.reason or "")
    assert record.token_jti  # the replayed token's id, its signature having verified


def test_an_expired_code_is_refused(node: RunningNode, browser: httpx.Client) -> None:
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    claims = launch_claims(
        past, issuer="AT", audience=node.viewer_url, patient=PATIENTS["PAT100"].ref,
        studies=(CT_STUDY,),
    )  # fmt: skip
    token = issue(VIEWER_LAUNCH, claims, node.node.keystore.current_signing_key(), now=past)
    before = node.last_seq()
    answer = browser.get("/viewer/launch", params={"code": token})
    assert_readable_refusal(answer, 403, "expired")
    [record] = viewer_launch_records(node, before)
    assert record.outcome == 8 and "expired" in (record.reason or "")


def test_a_code_for_another_viewer_is_refused(node: RunningNode, browser: httpx.Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    claims = launch_claims(
        now, issuer="AT", audience="https://viewer.elsewhere.test/viewer",
        patient=PATIENTS["PAT100"].ref, studies=(CT_STUDY,),
    )  # fmt: skip
    token = issue(VIEWER_LAUNCH, claims, node.node.keystore.current_signing_key(), now=now)
    before = node.last_seq()
    assert_readable_refusal(
        browser.get("/viewer/launch", params={"code": token}), 403, "another viewer"
    )
    [record] = viewer_launch_records(node, before)
    assert "WrongAudience" in (record.reason or "") or "another viewer" in (record.reason or "")


def test_a_forged_code_is_refused(node: RunningNode, browser: httpx.Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    claims = launch_claims(
        now, issuer="AT", audience=node.viewer_url, patient=PATIENTS["PAT100"].ref,
        studies=(CT_STUDY,),
    )  # fmt: skip
    forged = issue(VIEWER_LAUNCH, claims, B_KEY, now=now)  # not A's key
    genuine = launch_url(node, [CT_STUDY]).split("code=", 1)[1]
    head, body, signature = genuine.split(".")
    tampered = f"{head}.{body[:-4]}AAAA.{signature}"
    before = node.last_seq()
    for code in (forged, tampered, "not-a-token", "a.b.c"):
        answer = browser.get("/viewer/launch", params={"code": code})
        assert_readable_refusal(answer, 403, "not valid")
    records = viewer_launch_records(node, before)
    assert len(records) == 4 and all(r.outcome == 8 for r in records)
    assert all(r.token_jti is None for r in records)  # no id an attacker chose is quoted
    # The genuine code was not used up by the tampered copies.
    assert browser.get("/viewer/launch", params={"code": genuine}).status_code == 303


def test_iid_parameters_must_agree_with_the_code(node: RunningNode, browser: httpx.Client) -> None:
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"studyUID": MR_STUDY}, 403, "does not cover"),
        ({"patientID": "PAT101"}, 403, "another patient"),
        ({"patientID": "PAT100^^^&9.9.9&ISO"}, 403, "another patient"),
        ({"requestType": "SERIES"}, 400, "STUDY or PATIENT"),
        ({"accessionNumber": "NOPE"}, 404, "accession"),
        ({"color": "red"}, 400, "unknown parameter"),
    ]
    for iid, status, words in cases:
        url = launch_url(node, [CT_STUDY], **iid)
        assert_readable_refusal(browser.get(path_of(url)), status, words)
    good = launch_url(
        node, [MR_STUDY, CT_STUDY], requestType="STUDY", accessionNumber=CT_ACCESSION,
        patientID="PAT100^^^&1.2.40.0.10.1.4.3.1&ISO",
    )  # fmt: skip
    answer = browser.get(path_of(good))
    assert answer.status_code == 303 and answer.headers["location"].endswith(CT_STUDY)


def test_a_session_sees_only_its_studies_and_a_moved_cookie_is_refused(
    node: RunningNode,
) -> None:
    with viewer_client(node) as first, viewer_client(node) as second:
        launched(node, first, [CT_STUDY])
        launched(node, second, [MR_STUDY])
        assert first.get(f"/viewer/studies/{CT_STUDY}/thumbnail").status_code == 200
        assert second.get(f"/viewer/studies/{MR_STUDY}/thumbnail").status_code == 200
        studies = {s["0020000D"]["Value"][0] for s in first.get("/viewer/studies").json()}
        assert studies == {CT_STUDY}
        before = node.last_seq()
        # The first session's cookie, moved to the other study's resources.
        moved = {"Cookie": f"{COOKIE}={first.cookies[COOKIE]}"}
        with viewer_client(node) as thief:
            for url in (
                f"/viewer/studies/{MR_STUDY}/thumbnail",
                f"/viewer/studies/{MR_STUDY}/series",
                f"/viewer/studies/{MR_STUDY}/series/{MR_STUDY}.1/instances/{MR_STUDY}.1.1/rendered",
            ):
                answer = thief.get(url, headers=moved)
                assert answer.status_code == 403, url
        refusals = [r for r in node.audit_records() if r.seq > before]
        assert len(refusals) == 3 and all(r.action == "refusal" for r in refusals)
        assert all(r.studies == [MR_STUDY] and r.actor_id for r in refusals)
        assert all("does not cover" in (r.reason or "") for r in refusals)


def test_without_a_session_nothing_is_served(node: RunningNode, browser: httpx.Client) -> None:
    before = node.last_seq()
    for cookie in (None, "x" * 43, "short"):
        headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
        answer = browser.get(f"/viewer/studies/{CT_STUDY}/thumbnail", headers=headers)
        assert answer.status_code == 401
    assert len([r for r in node.audit_records() if r.seq > before]) == 3
    # The page shell itself holds nothing and loads; its data calls are refused.
    assert browser.get("/viewer/").status_code == 200


def test_path_tricks_at_a_are_refused_and_audited(node: RunningNode, browser: httpx.Client) -> None:
    launched(node, browser, [CT_STUDY])
    before = node.last_seq()
    for path in (
        f"/viewer/studies/{CT_STUDY}/series/%2e%2e%2f%2e%2e/rendered",
        f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/..%5c..%5cetc/rendered",
        f"/viewer/studies/{CT_STUDY}%00/thumbnail",
    ):
        answer = browser.get(path)
        assert answer.status_code == 400
    records = [r for r in node.audit_records() if r.seq > before]
    assert len(records) == 3 and all(r.action == "refusal" for r in records)


def test_a_session_ends_at_its_expiry_and_its_end_is_recorded_once(node: RunningNode) -> None:
    with viewer_client(node) as client:
        secret = launched(node, client, [CT_STUDY])
        assert client.get(f"/viewer/studies/{CT_STUDY}/thumbnail").status_code == 200
        ended = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
        with node.node.sessions.begin() as session:
            session.execute(
                update(ViewerSession)
                .where(ViewerSession.id == session_id(secret))
                .values(expires_at=ended)
            )
        import time

        time.sleep(5.2)  # past the process's memory of the session
        answer = client.get(f"/viewer/studies/{CT_STUDY}/thumbnail")
        assert answer.status_code == 401 and "ended" in answer.text
        page = client.get("/viewer/context")
        assert page.status_code == 401
    found = node.wait_for_audit(
        lambda r: (
            r.action == "viewer-session" and r.details.get("session") == session_id(secret)[:16]
        ),
        timeout=15,
    )
    assert len(found) == 1 and found[0].details["phase"] == "ended"
    viewed = [
        r
        for r in node.audit_records()
        if r.action == "image-view" and r.details.get("session") == session_id(secret)[:16]
    ]
    assert [r.details["phase"] for r in viewed] == ["opened", "viewed"]
    assert viewed[1].details["thumbnails"] == 1


def test_sessions_and_codes_are_shared_by_replicas(node: RunningNode) -> None:
    """A second viewer app on the same database (another replica) serves the first one's
    session and refuses a code the first one took."""
    replica = viewer_app(node.node)
    assert replica is not None
    url = launch_url(node, [CT_STUDY])
    with viewer_client(node) as client:
        client.get(path_of(url))
        secret = client.cookies[COOKIE]
    with TestClient(replica, base_url=node.viewer_url.rsplit("/viewer", 1)[0]) as other:
        cookie = {"Cookie": f"{COOKIE}={secret}"}
        assert other.get(f"/viewer/studies/{CT_STUDY}/series", headers=cookie).status_code == 200
        again = other.get(path_of(url), follow_redirects=False)
        assert again.status_code == 403 and "used already" in again.text
    with node.node.sessions() as session:
        jti = session.scalars(select(UsedToken.jti)).all()
    assert jti


def test_sessions_never_outlive_the_pair(node: RunningNode, tmp_path: Path) -> None:
    from ncp.security.access import AccessGrant
    from ncp.viewer.sessions import SessionStore

    store = SessionStore(node.node.sessions, lifetime=timedelta(minutes=30))
    now = datetime.now(UTC)
    grant: Any = AccessGrant(
        kind=VIEWER_LAUNCH, patient=PATIENTS["PAT100"].ref, studies=frozenset({CT_STUDY}),
        option="B", priority="routine", purpose_of_use="TREAT", subject="hp",
        requesting_country="BE",
        issuer="AT", jti="j-1", expires_at=now + timedelta(seconds=60),
        pair_expires_at=now + timedelta(minutes=4),
    )  # fmt: skip
    opened = store.open(grant, now=now)
    assert opened.grant.expires_at == (now + timedelta(minutes=4)).replace(microsecond=0) or (
        abs((opened.grant.expires_at - (now + timedelta(minutes=4))).total_seconds()) < 1  # type: ignore[operator]
    )
    unbounded = store.open(replace(grant, jti="j-2", pair_expires_at=None), now=now)
    assert abs((unbounded.grant.expires_at - (now + timedelta(minutes=30))).total_seconds()) < 1  # type: ignore[operator]
    later = now + timedelta(minutes=5)
    from ncp.viewer.access import ViewerRefused

    with pytest.raises(ViewerRefused) as refused:
        store.grant_of(opened.secret, now=later)
    assert refused.value.status == 401
    assert store.grant_of(unbounded.secret, now=later).subject == "hp"


def test_the_viewer_is_served_over_https_only(node: RunningNode) -> None:
    from ncp.errors import ConfigError
    from ncp.viewer.launch import build_option_b_app

    parts = node.node
    with pytest.raises(ConfigError, match="https"):
        build_option_b_app(
            archive=parts.settings.archive,
            public_base="http://viewer.at.test/viewer",
            issuer="AT",
            keys=parts.keystore.published_keys(),
            replay=parts.replay,
            sessions=parts.sessions,
            auditor=parts.auditor,
        )


def test_the_hp_ends_a_session_and_its_end_is_recorded_once(
    node: RunningNode, browser: httpx.Client
) -> None:
    """``POST /logout`` from the viewer's own page ends the session at once (this replica
    refuses it from then on, the others within their 5 s memory), writes the viewing record,
    then one ``viewer-session`` end (why: logout), and clears the cookie. Another site's
    request cannot end it; a second logout records nothing more; the sweep never again."""
    secret = launched(node, browser, [CT_STUDY])
    assert browser.get(f"/viewer/studies/{CT_STUDY}/thumbnail").status_code == 200
    origin = (node.viewer_url or "").rsplit("/viewer", 1)[0]
    cookie = {"Cookie": f"{COOKIE}={secret}"}
    before = node.last_seq()
    for forged in ({"Origin": "https://evil.test"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = browser.post("/viewer/logout", headers=forged)
        assert refused.status_code == 403 and "viewer's own page" in refused.text
    assert browser.get(f"/viewer/studies/{CT_STUDY}/thumbnail").status_code == 200
    ended = browser.post(
        "/viewer/logout", headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"}
    )
    assert ended.status_code == 204 and ended.content == b""
    assert "Max-Age=0" in ended.headers["set-cookie"] and COOKIE not in browser.cookies
    with viewer_client(node) as other:
        after = other.get(f"/viewer/studies/{CT_STUDY}/thumbnail", headers=cookie)
        assert after.status_code == 401 and "ended" in after.text
        again = other.post("/viewer/logout", headers={**cookie, "Origin": origin})
        assert again.status_code == 401
    new = [r for r in node.audit_records() if r.seq > before]
    refusals = [r for r in new if r.action == "refusal"]
    assert len(refusals) == 4  # two forged logouts, the image and the logout after the end
    session = session_id(secret)[:16]
    mine = [r for r in new if r.action != "refusal" and r.details.get("session") == session]
    assert [(r.action, r.details["phase"]) for r in mine] == [
        ("image-view", "viewed"),
        ("viewer-session", "ended"),
    ]
    assert mine[0].details["thumbnails"] == 2
    assert mine[1].details["why"] == "logout" and mine[1].outcome == 0
    with node.node.sessions() as db:
        row = db.get(ViewerSession, session_id(secret))
        # Closed: the sweep, which ends only rows not closed yet, never records it again.
        assert row is not None and row.closed_at is not None
