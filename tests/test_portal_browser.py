"""The portal in headless Chromium (Debian's chromium, driven by Playwright; no browser
download): login with password and TOTP, failures up to lock-out, idle timeout and logout as a
browser sees them; the list page of a generated patient with 300 studies (the entries country
A's standard channel serves for it) filtered, sorted, grouped, on tabs and the timeline;
HTML from A rendered as text; axe-core on every page (no serious or critical violation);
screenshots in ``test-artifacts/portal/`` at laptop sizes, in English, German and French."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest

from ncp.node import Node
from ncp.portal.i18n import Translator
from ncp.portal.listview import ListContext, build_list
from ncp.portal.sessions import PortalSessionView
from tests.support.browser import LAPTOP, WIDE, chromium, new_page, wait
from tests.support.browser import axe as _axe
from tests.support.browser import shot as _shot
from tests.support.portal import PASSWORD, Clock, add_hp, portal_node, serve_portal, totp_now
from tests.support.portal_data import GeneratedList, as_read, generated_list

pytestmark = pytest.mark.chromium

INJECTION = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">CT'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as made:
        yield made


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GeneratedList:
    return generated_list(tmp_path_factory.mktemp("portal-list"), studies=300)


def a_list(generated: GeneratedList) -> list[dict[str, Any]]:
    """A's entries with an attack in one study's description and two urgent reports (A's
    generator makes neither; the page must show both correctly)."""
    docs = copy.deepcopy(generated.document_references)
    manifests = [d for d in docs if "docStatus" not in d]
    manifests[0]["content"][0]["attachment"]["title"] = INJECTION
    reports = [d for d in docs if "docStatus" in d]
    for report in reports[:2]:
        report["meta"]["tag"] = [
            {"system": "http://hl7.org/fhir/request-priority", "code": "urgent"}
        ]
    return docs


class Source:
    """The list of a generated patient as A serves it, read as B's peer client reads it; the
    pages of the list without a peer (tests/test_portal_pair.py has the list from a real A)."""

    def __init__(self, generated: GeneratedList) -> None:
        self.listed, self.manifests = as_read(
            generated.patient, a_list(generated), generated.imaging_studies
        )
        # The three newest studies show a thumbnail (the pair's tests take them from A).
        newest = sorted(self.listed.studies, key=lambda s: s.date or 0, reverse=True)
        self.thumbs = {s.study_uid for s in newest[:3]}

    def __call__(self, session: PortalSessionView | None, key: str,
                 t: Translator) -> dict[str, Any] | None:  # fmt: skip
        if key != "p1":
            return None
        ctx = ListContext(
            peer="AT",
            throughput=40e6,
            report_url=lambda rid: f"/patients/p1/reports/{rid}",
            thumbnail_url=lambda uid: "/static/favicon.svg" if uid in self.thumbs else None,
        )
        return build_list(
            self.listed,
            self.manifests,
            t,
            ctx,
            patient={"display": "Ágnes Großmann", "identifier": "2167251062"},
        )


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, generated: GeneratedList, clock: Clock
) -> Iterator[tuple[str, Node, dict[str, str]]]:
    node = portal_node(tmp_path_factory.mktemp("portal-b"), clock=clock, max_failures_account=3)
    secrets = {
        "en": add_hp(node, "dr.peeters", language="en-BE"),
        "de": add_hp(node, "dr.huber", name="Dr. Lena Huber", language="de-AT"),
        "fr": add_hp(node, "dr.dubois", name="Dr. Claire Dubois", language="fr-BE"),
        "lock": add_hp(node, "dr.locked", name="Dr. Lock Out"),
    }
    with serve_portal(node, list_source=Source(generated)) as portal:
        yield portal.url, node, {k: v for k, v in secrets.items() if v}
    node.close()


def _page(browser: Any, viewport: dict[str, int], locale: str = "en-GB") -> Any:
    return new_page(browser, viewport, locale)


def _login(page: Any, url: str, username: str, secret: str, clock: Clock) -> None:
    page.goto(f"{url}/login")
    page.get_by_label(page.locator("label[for=username]").inner_text()).fill(username)
    page.locator("#password").fill(PASSWORD)
    page.locator("form[action='/login'] button[type=submit]").click()
    page.wait_for_url(f"{url}/login/totp")
    clock.advance(seconds=30)  # a fresh TOTP step for each login of the module's accounts
    page.locator("#code").fill(totp_now(secret, clock))
    page.locator("form[action='/login/totp'] button[type=submit]").click()
    page.wait_for_url(f"{url}/")


def test_login_pages_and_logout(browser: Any, served: Any, clock: Clock) -> None:
    url, _node, secrets = served
    page = _page(browser, LAPTOP, "de-DE")
    page.goto(f"{url}/login")
    assert page.locator("h1").inner_text() == "Anmelden"  # the browser's language before login
    _axe(page, "login (de)")
    _shot(page, "login-de-1366")
    page = _page(browser, LAPTOP)
    page.goto(f"{url}/login")
    _axe(page, "login")
    _shot(page, "login-en-1366")
    page.locator("#username").fill("dr.peeters")
    page.locator("#password").fill(PASSWORD)
    page.locator("form[action='/login'] button[type=submit]").click()
    page.wait_for_url(f"{url}/login/totp")
    _axe(page, "totp")
    _shot(page, "totp-en-1366")
    clock.advance(seconds=30)
    page.locator("#code").fill(totp_now(secrets["en"], clock))
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/")
    assert "Dr. An Peeters" in page.locator("header").inner_text()
    _axe(page, "home")
    _shot(page, "home-en-1366")
    page.goto(f"{url}/account")
    _axe(page, "account")
    _shot(page, "account-en-1366")
    page.goto(f"{url}/no-such-page")
    _axe(page, "error 404")
    _shot(page, "error-404-en-1366")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{url}/login?reason=logged_out")
    assert "You have logged out" in page.inner_text("main")
    page.goto(f"{url}/account")
    assert page.url.startswith(f"{url}/login")


def test_keyboard_only_login(browser: Any, served: Any, clock: Clock) -> None:
    url, _node, secrets = served
    page = _page(browser, LAPTOP)
    page.goto(f"{url}/login")
    _wait(page, "document.activeElement && document.activeElement.id === 'username'")
    # The first thing in the tab order is the skip link to the main content.
    assert page.evaluate("document.querySelector('a[href], button, input, select').className") == (
        "skip"
    )
    page.locator("#username").focus()
    page.keyboard.type("dr.peeters")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/login/totp")
    clock.advance(seconds=30)
    # The code field takes the focus by itself. Chromium applies autofocus at its next rendering
    # step, which may come after the load event on a busy machine: wait for it, never type into
    # the page's body.
    _wait(page, "document.activeElement && document.activeElement.id === 'code'")
    page.keyboard.type(totp_now(secrets["en"], clock))
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/")


def test_failed_logins_up_to_lock_out(browser: Any, served: Any) -> None:
    url, _node, _secrets = served
    page = _page(browser, LAPTOP)
    for attempt in range(3):
        page.goto(f"{url}/login")
        page.locator("#username").fill("dr.locked")
        page.locator("#password").fill(f"wrong password {attempt}")
        page.locator("form[action='/login'] button[type=submit]").click()
        alert = page.get_by_role("alert").inner_text()
    assert "locked" in alert and "minutes" in alert
    _axe(page, "login locked")
    _shot(page, "login-locked-en-1366")


def test_idle_timeout_in_the_browser(browser: Any, served: Any, clock: Clock) -> None:
    url, node, secrets = served
    page = _page(browser, LAPTOP, "fr-FR")
    _login(page, url, "dr.dubois", secrets["fr"], clock)
    clock.advance(seconds=node.settings.portal.idle_timeout_s + 1)
    page.goto(f"{url}/account")
    assert page.url == f"{url}/login?reason=idle"
    assert "inactivité" in page.inner_text("main")
    _shot(page, "login-idle-fr-1366")


def _list(
    browser: Any, served: Any, clock: Clock, who: str, username: str, viewport: dict[str, int]
) -> Any:
    url, _node, secrets = served
    page = _page(browser, viewport)
    _login(page, url, username, secrets[who], clock)
    page.goto(f"{url}/patients/p1/list")
    _wait(page, "window.ncpList && window.ncpList.ready")
    return page


def _wait(page: Any, condition: str, timeout: float = 10.0) -> None:
    wait(page, condition, timeout)


def _visible_rows(page: Any) -> int:
    """Rows the filters let through (the table renders only those in view: virtualised)."""
    return int(page.evaluate("window.ncpList.visible()"))


def test_list_of_300_studies_filters_sorts_groups(
    browser: Any, served: Any, clock: Clock, generated: GeneratedList
) -> None:
    page = _list(browser, served, clock, "en", "dr.peeters", LAPTOP)
    model = Source(generated)(None, "p1", Translator("en-BE"))  # type: ignore[arg-type]
    assert model is not None
    rows = model["rows"]
    assert len(rows) == 300 and _visible_rows(page) == 300
    thumbs = page.locator("#list-table img.thumb")
    assert thumbs.count() == 3 and thumbs.first.get_attribute("alt") == "Preview of the study"
    assert page.locator("#list-count").inner_text() == "300 of 300 shown"
    _axe(page, "list")
    _shot(page, "list-en-1366")

    # Tabs by modality: the CT tab shows exactly the CT studies.
    ct = sum("CT" in r["modalities"] for r in rows)
    page.get_by_role("tab", name=f"CT {ct}").click()
    assert _visible_rows(page) == ct
    page.keyboard.press("ArrowRight")  # the next tab by keyboard
    assert page.evaluate("document.activeElement.getAttribute('aria-selected')") == "true"
    page.get_by_role("tab", name="All 300").click()

    # Combined filters: modality, body site, date range and free text together.
    page.select_option("#f-modality", "MR")
    mr = [r for r in rows if "MR" in r["modalities"]]
    assert _visible_rows(page) == len(mr)
    site = mr[0]["body_sites"][0]["display"]
    page.select_option("#f-body_site", label=site)
    both = [r for r in mr if any(s["display"] == site for s in r["body_sites"])]
    assert _visible_rows(page) == len(both)
    years = sorted({r["started"][:4] for r in both})
    page.fill("#f-from", f"{years[-1]}-01-01")
    in_year = [r for r in both if r["started"][:4] == years[-1]]
    assert _visible_rows(page) == len(in_year)
    page.click("#f-reset")
    _wait(page, "window.ncpList.visible() === 300")
    page.fill("#f-text", "cardiology")
    _wait(page, "window.ncpList.visible() < 300")
    cardio = [r for r in rows if (r["requesting_specialty"] or {}).get("display") == "Cardiology"]
    assert _visible_rows(page) >= len(cardio) > 0
    page.click("#f-reset")
    _wait(page, "window.ncpList.visible() === 300")

    # Sort by size, ascending then descending; aria-sort follows.
    page.locator("button.sort[data-sort=size]").click()
    _wait(page, "!window.ncpList.pending()")
    sizes = page.evaluate(
        "() => [...document.querySelectorAll('#list-table tbody tr')].map(tr => tr.id)"
    )
    by_size = sorted(rows, key=lambda r: r["size_bytes"] or -1)
    assert sizes[0] == f"study-{by_size[0]['id']}"
    assert page.locator("th[data-col=size]").get_attribute("aria-sort") == "ascending"
    page.locator("button.sort[data-sort=size]").click()
    assert page.locator("th[data-col=size]").get_attribute("aria-sort") == "descending"
    first = page.locator("#list-table tbody tr").first.get_attribute("id")
    assert first == f"study-{max(rows, key=lambda r: r['size_bytes'] or -1)['id']}"

    # Group by year: one header per year, newest first, counts right.
    page.select_option("#f-group", "year")
    headers = page.locator("#list-table tbody tr.group").all_inner_texts()
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["year"])] = counts.get(str(r["year"]), 0) + 1
    # The table renders the groups in view (virtualised): the first ones, newest year first.
    assert headers and [h.split(" · ")[0] for h in headers] == sorted(counts, reverse=True)[
        : len(headers)
    ]
    assert all(int(h.split(" · ")[1]) == counts[h.split(" · ")[0]] for h in headers)
    rowcount = page.locator("#list-table").get_attribute("aria-rowcount")
    assert rowcount == str(300 + len(counts) + 1)  # rows, group headers, the header row
    shown_columns = page.evaluate(
        "() => [...document.querySelectorAll('#list-table thead th')]"
        ".filter(th => getComputedStyle(th).display !== 'none').length"
    )
    assert page.locator("tr.group th").first.get_attribute("colspan") == str(shown_columns)
    _shot(page, "list-grouped-year-en-1366")

    # Configurable columns: hide "Size", it is gone; the choice survives a reload.
    page.select_option("#f-group", "")
    page.click("details.columns summary")
    page.get_by_label("Size", exact=True).uncheck()
    assert not page.locator("td.c-size").first.is_visible()
    page.reload()
    _wait(page, "window.ncpList && window.ncpList.ready")
    assert not page.locator("td.c-size").first.is_visible()

    # Selection for retrieval.
    boxes = page.locator("#list-table tbody input[type=checkbox]")
    boxes.nth(0).check()
    boxes.nth(1).check()
    assert page.locator("#selected-count").inner_text() == "2 selected"
    assert page.locator("#retrieve").is_enabled()
    chosen = [boxes.nth(i).get_attribute("value") for i in (0, 1)]
    # Hidden by a filter, a chosen study is still sent with the form (and counted).
    page.fill("#f-text", "no study has this text")
    _wait(page, "window.ncpList.visible() === 0")
    assert page.locator("#selected-count").inner_text() == "2 selected"
    with page.expect_request(lambda r: r.url.endswith("/retrieve")) as sent:
        page.click("#retrieve")
    form = parse_qs(sent.value.post_data or "")
    assert sorted(form["study"]) == sorted(chosen) and form["csrf_token"]
    assert form["patient"] == ["p1"] and form["option"] == ["A"] and form["priority"] == ["normal"]
    # This list has no confirmed patient behind it (tests/test_portal_pair.py pulls for real).
    assert "Error 404" in page.inner_text("main")


def test_preliminary_and_urgent_reports_are_flagged(
    browser: Any, served: Any, clock: Clock
) -> None:
    page = _list(browser, served, clock, "en", "dr.peeters", LAPTOP)
    # The report column sorts urgent first, then preliminary: every flag is in the first rows.
    page.locator("button.sort[data-sort=report]").click()
    page.locator("button.sort[data-sort=report]").click()  # ascending: urgent, preliminary...
    if page.locator("th[data-col=report]").get_attribute("aria-sort") != "ascending":
        page.locator("button.sort[data-sort=report]").click()
    assert page.locator("#list-table .flag.urgent").count() == 2
    page.fill("#f-text", "preliminary")
    _wait(page, "window.ncpList.visible() === 20")
    flagged = page.locator("#list-table tr.row .flag.preliminary").count()
    assert flagged == page.locator("#list-table tr.row").count() > 0
    link = page.locator("#list-table a.report-link").first
    assert link.get_attribute("href").startswith("/patients/p1/reports/")


def test_html_from_country_a_is_shown_as_text(browser: Any, served: Any, clock: Clock) -> None:
    page = _list(browser, served, clock, "en", "dr.peeters", LAPTOP)
    page.fill("#f-text", "window.__pwned")
    _wait(page, "window.ncpList.visible() === 1")
    cell = page.locator("#list-table tbody tr td.c-description").first
    assert INJECTION in cell.inner_text()
    assert cell.locator("script, img:not(.thumb)").count() == 0  # only our own thumbnail
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#list-model").count() == 1  # the data block is one inert script


def test_list_in_german_on_a_wide_screen(browser: Any, served: Any, clock: Clock) -> None:
    page = _list(browser, served, clock, "de", "dr.huber", WIDE)
    assert page.locator("h1").inner_text() == "Untersuchungen und Befunde"
    page.fill("#f-text", "thorax vorläufig")
    _wait(page, "window.ncpList.visible() > 0 && window.ncpList.visible() < 300")
    text = page.inner_text("#list-table tbody")
    assert "Thorax" in text  # SNOMED CT body site in German, from terminology/
    assert "vorläufig" in text.lower()  # the flag (its CSS writes it in capitals)
    page.click("#f-reset")
    _wait(page, "window.ncpList.visible() === 300")
    _axe(page, "list (de)")
    _shot(page, "list-de-1920")
    page.click("#view-timeline")
    assert page.locator("#list-timeline button.year").count() > 3
    _axe(page, "timeline (de)")
    _shot(page, "timeline-de-1920")
    page.locator("#list-timeline button.year").first.click()
    assert page.locator("#list-timeline").is_hidden()
    assert _visible_rows(page) < 300


def test_list_in_french_on_a_laptop(browser: Any, served: Any, clock: Clock) -> None:
    page = _list(browser, served, clock, "fr", "dr.dubois", LAPTOP)
    page.select_option("#f-group", "modality")
    _axe(page, "list grouped (fr)")
    _shot(page, "list-grouped-modality-fr-1366")
