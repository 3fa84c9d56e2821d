"""The viewer in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser), against node A served over TLS with a launch code from its real ``$imaging-access``.

The HP comes from another site (a page with a link, as B's portal opens the viewer), the launch
opens the CT study, the test scrolls the series, changes the window by a preset and by dragging,
zooms; each image shown is read back from the page and compared pixel by pixel with a reference
render made here from the stored values and the standard's window formula. Screenshots (English
and German) are saved under ``test-artifacts/viewer/`` (git-ignored), with the time from the
click on the link to the first image shown.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ncp.viewer.render import Window, render
from tests.support.dicom_factory import write_instance
from tests.support.node import RunningNode, running_node
from tests.support.orthanc import ENV_REQUIRE
from tests.support.viewer import CT_SERIES, CT_STUDY, ct_instance, launch_url, write_ct_series

pytestmark = pytest.mark.chromium

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "viewer"
SLICES, SIZE = 24, 256


def _unavailable(reason: str) -> None:
    if os.environ.get(ENV_REQUIRE) == "1":
        pytest.fail(f"Chromium is required here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable("Debian's chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, np.ndarray]]:
    root = tmp_path_factory.mktemp("viewer-browser")
    volume: dict[str, np.ndarray] = {}

    def extra(folder: Path) -> None:
        volume["ct"] = write_ct_series(folder, n=SLICES, size=SIZE)
        write_cine(folder)

    with running_node(root, viewer=True, archive_extra=extra) as running:
        yield running, volume["ct"]


CINE_SERIES = f"{CT_STUDY}.3"


def write_cine(folder: Path) -> None:
    """A third series of the CT study: one multi-frame image, 12 frames of 64 x 48 pixels
    twice as tall as wide (Pixel Spacing 1.0 \\ 0.5 mm), a frame every 40 ms (25 per second)."""
    frames = np.stack([np.full((48, 64), 1024 + 40 * i, np.uint16) for i in range(12)])
    ds = ct_instance(
        frames[0], number=1, series=CINE_SERIES, SeriesNumber=3, SeriesDescription="Cine",
        FrameTime=40.0, NumberOfFrames=12,
    )  # fmt: skip
    ds.PixelSpacing = [1.0, 0.5]
    ds.PixelData = frames.tobytes()
    write_instance(folder / "PAT100" / "ct-cine.dcm", ds)


def shown_pixels(page: Any) -> np.ndarray:
    """The image the page shows, at its own resolution, read back through a canvas."""
    data = page.evaluate(
        """() => {
            const img = document.getElementById('image');
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            c.getContext('2d').drawImage(img, 0, 0);
            return c.toDataURL('image/png');
        }"""
    )
    picture = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1])))
    return np.asarray(picture.convert("L"))


def reference(volume: np.ndarray, pos: int, window: Window) -> np.ndarray:
    stored = volume[pos]
    return render(ct_instance(stored, number=pos + 1), stored, window)


def assert_same(shown: np.ndarray, expected: np.ndarray) -> None:
    assert shown.shape == expected.shape
    difference = np.abs(shown.astype(int) - expected.astype(int))
    assert difference.mean() < 0.5 and difference.max() <= 2, (difference.mean(), difference.max())


def wait_shown(page: Any, pos: int, window: str | None = None) -> None:
    selector = f"#image[data-pos='{pos}'][data-lossless='1']"
    if window is not None:
        selector += f"[data-window='{window}']"
    page.wait_for_selector(selector, state="attached", timeout=20_000)


def open_viewer(
    chromium: Any, running: RunningNode, locale: str
) -> tuple[Any, Any, float, list[str]]:
    context = chromium.new_context(
        ignore_https_errors=True, viewport={"width": 1440, "height": 900}, locale=locale
    )
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda m: problems.append(m.text) if m.type == "error" or "Security" in m.text else None,
    )
    url = launch_url(running, [CT_STUDY], locale=locale, studyUID=CT_STUDY)
    # B's portal: a page of another site with a link the HP clicks.
    page.set_content(f'<a id="open" href="{url}">Open images (option B)</a>')
    started = time.perf_counter()
    page.click("#open")
    page.wait_for_selector("#image[data-pos='0']", state="attached", timeout=20_000)
    first_image_s = time.perf_counter() - started
    return context, page, first_image_s, problems


def test_launch_scroll_window_and_zoom_in_chromium(chromium: Any, node: Any) -> None:
    running, volume = node
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context, page, first_image_s, problems = open_viewer(chromium, running, "en-GB")
    try:
        assert page.url.startswith(running.viewer_url or "")
        # The study opens on its localizer (series 1); the HP picks the axial series.
        page.click(f".series-item[data-series='{CT_SERIES}']")
        wait_shown(page, 0, "40,400")
        assert_same(shown_pixels(page), reference(volume, 0, Window(40, 400)))

        # Scroll: the wheel and the arrow keys.
        page.mouse.move(800, 450)
        for _ in range(3):
            page.mouse.wheel(0, 100)
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        wait_shown(page, 5, "40,400")
        assert_same(shown_pixels(page), reference(volume, 5, Window(40, 400)))
        page.screenshot(path=str(ARTIFACTS / "ct-scrolled-en.png"))

        # A window preset (CT lung, key 1), then a drag to window.
        page.keyboard.press("1")
        wait_shown(page, 5, "-600,1500")
        assert_same(shown_pixels(page), reference(volume, 5, Window(-600, 1500)))
        box = page.locator("#viewport").bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x - 60, y + 40, steps=6)
        page.mouse.up()
        page.wait_for_timeout(100)
        shown_window = page.get_attribute("#image", "data-window")
        assert shown_window not in (None, "-600,1500", "default")
        center, width = (float(v) for v in shown_window.split(","))
        assert center > -600 and width < 1500  # down: level up; left: narrower
        wait_shown(page, 5, shown_window)
        assert_same(shown_pixels(page), reference(volume, 5, Window(center, width)))
        overlay = page.inner_text("#ov-br")
        assert f"W: {round(width)}" in overlay and f"L: {round(center)}" in overlay

        # Zoom: twice by the keyboard, around the centre.
        page.keyboard.press("+")
        page.keyboard.press("+")
        matrix = page.eval_on_selector("#image", "img => getComputedStyle(img).transform")
        scale = float(matrix.split("(")[1].split(",")[0])
        assert scale == pytest.approx(1.5625)
        page.screenshot(path=str(ARTIFACTS / "ct-lung-window-zoomed-en.png"))

        # Reset brings back the image's own window and the fitted size.
        page.keyboard.press("r")
        wait_shown(page, 5, "40,400")
        assert page.eval_on_selector("#image", "img => getComputedStyle(img).transform").startswith(
            "matrix(1, 0, 0, 1"
        )
        assert problems == []
    finally:
        context.close()
    (ARTIFACTS / "timings.json").write_text(
        json.dumps({"launch_to_first_image_s": round(first_image_s, 3)}, indent=2)
    )


def test_the_viewer_speaks_german_from_the_locale_claim(chromium: Any, node: Any) -> None:
    running, volume = node
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context, page, _, problems = open_viewer(chromium, running, "de-AT")
    try:
        assert page.get_attribute("html", "lang") == "de"
        page.click(f".series-item[data-series='{CT_SERIES}']")
        wait_shown(page, 0, "40,400")
        page.keyboard.press("End")
        wait_shown(page, SLICES - 1, "40,400")
        assert_same(shown_pixels(page), reference(volume, SLICES - 1, Window(40, 400)))
        page.keyboard.press("i")
        text = page.inner_text("body").lower()  # headings are shown in capitals
        for words in ("Zurücksetzen", "Bildinformationen", "Computertomographie", "Thorax"):
            assert words.lower() in text
        page.screenshot(path=str(ARTIFACTS / "ct-info-de.png"))
        page.keyboard.press("?")
        assert "Tastenkürzel" in page.inner_text("#help")
        page.screenshot(path=str(ARTIFACTS / "help-de.png"))
        assert problems == []
    finally:
        context.close()


def test_a_refused_launch_is_a_readable_page(chromium: Any, node: Any) -> None:
    running, _ = node
    context = chromium.new_context(ignore_https_errors=True, locale="fr-FR")
    page = context.new_page()
    try:
        url = launch_url(running, [CT_STUDY])
        page.goto(url)
        page.goto(url)  # the same link again
        assert "Les images ne peuvent pas être ouvertes" in page.inner_text("h1")
        # The reason in the HP's language; the help desk's line keeps the audit's wording.
        assert "déjà été utilisé" in page.inner_text(".reason")
        assert "used already" in page.inner_text(".request")
        page.screenshot(path=str(ARTIFACTS / "refused-fr.png"))
    finally:
        context.close()


NETWORK_LOG = """() => {
    const entries = performance.getEntriesByType("resource");
    const frame = entries.find((e) => /\\/(rendered|first-image)$/.test(new URL(e.name).pathname));
    const nav = performance.getEntriesByType("navigation")[0];
    const mark = performance.getEntriesByName("ncp-first-image")[0];
    return {
        redirects: nav.redirectCount,
        frameEnd: frame ? frame.responseEnd : null,
        shownAt: mark ? mark.startTime : null,
        resources: entries.map((e) => ({
            path: new URL(e.name).pathname.replace(/^.*\\/viewer\\//, ""),
            initiator: e.initiatorType,
            start: e.startTime,
            end: e.responseEnd,
        })),
    };
}"""


def test_the_first_image_needs_only_the_page_its_two_files_and_itself(
    chromium: Any, node: Any
) -> None:
    """The page's own network log (Resource Timing): from the launch to the first image, the
    browser asks for the launch (redirected), the page, its script and style, the image and at
    most the page's data (one request, in parallel with the image); no list of studies,
    series or images, no context, no thumbnail comes before the image, and the image is asked
    for by the page's HTML (an ``img``), not by the script once it has run and asked for data.
    Before: the script asked for the context and the studies, then the series, then the
    images, then the frame (7 requests after the page, 5 of them one after another)."""
    running, _ = node
    context, page, _, problems = open_viewer(chromium, running, "en")
    try:
        log = page.evaluate(NETWORK_LOG)
        assert log["redirects"] == 1  # the launch, then the page: one navigation
        assert log["frameEnd"] is not None
        before = [r for r in log["resources"] if r["start"] < log["frameEnd"]]
        paths = sorted(r["path"] for r in before)
        lists = ("context", "studies", "series", "instances", "thumbnail")
        assert not [p for p in paths if p.endswith(lists)], paths
        assert len(before) <= 4, paths
        assert set(paths) <= {
            "static/viewer.css",
            "static/viewer.js",
            "initial",
            f"studies/{CT_STUDY}/first-image",
        }, paths
        [frame] = [r for r in before if r["path"].endswith(("/rendered", "/first-image"))]
        assert frame["initiator"] == "img", frame
        # The page marks the moment its first image is shown, for the benchmark.
        assert log["shownAt"] is not None and log["shownAt"] >= frame["end"] - 1
        assert problems == []
    finally:
        context.close()


def test_cine_plays_at_the_series_speed_or_the_hps_and_pixels_keep_their_shape(
    chromium: Any, node: Any
) -> None:
    running, _ = node
    context, page, _, problems = open_viewer(chromium, running, "en")
    try:
        page.click(f".series-item[data-series='{CINE_SERIES}']")
        wait_shown(page, 0)
        # 64 x 48 pixels of 0.5 x 1.0 mm: shown 32 mm wide and 48 mm high.
        width, height = page.eval_on_selector(
            "#image",
            "img => [img.getBoundingClientRect().width, img.getBoundingClientRect().height]",
        )
        assert height / width == pytest.approx(1.5, rel=0.01)
        page.keyboard.press(" ")
        page.wait_for_selector("#cine[aria-pressed='true'][data-rate='25']", timeout=5_000)
        page.wait_for_selector("#image:not([data-pos='0'])", state="attached", timeout=5_000)
        assert "25 fps" in page.inner_text("#ov-br")
        page.keyboard.press("[")  # slower: the next speed down
        page.wait_for_selector("#cine[data-rate='20']", timeout=5_000)
        assert page.input_value("#cine-rate") == "20"
        page.select_option("#cine-rate", "5")
        page.wait_for_selector("#cine[data-rate='5']", timeout=5_000)
        page.keyboard.press(" ")
        page.wait_for_selector("#cine[aria-pressed='false']", timeout=5_000)
        page.select_option("#cine-rate", "auto")
        page.keyboard.press(" ")
        page.wait_for_selector("#cine[data-rate='25']", timeout=5_000)
        page.screenshot(path=str(ARTIFACTS / "cine-en.png"))
        assert problems == []
    finally:
        context.close()


def test_the_hp_ends_the_session_from_the_page(chromium: Any, node: Any) -> None:
    running, _ = node
    context, page, _, problems = open_viewer(chromium, running, "fr-FR")
    try:
        page.wait_for_selector("#app[data-state='ready']", state="attached")
        page.click("#end-session")
        page.wait_for_selector("#app[data-state='closed']", state="attached", timeout=10_000)
        assert "La session est terminée" in page.inner_text("#message")
        assert page.eval_on_selector("#image", "img => img.classList.contains('hidden')")
        status = page.evaluate("() => fetch('context').then((r) => r.status)")
        assert status == 401
        page.screenshot(path=str(ARTIFACTS / "ended-fr.png"))
        assert [p for p in problems if "401" not in p] == []
    finally:
        context.close()
