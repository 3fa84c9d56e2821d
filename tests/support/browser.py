"""Headless Chromium for the portal's browser tests: Debian's ``chromium`` driven by Playwright
from PyPI (never a downloaded browser), axe-core from ``tests/.node`` (npm, git-ignored), and
screenshots into ``test-artifacts/portal/``.

A missing Chromium or axe-core skips the tests, and fails them under ``NCP_REQUIRE_SERVICES``
(CI)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.portal import PASSWORD

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "portal"
AXE = ROOT / "tests" / ".node" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
LAPTOP = {"width": 1366, "height": 768}
WIDE = {"width": 1920, "height": 1080}


def need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("NCP_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)


@contextmanager
def chromium() -> Iterator[Any]:
    need(shutil.which(CHROMIUM) is not None, "Debian chromium is not installed")
    need(AXE.exists(), "axe-core is not installed (scripts/test installs it in tests/.node)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, viewport: dict[str, int] = LAPTOP, locale: str = "en-GB") -> Any:
    context = browser.new_context(ignore_https_errors=True, viewport=viewport, locale=locale)
    return context.new_page()


def shot(page: Any, name: str, full: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    return path


def axe(page: Any, what: str) -> None:
    """axe-core on the page: no serious or critical violation. Run through DevTools, not a
    <script> tag: the portal's CSP refuses inline scripts (as it should)."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))
    violations = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help,"
        " first: v.nodes.slice(0, 2).map(n => n.target.join(' ') + ': ' + n.failureSummary)}))"
    )
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not bad, f"{what}: {bad}"


def wait(page: Any, condition: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` from the test's side: Playwright's wait_for_function polls with eval
    inside the page, which the portal's CSP (rightly) refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({condition})"):
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.05)


def login(page: Any, url: str, username: str, code: str) -> None:
    """Password, then the TOTP code, by the keyboard as an HP types them."""
    page.goto(f"{url}/login")
    page.locator("#username").fill(username)
    page.locator("#password").fill(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/login/totp")
    page.locator("#code").fill(code)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/")


__all__ = [
    "ARTIFACTS",
    "LAPTOP",
    "WIDE",
    "axe",
    "chromium",
    "login",
    "need",
    "new_page",
    "shot",
    "wait",
]
