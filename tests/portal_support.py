"""Helpers of the portal's HTTP tests: a TestClient over HTTPS (the cookies are Secure) and the
login steps."""

from __future__ import annotations

import re
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from ncp.node import Node
from ncp.portal.app import build_portal_app
from tests.support.portal import PASSWORD, Clock, totp_now

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def client(node: Node, **kwargs: object) -> TestClient:
    app = build_portal_app(node, **kwargs)  # type: ignore[arg-type]
    return TestClient(app, base_url="https://testserver", raise_server_exceptions=False)


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


def login(c: TestClient, secret: str, clock: Clock, username: str = "dr.peeters") -> None:
    page = c.get("/login")
    r = c.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/login/totp", r.text
    page = c.get("/login/totp")
    r = c.post(
        "/login/totp",
        data={"code": totp_now(secret, clock), "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
