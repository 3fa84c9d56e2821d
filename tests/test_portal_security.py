"""The portal's login, sessions and their attacks, over HTTP (FastAPI's TestClient on the real
app and database): password + TOTP, failures up to lock-out (per account and per source),
CSRF refused on every form, forged, replayed and expired session cookies, idle timeout and
absolute lifetime, logout, the headers every answer carries, error pages, and the audit
record of each step."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from ncp.audit.chain import verify
from ncp.audit.models import Action, AuditRecord, Outcome
from ncp.node import Node
from ncp.portal.app import LOGIN_COOKIE, SESSION_COOKIE
from ncp.portal.login import LOCAL_ACR
from ncp.portal.security import CSP
from ncp.store.portal import PortalSession
from tests.portal_support import client, csrf_of, login
from tests.support.portal import PASSWORD, Clock, add_hp, portal_node, totp_next, totp_now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(tmp_path: Path, clock: Clock) -> Iterator[Node]:
    made = portal_node(
        tmp_path, clock=clock, max_failures_account=3, max_failures_source=6, lockout_s=600
    )
    yield made
    made.close()


@pytest.fixture
def secret(node: Node) -> str:
    made = add_hp(node)
    assert made is not None
    return made


def audit(node: Node) -> list[AuditRecord]:
    with node.sessions() as session:
        return list(session.scalars(select(AuditRecord).order_by(AuditRecord.seq)))


def test_login_with_password_and_totp_opens_a_session(
    node: Node, secret: str, clock: Clock
) -> None:
    c = client(node)
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    login(c, secret, clock)
    home = c.get("/")
    assert home.status_code == 200 and "Dr. An Peeters" in home.text
    cookie = next(h for h in home.history or [] if h) if home.history else None
    assert cookie is None  # no redirect: the session cookie is sent
    with node.sessions() as session:
        row = session.scalars(select(PortalSession)).one()
    assert row.state == "active" and row.acr == LOCAL_ACR and row.amr == "pwd otp mfa"
    records = [r for r in audit(node) if r.action == Action.HP_LOGIN]
    assert records[-1].outcome == Outcome.SUCCESS and records[-1].actor_id == "dr.peeters"
    assert records[-1].details["acr"] == LOCAL_ACR
    assert records[-1].actor_organisation_id == "urn:oid:1.2.3.4.5"


def test_session_cookie_attributes(node: Node, secret: str, clock: Clock) -> None:
    c = client(node)
    page = c.get("/login")
    login_cookie = page.headers["set-cookie"]
    assert login_cookie.startswith(f"{LOGIN_COOKIE}=")
    for part in ("HttpOnly", "Secure", "Path=/", "SameSite=lax"):
        assert part in login_cookie
    r = c.post(
        "/login",
        data={"username": "dr.peeters", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    code_page = c.get("/login/totp")
    r = c.post(
        "/login/totp",
        data={"code": totp_now(secret, clock), "csrf_token": csrf_of(code_page.text)},
        follow_redirects=False,
    )
    session_cookie = next(
        v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE)
    )
    for part in ("HttpOnly", "Secure", "Path=/", "SameSite=strict"):
        assert part in session_cookie
    assert "Domain" not in session_cookie


def test_the_second_factor_is_required(node: Node, secret: str, clock: Clock) -> None:
    c = client(node)
    page = c.get("/login")
    c.post(
        "/login",
        data={"username": "dr.peeters", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
    )
    # The password alone gives no session: every page still sends the HP to the login.
    assert c.get("/", follow_redirects=False).status_code == 303
    # A login cookie's value moved into the session cookie authorises nothing either.
    moved = {"Cookie": f"{SESSION_COOKIE}={c.cookies[LOGIN_COOKIE]}"}
    assert client(node).get("/", headers=moved, follow_redirects=False).status_code == 303


def test_a_totp_code_is_accepted_once(node: Node, secret: str, clock: Clock) -> None:
    login(client(node), secret, clock)
    c = client(node)
    page = c.get("/login")
    c.post(
        "/login",
        data={"username": "dr.peeters", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
    )
    page = c.get("/login/totp")
    replay = c.post(
        "/login/totp", data={"code": totp_now(secret, clock), "csrf_token": csrf_of(page.text)}
    )
    assert replay.status_code == 401 and "already used" in replay.text
    fresh = c.post(
        "/login/totp",
        data={"code": totp_next(secret, clock), "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert fresh.status_code == 303


def _try(c, username: str, password: str) -> object:  # type: ignore[no-untyped-def]
    page = c.get("/login")
    return c.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": csrf_of(page.text)},
    )


def test_failed_logins_lock_the_account(node: Node, secret: str, clock: Clock) -> None:
    c = client(node)
    for _ in range(2):
        r = _try(c, "dr.peeters", "wrong password!")
        assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = _try(c, "dr.peeters", "wrong password!")
    assert r.status_code == 429 and "This account is locked" in r.text
    # The right password does not open a locked account; the message stays clear.
    r = _try(c, "dr.peeters", PASSWORD)
    assert r.status_code == 429 and "Try again in 10 minutes" in r.text
    records = [r for r in audit(node) if r.action == Action.HP_LOGIN]
    assert [r.outcome for r in records].count(Outcome.MINOR_FAILURE) == 3
    locked = [r for r in records if r.details.get("lockout") == "account"]
    assert locked and locked[0].outcome == Outcome.SERIOUS_FAILURE
    assert locked[0].actor_id == "dr.peeters"
    # The lock ends after lockout_s; then the account logs in again.
    clock.advance(seconds=601)
    login(c, secret, clock)


def test_unknown_user_names_lock_too_and_are_not_recorded(node: Node, secret: str) -> None:
    c = client(node)
    for _ in range(2):
        assert _try(c, "nobody", "a typed password").status_code == 401
    assert _try(c, "nobody", "a typed password").status_code == 429
    records = [r for r in audit(node) if r.action == Action.HP_LOGIN]
    assert all("nobody" not in str(r.details) and r.actor_id is None for r in records)


def test_failures_from_one_source_block_it(node: Node, secret: str) -> None:
    c = client(node)
    for i in range(5):
        assert _try(c, f"guess{i}", "not it at all").status_code in (401, 429)
    r = _try(c, "guess-last", "not it at all")
    assert r.status_code == 429 and "from this computer" in r.text
    # Even the right credentials are refused from that source while it is blocked.
    assert _try(c, "dr.peeters", PASSWORD).status_code == 429
    assert any(r.details.get("lockout") == "source" for r in audit(node))


FORMS = [
    ("/identify", {"country": "AT", "identifier": "123"}),
    ("/confirm", {"purpose": "TREAT", "relationship": "yes"}),
    ("/retrieve", {"study": "1.2.3"}),
    ("/view", {"study": "1.2.3"}),
    ("/jobs/00000000-0000-0000-0000-000000000000/cancel", {}),
    ("/jobs/00000000-0000-0000-0000-000000000000/confirm", {}),
    ("/logout", {}),
]


@pytest.mark.parametrize(("path", "data"), FORMS)
def test_csrf_is_refused_on_every_form_of_a_session(
    node: Node, secret: str, clock: Clock, path: str, data: dict[str, str]
) -> None:
    c = client(node)
    login(c, secret, clock)
    token = csrf_of(c.get("/").text)
    other = client(node)
    login(other, secret, clock.advance(seconds=31) or clock)  # type: ignore[func-returns-value]
    foreign = csrf_of(other.get("/").text)
    for given in (None, "", "forged", foreign):
        form = dict(data) if given is None else {**data, "csrf_token": given}
        r = c.post(path, data=form, follow_redirects=False)
        assert r.status_code == 403, (path, given)
        assert "not allowed" in r.text
    # With its own token the form passes the check (this node asks no peer: 503; no such
    # patient or job of this session: 404; the logout: 303). tests/test_portal_pair.py sends
    # every form with real data.
    r = c.post(path, data={**data, "csrf_token": token}, follow_redirects=False)
    assert r.status_code in (303, 404, 503), (path, r.status_code)


@pytest.mark.parametrize("path", ["/login", "/login/totp"])
def test_csrf_is_refused_on_the_login_forms(
    node: Node, secret: str, clock: Clock, path: str
) -> None:
    c = client(node)
    page = c.get("/login")
    if path == "/login/totp":
        c.post(
            "/login",
            data={"username": "dr.peeters", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
        )
    for given in ("", "forged"):
        r = c.post(
            path,
            data={
                "username": "dr.peeters",
                "password": PASSWORD,
                "code": totp_now(secret, clock),
                "csrf_token": given,
            },
        )
        assert r.status_code == 403
    # Without the login cookie at all (a cross-site form post), refused as well.
    fresh = client(node)
    r = fresh.post(
        path,
        data={"username": "dr.peeters", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
    )
    assert r.status_code == 403


def test_forged_cookie_is_refused_and_audited(node: Node, secret: str) -> None:
    c = client(node)
    forged = {"Cookie": f"{SESSION_COOKIE}=forged-value-of-an-attacker"}
    r = c.get("/account", headers=forged, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    refusals = [r for r in audit(node) if r.action == Action.REFUSAL]
    assert refusals and "unknown" in (refusals[-1].reason or "")


def test_logout_ends_the_session_and_its_cookie_cannot_be_replayed(
    node: Node, secret: str, clock: Clock
) -> None:
    c = client(node)
    login(c, secret, clock)
    stolen = c.cookies[SESSION_COOKIE]
    r = c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?reason=logged_out"
    assert "You have logged out" in c.get("/login?reason=logged_out").text
    replay = client(node).get(
        "/account", headers={"Cookie": f"{SESSION_COOKIE}={stolen}"}, follow_redirects=False
    )
    assert replay.status_code == 303
    actions = [r.action for r in audit(node)]
    assert Action.HP_LOGOUT in actions and actions[-1] == Action.REFUSAL


def test_idle_timeout_ends_the_session(node: Node, secret: str, clock: Clock) -> None:
    c = client(node)
    login(c, secret, clock)
    clock.advance(seconds=899)
    assert c.get("/account").status_code == 200  # use moves the idle deadline
    clock.advance(seconds=899)
    assert c.get("/account").status_code == 200
    clock.advance(seconds=901)
    r = c.get("/account", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?reason=idle"
    assert "without activity" in c.get(r.headers["location"]).text
    ended = [r for r in audit(node) if r.action == Action.HP_LOGOUT]
    assert ended and ended[-1].reason == "session ended: idle"
    with node.sessions() as session:
        assert not [s for s in session.scalars(select(PortalSession)) if s.state == "active"]


def test_absolute_lifetime_ends_a_busy_session(node: Node, secret: str, clock: Clock) -> None:
    c = client(node)
    login(c, secret, clock)
    started = clock.now
    for _ in range(40):
        clock.advance(seconds=15 * 60 - 1)  # never idle
        r = c.get("/account", follow_redirects=False)
        if r.status_code != 200:
            break
    assert r.headers["location"] == "/login?reason=expired"
    assert 8 * 3600 <= (clock.now - started).total_seconds() < 8 * 3600 + 15 * 60


def test_every_answer_carries_the_security_headers(node: Node, secret: str) -> None:
    c = client(node)
    for path in ("/login", "/static/portal.css", "/nope", "/"):
        r = c.get(path, follow_redirects=False)
        assert r.headers["content-security-policy"] == CSP, path
        assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert c.get("/login").headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("DELETE", "/login", 405), ("GET", "/patients/x/list", 303)],
)
def test_errors_are_readable_pages(
    node: Node, secret: str, method: str, path: str, status: int
) -> None:
    r = client(node).request(method, path, follow_redirects=False)
    assert r.status_code == status
    if status != 303:
        assert r.headers["content-type"].startswith("text/html")
        assert "Something went wrong" in r.text and "Traceback" not in r.text


def test_error_pages_speak_the_hps_language(node: Node, clock: Clock) -> None:
    secret = add_hp(node, "dr.dubois", name="Dr. Claire Dubois", language="fr-BE")
    assert secret is not None
    c = client(node)
    login(c, secret, clock, username="dr.dubois")
    r = c.get("/nope")
    assert r.status_code == 404 and "Cette page n'existe pas" in html.unescape(r.text)
    assert '<html lang="fr">' in r.text


def test_an_unexpected_error_is_a_page_without_a_stack_trace(
    node: Node, secret: str, clock: Clock
) -> None:
    def broken(hp, key, t):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internals")

    c = client(node, list_source=broken)
    login(c, secret, clock)
    r = c.get("/patients/p1/list")
    assert r.status_code == 500
    assert "secret internals" not in r.text and "RuntimeError" not in r.text
    assert "An unexpected error occurred" in r.text


def test_the_audit_chain_stays_intact(node: Node, secret: str, clock: Clock) -> None:
    c = client(node)
    _try(c, "dr.peeters", "wrong password!")
    login(c, secret, clock)
    c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)})
    with node.sessions() as session:
        result = verify(session)
    assert result.ok and result.count == 3  # failure, login, logout
