"""``UrlRewriter.url`` accepts and refuses exactly what its character-by-character version did.

The rewrite now checks characters with one regex search and takes archive URLs under the
archive's own base by str methods; the version before that (``_old_url``, copied unchanged) is
the oracle, on random strings and on strings built around the bases. Last, the URLs a real
Orthanc writes when it serves HTTPS (``OrthancServer.start(tls=True)``) are rewritten.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncp.gateway.rewrite import UrlRewriter
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.orthanc import ENV_REQUIRE, OrthancServer, OrthancUnavailable

PUBLIC = "https://gw.example:8443/dicomweb"
ARCHIVES: tuple[str | None, ...] = (
    "http://127.0.0.1:8042/dicom-web",
    "http://127.0.0.1:8042/dicom-web/",
    "https://pacs.example/wado/rs",
    "http://pacs.example:80",
    "HTTP://Pacs.Example/dicom-web",
    "http://pacs.example/a/../dicom-web",
    "http://pacs.example/dicom-web;x",
    "ftp://pacs.example/dicom-web",
    "dicom-web",
    None,
)


def _old_url(rewriter: UrlRewriter, value: Any) -> str | None:
    """``UrlRewriter.url`` as it was, character loop included."""
    if not isinstance(value, str) or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return None
    if rewriter.archive_base is None:
        return value if value.startswith(rewriter.public_base + "/studies/") else None
    parts = urlsplit(urljoin(rewriter.archive_base + "/", value))
    root = urlsplit(rewriter.archive_base).path or ""
    if parts.scheme not in ("http", "https") or parts.query or parts.fragment:
        return None
    if not parts.path.startswith(root + "/studies/") or "/../" in parts.path + "/":
        return None
    return rewriter.public_base + parts.path[len(root) :]


def _outcome(call: Any, rewriter: UrlRewriter, value: Any) -> tuple[str, Any]:
    try:
        return ("value", call(rewriter, value))
    except ValueError as e:  # urlsplit refuses some hosts (an unclosed "[")
        return ("raises", type(e))


def _same(rewriter: UrlRewriter, value: Any) -> None:
    old = _outcome(_old_url, rewriter, value)
    new = _outcome(UrlRewriter.url, rewriter, value)
    assert new == old, (rewriter.archive_base, value)


rewriters = st.sampled_from(ARCHIVES).map(lambda base: UrlRewriter(PUBLIC, base))
# Characters that URL parsing treats specially, controls among them, and some others.
url_chars = st.sampled_from(list("/.?#;:@[]%&=+ \t\n\x00\x1f\x7f\x80\u00a0\u3002aZ09-_~")) | (
    st.characters()
)
tails = st.text(url_chars, max_size=40)
prefixes = st.sampled_from(
    [
        "",
        "/",
        "studies/",
        "/studies/",
        "/dicom-web/studies/",
        "/wado/rs/studies/",
        "http://127.0.0.1:8042/dicom-web/studies/",
        "http://127.0.0.1:8042/dicom-web/studies",
        "http://127.0.0.1:8042/dicom-web",
        "https://127.0.0.1:8042/dicom-web/studies/",
        "http://other.example/dicom-web/studies/",
        "https://pacs.example/wado/rs/studies/",
        "http://pacs.example:80/studies/",
        "http://pacs.example/studies/",
        "HTTP://Pacs.Example/dicom-web/studies/",
        "http://pacs.example/a/../dicom-web/studies/",
        "http://pacs.example/dicom-web;x/studies/",
        "ftp://pacs.example/dicom-web/studies/",
        "dicom-web/studies/",
        f"{PUBLIC}/studies/",
        "//127.0.0.1:8042/dicom-web/studies/",
    ]
)


@st.composite
def built_urls(draw: st.DrawFn) -> tuple[UrlRewriter, str]:
    """A rewriter and a URL built around its own archive base half the time."""
    base = draw(st.sampled_from(ARCHIVES))
    rewriter = UrlRewriter(PUBLIC, base)
    own = [f"{rewriter.archive_base}/studies/", f"{rewriter.archive_base}"] if base else []
    use_own = bool(own) and draw(st.booleans())
    prefix = draw(st.sampled_from(own)) if use_own else draw(prefixes)
    end = draw(st.sampled_from(["", "/", ";", "/;", "/..", "/../x", "/./x", ";p", "?", "?q", "#"]))
    return rewriter, prefix + draw(tails) + end


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(built_urls())
def test_built_urls_as_before(case: tuple[UrlRewriter, str]) -> None:
    _same(*case)


@pytest.mark.parametrize(
    ("base", "value"),
    [
        ("ftp://pacs.example/dicom-web", "ftp://pacs.example/dicom-web/studies/1"),
        ("http://pacs.example/a/../dicom-web", "http://pacs.example/a/../dicom-web/studies/1"),
        ("http://pacs.example/dicom-web", "http://pacs.example/dicom-web/studies/1;"),
        ("http://pacs.example/dicom-web", "http://pacs.example/dicom-web/studies/1;p"),
        ("http://pacs.example/dicom-web", "http://pacs.example/dicom-web/studies/1?"),
        ("http://pacs.example/dicom-web", "http://pacs.example/dicom-web/studies/1/."),
        ("http://pacs.example/dicom-web", "http://pacs.example/dicom-web/studies/../1"),
        ("HTTP://Pacs.Example/dicom-web", "HTTP://Pacs.Example/dicom-web/studies/1"),
        ("http://pacs.example", "http://pacs.example/studies/1"),
        ("http://[::1]:8042/dicom-web", "http://[::1]:8042/dicom-web/studies/1"),
        ("http://[::1]:8042/dicom-web", "http://[::1/dicom-web/studies/1"),
    ],
)
def test_edges_as_before(base: str, value: str) -> None:
    _same(UrlRewriter(PUBLIC, base), value)


@settings(max_examples=500)
@given(rewriters, st.text())
def test_random_strings_as_before(rewriter: UrlRewriter, value: str) -> None:
    _same(rewriter, value)


@given(rewriters, st.one_of(st.none(), st.integers(), st.binary(max_size=8)))
def test_non_strings_refused(rewriter: UrlRewriter, value: object) -> None:
    assert rewriter.url(value) is None  # type: ignore[arg-type]
    _same(rewriter, value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "http://127.0.0.1:8042/dicom-web/studies/1.2/series/3.4",
            f"{PUBLIC}/studies/1.2/series/3.4",
        ),
        ("https://elsewhere:1/dicom-web/studies/1.2", f"{PUBLIC}/studies/1.2"),
        ("/dicom-web/studies/1.2/bulk/7", f"{PUBLIC}/studies/1.2/bulk/7"),
        ("http://127.0.0.1:8042/dicom-web/studies/1.2 ", None),
        ("http://127.0.0.1:8042/dicom-web/studies/1.2\x7f", None),
        ("http://127.0.0.1:8042/dicom-web/studies/1.2?x=1", None),
        ("http://127.0.0.1:8042/dicom-web/studies/1.2#f", None),
        ("http://127.0.0.1:8042/dicom-web/studies/../../admin", None),
        ("http://127.0.0.1:8042/dicom-web/studies/1.2/..", None),
        ("http://127.0.0.1:8042/other/studies/1.2", None),
        ("ftp://127.0.0.1:8042/dicom-web/studies/1.2", None),
    ],
)
def test_examples(value: str, expected: str | None) -> None:
    rewriter = UrlRewriter(PUBLIC, "http://127.0.0.1:8042/dicom-web")
    assert rewriter.url(value) == expected
    assert _old_url(rewriter, value) == expected


# -- an archive over HTTPS ------------------------------------------------------------------------

STUDY = "1.2.826.0.1.3680043.10.1.77"


@pytest.fixture(scope="module")
def orthanc_https() -> Iterator[OrthancServer]:
    try:
        server = OrthancServer.start(tls=True)
    except OrthancUnavailable as e:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"Orthanc over HTTPS unavailable: {e}", pytrace=False)
        pytest.skip(f"Orthanc over HTTPS unavailable: {e}")
    try:
        yield server
    finally:
        server.stop()


def test_https_archive_urls_rewritten(orthanc_https: OrthancServer, tmp_path: Path) -> None:
    ds = make_instance(study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.1")
    assert orthanc_https.upload([write_instance(tmp_path / "1.dcm", ds)]) == 1
    assert orthanc_https.dicomweb_url.startswith("https://127.0.0.1:")
    # New connections each time: Orthanc's TLS used to die after the first handshake.
    answers = [
        httpx.get(
            f"{orthanc_https.dicomweb_url}/studies",
            params={"StudyInstanceUID": STUDY},
            verify=orthanc_https.verify,
        )
        for _ in range(3)
    ]
    assert [r.status_code for r in answers] == [200, 200, 200]
    item = answers[-1].json()[0]
    retrieve = f"{orthanc_https.dicomweb_url}/studies/{STUDY}"
    assert item["00081190"]["Value"] == [retrieve]
    rewriter = UrlRewriter(PUBLIC, orthanc_https.dicomweb_url)
    assert rewriter.url(retrieve) == _old_url(rewriter, retrieve) == f"{PUBLIC}/studies/{STUDY}"
    assert rewriter.dataset(item)["00081190"]["Value"] == [f"{PUBLIC}/studies/{STUDY}"]


def test_https_archive_refuses_plain_http_and_unknown_ca(orthanc_https: OrthancServer) -> None:
    plain = orthanc_https.rest_url.replace("https://", "http://", 1)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/system", timeout=5.0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{orthanc_https.rest_url}/system", timeout=5.0)  # the system CAs only
    assert orthanc_https.http.get("/system").status_code == 200
