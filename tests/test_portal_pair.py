"""The portal end to end, in headless Chromium, against a running A/B pair
(``tests/support/pair.py``): A over TLS with mutual TLS between the nodes (standard channel,
option A gateway, option C edge gateway, option B viewer), B's portal over HTTPS, B's worker as
a process.

An HP logs in with the second factor, identifies a patient with 300 studies at A, confirms the
treatment relationship, filters and sorts the list, opens a report with two versions (and back
to its study), pulls a study with option A and one with option C and opens them in B's local
viewer, and opens a study in A's viewer (option B) in a new tab; the no-match, ambiguous,
refused (A's OperationOutcome text) and expired paths are shown with their reason. HTML in A's
data (a Study Description, a report's findings) is shown as text. axe-core runs on every page;
screenshots at 1366x768 in English, German and French go to ``test-artifacts/portal/``.

The security tests of this file send every form of the portal with and without its CSRF token,
ask for another HP's job (page, API, viewer), and call the jobs API without its CSRF header.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import select

from ncp.audit.models import AuditRecord
from tests.support.browser import LAPTOP, axe, chromium, login, new_page, shot, wait
from tests.support.pair import INJECTED, Pair, running_pair
from tests.support.portal import PASSWORD

pytestmark = pytest.mark.chromium

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with running_pair(tmp_path_factory.mktemp("pair")) as running:
        for username, name, language in (
            ("dr.peeters", "Dr. An Peeters", "en-BE"),
            ("dr.huber", "Dr. Lena Huber", "de-AT"),
            ("dr.dubois", "Dr. Claire Dubois", "fr-BE"),
            ("dr.janssens", "Dr. Jan Janssens", "en-BE"),
            ("dr.other", "Dr. Other Person", "en-BE"),
        ):
            running.add_hp(username, name=name, language=language)
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as made:
        yield made


_used: dict[str, int] = {}


def _code(pair: Pair, username: str) -> str:
    """A TOTP code of a step not used yet for this account (a code is accepted once, and the
    portal takes the current step's or the next one's): logins of one account in the same 30
    seconds take the next step's code, or wait for a new step."""
    secret = pair.secrets[username]
    target = max(int(time.time() // 30), _used.get(username, -1) + 1)
    while target > int(time.time() // 30) + 1:
        time.sleep(0.5)
    _used[username] = target
    return pyotp.TOTP(secret).at(target * 30)


def _browser_login(browser: Any, pair: Pair, username: str, locale: str = "en-GB") -> Any:
    page = new_page(browser, LAPTOP, locale)
    login(page, pair.url, username, _code(pair, username))
    return page


def _identify(page: Any, pair: Pair, **fields: str) -> None:
    page.goto(f"{pair.url}/")
    page.select_option("#country", "AT")
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.locator("form[action='/identify'] button[type=submit]").click()
    page.wait_for_load_state()


def _confirm(page: Any, *, emergency: bool = False, informed: bool = True) -> None:
    if emergency:
        page.locator("input[name=purpose][value=ETREAT]").check()
    page.locator("input[name=relationship]").check()
    if informed:
        page.locator("input[name=informed]").check()
    page.locator("form[action='/confirm'] button[type=submit]").click()
    page.wait_for_url(re.compile(r".*/patients/[^/]+/list$"))
    wait(page, "window.ncpList && window.ncpList.ready", 60)


def _open_list(browser: Any, pair: Pair, username: str, locale: str = "en-GB") -> Any:
    page = _browser_login(browser, pair, username, locale)
    p = pair.patient
    _identify(page, pair, identifier=p.patient_id, family=p.family,
              birth_date=p.birth_date.isoformat())  # fmt: skip
    _confirm(page)
    return page


def _model(page: Any) -> dict[str, Any]:
    data: dict[str, Any] = page.evaluate(
        "() => JSON.parse(document.getElementById('list-model').textContent)"
    )
    return data


def _filter_to(page: Any, text: str, count: int | None = None) -> None:
    page.fill("#f-text", text)
    wait(page, f"window.ncpList.visible() === {count}" if count is not None else
         "window.ncpList.visible() < window.ncpList.rows")  # fmt: skip


# --- the use case --------------------------------------------------------------------------------


def test_login_identify_confirm_filter_and_sort_300_studies(browser: Any, pair: Pair) -> None:
    page = new_page(browser, LAPTOP)
    page.goto(f"{pair.url}/login")
    axe(page, "login")
    page = _browser_login(browser, pair, "dr.peeters")
    assert "Dr. An Peeters" in page.locator("header").inner_text()
    axe(page, "home")
    shot(page, "pair-home-en-1366")
    p = pair.patient
    _identify(page, pair, identifier=p.patient_id, family=p.family,
              birth_date=p.birth_date.isoformat())  # fmt: skip
    assert page.locator("h1").inner_text() == "Patient identified"
    assert p.family in page.inner_text("main") and "certain" in page.inner_text("main")
    axe(page, "identified (certain)")
    shot(page, "pair-identified-certain-en-1366")
    page.locator("input[name=purpose][value=ETREAT]").check()  # emergency: visibly different
    shot(page, "pair-confirm-emergency-en-1366")
    page.locator("input[name=purpose][value=TREAT]").check()
    _confirm(page)

    model = _model(page)
    rows = model["rows"]
    assert len(rows) == 300 and page.evaluate("window.ncpList.rows") == 300
    assert page.locator("#list-count").inner_text() == "300 of 300 shown"
    # Virtualised: a screenful of rows in the document, the whole table's size told.
    assert 5 < page.evaluate("window.ncpList.rendered()") < 60
    assert page.locator("#list-table").get_attribute("aria-rowcount") == "301"
    assert "Treatment: confirmed until" in page.inner_text(".confirmation")
    # Every row names where it comes from; what A offers its viewer for has a thumbnail.
    assert all(r["country"] == "AT" and r["organisation"] for r in rows)
    assert all(r["viewer"] for r in rows)
    wait(page, "[...document.querySelectorAll('img.thumb')].some(i => i.naturalWidth > 0)", 30)
    axe(page, "list")
    shot(page, "pair-list-en-1366")

    # Filters: modality and a word of the description, combined.
    page.select_option("#f-modality", "CT")
    ct = [r for r in rows if "CT" in r["modalities"]]
    wait(page, f"window.ncpList.visible() === {len(ct)}")
    word = ct[0]["description"].split()[-1]
    expected = [r for r in ct if word.lower() in _text(r)]
    _filter_to(page, word, len(expected))
    assert set(page.evaluate("window.ncpList.order()")) == {r["id"] for r in expected}
    page.click("#f-reset")
    wait(page, "window.ncpList.visible() === 300")

    # Sort by size, ascending: the order is the sizes' order; aria-sort follows.
    page.locator("button.sort[data-sort=size]").click()
    assert page.locator("th[data-col=size]").get_attribute("aria-sort") == "ascending"
    sizes = {r["id"]: r["size_bytes"] for r in rows}
    order = page.evaluate("window.ncpList.order()")
    assert [sizes[i] for i in order] == sorted(sizes.values())
    first = page.locator("#list-table tbody tr.row").first.get_attribute("id")
    assert first == f"study-{order[0]}"

    # Keyboard: arrow keys move from row to row, the table scrolls, rows keep their index.
    page.locator("#list-table tbody tr.row input[type=checkbox]").first.focus()
    for _ in range(30):
        page.keyboard.press("ArrowDown")
    index = page.evaluate("document.activeElement.closest('tr').getAttribute('aria-rowindex')")
    assert index == "32"
    assert page.evaluate("document.getElementById('list-wrap').scrollTop") > 0

    # The report of an urgent order is flagged on its study's row (A tags its list entry).
    assert urgent_ids(rows) == {pair.urgent_study}

    # The report column sorts urgent, then preliminary, first; each is flagged on its row.
    preliminary = {r["id"] for r in rows if r["report"] and r["report"]["preliminary"]}
    urgent = {r["id"] for r in rows if r["report"] and r["report"]["urgent"]}
    assert preliminary
    page.locator("button.sort[data-sort=report]").click()
    order = page.evaluate("window.ncpList.order()")
    assert set(order[: len(urgent)]) == urgent
    assert preliminary - urgent <= set(order[: len(urgent | preliminary)])
    first = page.locator("#list-table tbody tr.row").first
    assert first.get_attribute("id") == f"study-{pair.urgent_study}"
    assert "urgent" in (first.get_attribute("class") or "")
    assert first.locator(".flag.urgent").inner_text().lower() == "urgent"
    assert page.locator("#list-table tbody tr.row").nth(1).locator(".flag.preliminary").count()
    shot(page, "pair-list-sorted-by-report-en-1366")


def urgent_ids(rows: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in rows if r["report"] and r["report"]["urgent"]}


def _text(row: dict[str, Any]) -> str:
    report = row["report"]
    described = f"{report['title']} {report['status_display']} {report['author']}" if report else ""
    parts = [
        row["description"],
        row["modality_display"],
        " ".join(row["modalities"]),
        row["body_site_display"],
        row["organisation"],
        row["accession"] or "",
        (row["study_type"] or {}).get("display") or "not recorded",
        (row["requesting_specialty"] or {}).get("display") or "not recorded",
        described,
    ]
    return " ".join(parts).lower()


def test_a_report_with_two_versions_and_the_way_back_to_its_study(
    browser: Any, pair: Pair
) -> None:
    page = _open_list(browser, pair, "dr.peeters")
    row = next(r for r in _model(page)["rows"] if r["id"] == pair.versioned_study)
    assert row["report"]["status"] == "final" and row["report"]["id"] == pair.versioned_report
    _filter_to(page, row["accession"], 1)
    page.locator("#list-table tbody tr.row a.report-link").first.click()
    page.wait_for_url(re.compile(rf".*/reports/{pair.versioned_report}$"))
    assert page.locator(".banner.preliminary").count() == 0
    history = page.locator("section.history tbody tr")
    assert history.count() == 2
    newest, older = history.nth(0).inner_text(), history.nth(1).inner_text()
    assert newest.startswith("2") and "Final" in newest
    assert older.startswith("1") and "Preliminary" in older
    sections = page.locator(".report-section h2").all_inner_texts()
    assert "Findings" in sections and "Impression" in sections
    facts = page.inner_text(".report-facts")
    assert "(AT)" in facts and "version 2" in facts
    axe(page, "report")
    shot(page, "pair-report-en-1366")
    # The older version, flagged preliminary; then back to the latest.
    history.nth(1).locator("a").click()
    page.wait_for_url(re.compile(r".*\?version=1$"))
    assert "Preliminary report" in page.inner_text(".banner.preliminary")
    assert "version 1, not the latest" in page.inner_text(".banner.old")
    axe(page, "report v1")
    shot(page, "pair-report-v1-preliminary-en-1366")
    # A report of an urgent order says so, prominently.
    page.goto(f"{page.url.split('/reports/')[0]}/reports/{pair.urgent_report}")
    assert "Urgent." in page.inner_text(".banner.urgent")
    shot(page, "pair-report-urgent-en-1366")
    page.go_back()
    # One click to the study: the list, scrolled to it and marked.
    page.locator("a.to-study").first.click()
    page.wait_for_url(re.compile(rf".*/list#study-{re.escape(pair.versioned_study)}$"))
    wait(page, "window.ncpList && window.ncpList.ready", 60)
    target = page.locator("tr.target")
    wait(page, "document.querySelector('tr.target') !== null")
    assert target.get_attribute("id") == f"study-{pair.versioned_study}"
    assert target.is_visible()


def test_html_from_country_a_is_shown_as_text(browser: Any, pair: Pair) -> None:
    page = _open_list(browser, pair, "dr.peeters")
    _filter_to(page, "pwned", 1)
    cell = page.locator("#list-table tbody tr.row td.c-description").first
    assert INJECTED[:64] in cell.inner_text()
    assert cell.locator("script").count() == 0 and cell.locator("img:not(.thumb)").count() == 0
    page.goto(f"{page.url.split('/list')[0]}/reports/{pair.injected_report}")
    body = page.inner_text(".report-body")
    assert INJECTED in body
    assert page.locator(".report-body script, .report-body img").count() == 0
    assert page.evaluate("window.__pwned") is None
    shot(page, "pair-report-injection-as-text-en-1366")


def _job_page_done(page: Any, timeout: float = 120) -> str:
    """Until the job's page shows it ended (its script polls, then loads the page again)."""
    deadline = time.monotonic() + timeout
    while True:
        status = page.locator("#job-status").get_attribute("class") or ""
        if any(s in status for s in ("job-stored", "job-failed", "job-declined")):
            return status
        assert time.monotonic() < deadline, f"job did not end: {status}"
        time.sleep(0.3)


def _pull(page: Any, pair: Pair, study: str, option: str) -> str:
    row = next(r for r in _model(page)["rows"] if r["id"] == study)
    _filter_to(page, row["accession"], 1)
    page.locator("#list-table tbody tr.row input[type=checkbox]").first.check()
    page.locator(f"input[name=option][value={option}]").check()
    page.locator("#retrieve").click()
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}$"))
    status = _job_page_done(page)
    assert "job-stored" in status, page.inner_text("main")
    return str(page.url.rsplit("/", 1)[1])


def test_pull_with_options_a_and_c_and_view_in_the_local_viewer(
    browser: Any, pair: Pair
) -> None:
    page = _open_list(browser, pair, "dr.huber", "de-AT")
    assert page.locator("h1").inner_text() == "Untersuchungen und Befunde"
    axe(page, "list (de)")
    shot(page, "pair-list-de-1366")
    study_a, study_c = pair.small_studies(2, exclude=(pair.injected_study,))
    list_url = page.url
    job_a = _pull(page, pair, study_a, "A")
    main = page.inner_text("main")
    assert "Gespeichert" in main
    assert "Gegen das Manifest des anderen Landes geprüft: 1 von 1" in main
    history = page.locator("#job-history li").all_inner_texts()
    assert history[0].startswith("In Warteschlange")
    assert any(h.startswith("Gespeichert") for h in history)
    assert page.locator("a.button.small", has_text="Im Betrachter öffnen").count() == 1
    axe(page, "job (de)")
    shot(page, "pair-job-stored-de-1366")

    # The stored study in B's local viewer, in a new tab.
    with page.context.expect_page() as opened:
        page.locator("a.button.small", has_text="Im Betrachter öffnen").click()
    viewer = opened.value
    viewer.wait_for_load_state()
    assert viewer.url.startswith(f"{pair.url}/viewer/?study={study_a}")
    wait(viewer, "document.getElementById('image').naturalWidth > 0", 60)
    shot(viewer, "pair-local-viewer-de-1366")
    viewer.close()

    # Option C: the study comes from A's edge gateway (its audit names it), not from A's node.
    page.goto(list_url)
    wait(page, "window.ncpList && window.ncpList.ready", 60)
    job_c = _pull(page, pair, study_c, "C")
    assert job_c != job_a
    assert "C:" in page.inner_text("main")
    with pair.a.edge_audit() as session:
        edge = list(session.scalars(select(AuditRecord)))
    assert any(study_c in (r.studies or []) for r in edge)
    page.goto(f"{pair.url}/jobs")
    assert page.locator("table.jobs tbody tr").count() == 2
    axe(page, "jobs (de)")
    shot(page, "pair-jobs-de-1366")
    # The local viewer grants exactly the HP's stored studies.
    listing = (
        "async () => (await (await fetch('/viewer/studies')).json())"
        ".map(s => s['0020000D'].Value[0]).sort().join(' ')"
    )
    deadline = time.monotonic() + 15  # the store's catalogue is scanned again within a second
    while page.evaluate(listing) != " ".join(sorted([study_a, study_c])):
        assert time.monotonic() < deadline, page.evaluate(listing)
        time.sleep(0.3)


def test_option_b_opens_a_s_viewer_in_a_new_tab(browser: Any, pair: Pair) -> None:
    page = _open_list(browser, pair, "dr.dubois", "fr-BE")
    assert page.locator("h1").inner_text() == "Examens et comptes rendus"
    axe(page, "list (fr)")
    shot(page, "pair-list-fr-1366")
    launches: list[str] = []
    for _ in range(2):
        with page.context.expect_page() as opened:
            page.locator("button.view-b").first.click()
        tab = opened.value
        tab.on("request", lambda r: launches.append(r.url) if "/launch?code=" in r.url else None)
        tab.wait_for_url(re.compile(r".*/viewer/\?study=.*"), timeout=60_000)
        assert tab.url.startswith(pair.a.viewer_url or "")
        wait(tab, "document.getElementById('image').naturalWidth > 0", 60)
        shot(tab, "pair-option-b-viewer-fr-1366")
        tab.close()
    # A fresh one-time launch per click (the first may have left before the listener came).
    assert len(set(launches)) == len(launches) >= 1


# --- the paths that end with a reason -------------------------------------------------------------


def test_no_match_ambiguous_and_refused_are_shown_with_the_reason(
    browser: Any, pair: Pair
) -> None:
    page = _browser_login(browser, pair, "dr.janssens")
    _identify(page, pair, identifier="NO-SUCH-PATIENT")
    assert page.locator("h1").inner_text() == "No patient found"
    assert "AT found no patient" in page.inner_text("main")
    axe(page, "no match")
    shot(page, "pair-no-match-en-1366")

    _identify(page, pair, identifier="", family="Huber", birth_date="1975-03-02")
    assert page.locator("h1").inner_text() == "Several patients found: choose one"
    assert page.locator("table.candidates tbody tr").count() == 2
    axe(page, "ambiguous")
    shot(page, "pair-ambiguous-en-1366")
    page.locator("#candidate-1").check()
    _confirm(page)
    assert page.evaluate("window.ncpList.rows") == 1

    # B's clock ten minutes fast: A refuses B's assertion, and says why.
    pair.clock.advance(minutes=10)
    try:
        _identify(page, pair, identifier="PAT100", family="Gruber", birth_date="1980-05-17")
    finally:
        pair.clock.reset()
    assert page.locator("h1").inner_text() == "AT refused the request"
    reason = page.locator("#refused-text").inner_text()
    assert "future" in reason or "clock" in reason, reason
    axe(page, "refused")
    shot(page, "pair-refused-en-1366")


def test_an_expired_confirmation_and_session_are_shown_with_the_reason(
    browser: Any, pair: Pair
) -> None:
    page = _browser_login(browser, pair, "dr.huber", "de-DE")  # an HP whose language is German
    _identify(page, pair, identifier="PAT100", family="Gruber", birth_date="1980-05-17")
    page.locator("input[name=purpose][value=ETREAT]").check()
    _confirm(page, emergency=True, informed=False)
    assert "Notfall" in page.inner_text(".confirmation.emergency")
    list_url = page.url
    pair.clock.advance(seconds=1801)  # the pair (30 minutes) has ended, the session has not
    try:
        page.goto(list_url)
        assert page.locator("h1").inner_text() == "Behandlungsbeziehung bestätigen"
        assert "Bestätigung der Behandlungsbeziehung endete" in page.inner_text("#expired-reason")
        # Asked again as it was: an emergency.
        assert page.locator("input[name=purpose][value=ETREAT]").is_checked()
        axe(page, "confirmation expired (de)")
        shot(page, "pair-confirmation-expired-de-1366")
    finally:
        pair.clock.reset()
    page.locator("input[name=relationship]").check()
    page.locator("form[action='/confirm'] button[type=submit]").click()
    page.wait_for_url(list_url)
    wait(page, "window.ncpList && window.ncpList.ready", 60)
    assert page.evaluate("window.ncpList.rows") == 2

    # Leave the list first: its thumbnails are asked for in the background, and the first
    # request after the clock moves is the one that ends the session (and is told why).
    page.goto("about:blank")
    pair.clock.advance(seconds=3601)  # an hour without activity: the session ends
    try:
        page.goto(f"{pair.url}/jobs")
        assert page.url == f"{pair.url}/login?reason=idle"
        assert "60 Minuten" in page.inner_text("main")
        shot(page, "pair-session-idle-de-1366")
    finally:
        pair.clock.reset()


def test_the_audit_view_shows_the_hp_s_own_requests_only(browser: Any, pair: Pair) -> None:
    page = _browser_login(browser, pair, "dr.janssens")
    _identify(page, pair, identifier="NOBODY-4711")
    page.goto(f"{pair.url}/audit")
    first = page.locator("table.audit tbody tr").first.inner_text()
    assert "Patient identification" in first and "NOBODY-4711" in first and "to AT" in first
    assert "Not found" in first  # A found no match: the outcome, in the HP's words
    # The query as a person reads it, not percent-encoded.
    assert "identifier=urn:oid:" in first and "%3A" not in page.inner_text("main")
    assert "Login" in page.inner_text("main")
    axe(page, "audit")
    shot(page, "pair-audit-en-1366")
    other = _browser_login(browser, pair, "dr.other")
    other.goto(f"{pair.url}/audit")
    assert "NOBODY-4711" not in other.inner_text("main")
    assert "Login" in other.inner_text("main")


# --- security ------------------------------------------------------------------------------------


class Hp:
    """An HTTP client of the portal logged in as one HP (no browser)."""

    def __init__(self, pair: Pair, username: str) -> None:
        self.pair = pair
        self.http = httpx.Client(base_url=pair.url, verify=False, timeout=60)
        page = self.http.get("/login")
        self.http.post("/login", data={"username": username, "password": PASSWORD,
                                       "csrf_token": _csrf(page.text)})  # fmt: skip
        page = self.http.get("/login/totp")
        r = self.http.post(
            "/login/totp",
            data={"code": _code(pair, username), "csrf_token": _csrf(page.text)},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        self.token = _csrf(self.http.get("/").text)

    def confirm_patient(self) -> str:
        p = self.pair.patient
        r = self.http.post("/identify", data={
            "csrf_token": self.token, "country": "AT", "identifier": p.patient_id,
            "family": p.family, "birth_date": p.birth_date.isoformat()})  # fmt: skip
        match = re.search(r'name="match" value="([^"]+)"', r.text)
        assert match is not None, r.text
        r = self.http.post("/confirm", data={
            "csrf_token": self.token, "match": match.group(1), "candidate": "0",
            "purpose": "TREAT", "relationship": "yes", "informed": "yes"},
            follow_redirects=False)  # fmt: skip
        assert r.status_code == 303
        return str(r.headers["location"].split("/")[2])


def _csrf(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None
    return found.group(1)


@pytest.fixture(scope="module")
def two_hps(pair: Pair) -> tuple[Hp, Hp, str, str]:
    """Two HPs; the first has confirmed the generated patient and asked for a job."""
    first, second = Hp(pair, "dr.peeters"), Hp(pair, "dr.other")
    key = first.confirm_patient()
    study = pair.small_studies(3, exclude=(pair.injected_study,))[2]
    asked = {"csrf_token": first.token, "patient": key, "study": study, "option": "A"}
    r = first.http.post("/retrieve", data=asked, follow_redirects=False)
    assert r.status_code == 303
    return first, second, key, str(r.headers["location"].rsplit("/", 1)[1])


def test_csrf_is_refused_on_every_form_with_real_data(
    pair: Pair, two_hps: tuple[Hp, Hp, str, str]
) -> None:
    first, second, key, job = two_hps
    p = pair.patient
    forms = [
        ("/identify", {"country": "AT", "identifier": p.patient_id}),
        ("/confirm", {"patient": key, "purpose": "TREAT", "relationship": "yes",
                      "informed": "yes"}),
        ("/retrieve", {"patient": key, "study": pair.small_studies(1)[0], "option": "A"}),
        ("/view", {"patient": key, "study": pair.small_studies(1)[0]}),
        (f"/jobs/{job}/cancel", {}),
        (f"/jobs/{job}/confirm", {}),
        ("/logout", {}),
    ]
    for path, data in forms:
        for given in (None, "", "forged", second.token):
            form = dict(data) if given is None else {**data, "csrf_token": given}
            r = first.http.post(path, data=form, follow_redirects=False)
            assert r.status_code == 403, (path, given, r.status_code)
            assert "not allowed" in r.text
    # The jobs API: a change without the session's token in X-CSRF-Token is refused too.
    r = first.http.post(f"/api/retrieval/jobs/{job}/cancel")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = first.http.post(f"/api/retrieval/jobs/{job}/cancel", headers={"X-CSRF-Token": second.token})
    assert r.status_code == 403
    # With their own token, each form does what it is for.
    r = first.http.post("/confirm", data={**forms[1][1], "csrf_token": first.token},
                        follow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == f"/patients/{key}/list"
    r = first.http.post("/view", data={**forms[3][1], "csrf_token": first.token})
    assert r.status_code == 200 and "/launch?code=" in r.text


def test_another_hp_s_job_is_not_found(pair: Pair, two_hps: tuple[Hp, Hp, str, str]) -> None:
    first, second, key, job = two_hps
    assert first.http.get(f"/jobs/{job}").status_code == 200
    r = second.http.get(f"/jobs/{job}")
    assert r.status_code == 404 and "This page does not exist" in r.text
    assert second.http.get(f"/api/retrieval/jobs/{job}").status_code == 404
    assert second.http.get(f"/api/retrieval/jobs/{job}/progress").status_code == 404
    r = second.http.post(f"/jobs/{job}/cancel", data={"csrf_token": second.token})
    assert r.status_code == 404
    r = second.http.post(f"/api/retrieval/jobs/{job}/cancel",
                         headers={"X-CSRF-Token": second.token})  # fmt: skip
    assert r.status_code == 404
    assert job not in second.http.get("/jobs").text
    # Nor another HP's patient: the key of a confirmation is the session's own.
    assert second.http.get(f"/patients/{key}/list").status_code == 404
    # Nor another HP's stored study in B's local viewer.
    done = _wait_job(first, job)
    assert done["status"] == "stored"
    study = first.http.get(f"/api/retrieval/jobs/{job}").json()["studies"][0]["study_uid"]
    assert first.http.get(f"/viewer/studies/{study}/series").status_code == 200
    r = second.http.get(f"/viewer/studies/{study}/series")
    assert r.status_code == 403
    # Without a session, the API and the viewer say so.
    anonymous = httpx.Client(base_url=pair.url, verify=False)
    assert anonymous.get(f"/api/retrieval/jobs/{job}").status_code == 401
    assert anonymous.get(f"/viewer/studies/{study}/series").status_code == 401


def _wait_job(hp: Hp, job: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, Any] = hp.http.get(f"/api/retrieval/jobs/{job}/progress").json()
        if found["status"] in ("stored", "failed", "declined", "cancelled"):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.3)
