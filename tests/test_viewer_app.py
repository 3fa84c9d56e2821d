"""The viewer app as B's portal mounts it: over a folder of pulled studies (scanned, not
indexed), behind the portal's own login (an authorisation dependency), auditing on the
consumer side. And, whoever mounts it: no route ever answers DICOM, path tricks are refused
and audited, a study not granted is refused and audited, frames are counted, not recorded
one by one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from starlette.requests import Request
from starlette.routing import Route

from ncp.audit.models import AuditRecord, Side
from ncp.audit.record import Auditor
from ncp.config import ViewerSection
from ncp.dicom.folder import FolderSource
from ncp.store.db import make_engine, migrate, session_factory
from ncp.viewer.access import ViewerGrant, ViewerRefused
from ncp.viewer.app import build_viewer_app
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.frames import ScanCatalogue, frame_source
from ncp.viewer.render import Window, render
from ncp.viewer.render_service import RenderService
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.viewer import CT_LOCALIZER, CT_SERIES, CT_STUDY, ct_instance, write_ct_series

OTHER_STUDY = "1.2.826.0.1.3680043.10.543.200.1"
MULTI_SOP = f"{OTHER_STUDY}.1.1"
BROKEN_SOP = f"{OTHER_STUDY}.1.2"


class Portal:
    """What B's portal gives the viewer: its logged-in HP and the studies their jobs stored."""

    def __init__(self) -> None:
        self.studies = frozenset({CT_STUDY, OTHER_STUDY})

    async def __call__(self, request: Request) -> ViewerGrant:
        who = request.headers.get("x-portal-user")
        if who is None:
            raise ViewerRefused(401, "log in to the portal first")
        return ViewerGrant(session=f"portal-{who}", subject=who, studies=self.studies, locale="fr")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """B's local store: the CT study and a study with a multi-frame image and a broken one."""
    folder = tmp_path / "retrieved"
    write_ct_series(folder, n=6, size=64)
    frames = np.stack([np.full((16, 16), 100 * (i + 1), np.uint16) for i in range(3)])
    multi = make_instance(
        study_uid=OTHER_STUDY,
        series_uid=f"{OTHER_STUDY}.1",
        sop_uid=MULTI_SOP,
        Rows=16,
        Columns=16,
        NumberOfFrames=3,
        WindowCenter=200,
        WindowWidth=400,
    )
    multi.PixelData = frames.tobytes()
    write_instance(folder / "other" / "multi.dcm", multi)
    broken = make_instance(
        study_uid=OTHER_STUDY, series_uid=f"{OTHER_STUDY}.1", sop_uid=BROKEN_SOP, InstanceNumber=2
    )
    broken.PixelData = b"\x00" * 10  # far too short for 8 x 8 x 16 bits
    write_instance(folder / "other" / "broken.dcm", broken)
    return folder


@pytest.fixture
def portal(tmp_path: Path, store: Path) -> Iterator[tuple[TestClient, Any, Portal]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    auditor = Auditor(sessions, country="BE")
    source = frame_source(FolderSource(store))
    assert isinstance(getattr(source, "catalogue", None), ScanCatalogue)
    gate = Portal()
    viewer = build_viewer_app(
        service=RenderService(source, memory_bytes=1 << 24),
        authorise=gate,
        audit=ViewAudit(auditor, Side.CONSUMER, idle_s=3600),
        settings=ViewerSection(max_parts=50),
    )
    app = FastAPI()
    app.mount("/viewer", viewer)
    with TestClient(app, base_url="https://portal.be.test") as client:
        client.headers["x-portal-user"] = "hp-42"
        yield client, sessions, gate
    engine.dispose()


def records(sessions: Any) -> list[AuditRecord]:
    with sessions() as session:
        return list(session.scalars(select(AuditRecord).order_by(AuditRecord.seq)))


def test_b_mounts_the_viewer_behind_its_login(portal: Any) -> None:
    client, sessions, _ = portal
    page = client.get("/viewer/")
    assert page.status_code == 200 and 'src="static/viewer.js' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and " style=" not in page.text
    context = client.get("/viewer/context").json()
    assert context["language"] == "fr" and context["labels"]["studies"] == "Examens"
    assert context["displays"]["modality"]["CT"] == "Tomodensitométrie"
    studies = client.get("/viewer/studies").json()
    assert {s["0020000D"]["Value"][0] for s in studies} == {CT_STUDY, OTHER_STUDY}
    # Without the portal's login nothing is served, and the refusal is B's audit record.
    anonymous = client.get("/viewer/studies", headers={"x-portal-user": ""})
    assert anonymous.status_code == 200  # an empty user is still a user of this fake portal
    del client.headers["x-portal-user"]
    refused = client.get(f"/viewer/studies/{CT_STUDY}/thumbnail")
    assert refused.status_code == 401
    last = records(sessions)[-1]
    assert (last.action, last.side, last.outcome) == ("refusal", "consumer", 8)


def test_series_thumbnail_and_a_frame_rendered_with_a_window(portal: Any) -> None:
    client, _, _ = portal
    series = client.get(f"/viewer/studies/{CT_STUDY}/series").json()
    assert [s["0020000E"]["Value"][0] for s in series] == [CT_LOCALIZER, CT_SERIES]
    thumb = client.get(f"/viewer/studies/{CT_STUDY}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)
    instances = client.get(f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances").json()
    assert len(instances) == 6 and "7FE00010" not in instances[0]
    sop = instances[2]["00080018"]["Value"][0]
    url = f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{sop}/frames/1/rendered"
    shown = client.get(url, params={"window": "-600,1500", "accept": "image/png"})
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(shown.content)))
    from tests.support.viewer import ct_slices

    stored = ct_slices(6, 64)[2]
    expected = render(ct_instance(stored, number=3), stored, Window(-600, 1500))
    assert np.array_equal(pixels, expected)
    assert shown.headers["cache-control"] == "no-store"


def test_multi_frame_frames_and_multipart_answers(portal: Any) -> None:
    client, _, _ = portal
    base = f"/viewer/studies/{OTHER_STUDY}/series/{OTHER_STUDY}.1/instances/{MULTI_SOP}"
    one = client.get(f"{base}/frames/2/rendered", params={"accept": "image/png"})
    assert np.asarray(Image.open(io.BytesIO(one.content))).mean() == pytest.approx(
        render(make_instance(WindowCenter=200, WindowWidth=400), np.array([[200]], np.uint16))[
            0, 0
        ],
        abs=0.5,
    )
    several = client.get(f"{base}/frames/1,3/rendered")
    assert several.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    assert several.content.count(b"Content-Type: image/jpeg") == 2
    whole = client.get(f"{base}/rendered")
    assert whole.content.count(b"Content-Type: image/jpeg") == 3
    beyond = client.get(f"{base}/frames/4/rendered")
    assert beyond.status_code == 404


def test_an_image_that_cannot_be_decoded_is_a_placeholder_not_an_error(portal: Any) -> None:
    client, _, _ = portal
    url = f"/viewer/studies/{OTHER_STUDY}/series/{OTHER_STUDY}.1/instances/{BROKEN_SOP}/rendered"
    shown = client.get(url, params={"accept": "image/png"})
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert "cannot be displayed" in shown.headers["warning"]
    sign = np.asarray(Image.open(io.BytesIO(shown.content)))
    assert sign.max() > 200  # the words are drawn


def test_a_study_not_granted_is_refused_and_audited(portal: Any, tmp_path: Path) -> None:
    client, sessions, gate = portal
    gate.studies = frozenset({OTHER_STUDY})
    for url in (
        f"/viewer/studies/{CT_STUDY}/series",
        f"/viewer/studies/{CT_STUDY}/thumbnail",
        f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/rendered",
    ):
        answer = client.get(url)
        assert answer.status_code == 403, url
        last = records(sessions)[-1]
        assert last.action == "refusal" and last.studies == [CT_STUDY]
        assert "does not cover" in (last.reason or "")
    assert {s["0020000D"]["Value"][0] for s in client.get("/viewer/studies").json()} == {
        OTHER_STUDY
    }


TRICKS = [
    f"/viewer/studies/{CT_STUDY}/series/%2e%2e/rendered",
    f"/viewer/studies/{CT_STUDY}%2Fseries/{CT_SERIES}/rendered",
    f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/..%2F..%2Fetc%2Fpasswd/rendered",
    "/viewer/studies/1.2.3%00/rendered",
    f"/viewer/studies/{CT_STUDY}//series/rendered",
    f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/x/frames/1/rendered",
    "/viewer/studies/1..2/thumbnail",
    f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SERIES}.1/frames/0/rendered",
    f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SERIES}.1/frames/-1/rendered",
    "/viewer/static/../app.py",
    "/viewer/static/viewer.py",
    f"/viewer/studies/{CT_STUDY}/rendered?viewport=99999,1",
    f"/viewer/studies/{CT_STUDY}/thumbnail?window=1,1",
    f"/viewer/studies/{CT_STUDY}/series?PatientID=*",
]


@pytest.mark.parametrize("path", TRICKS)
def test_path_tricks_are_refused_and_audited(portal: Any, path: str) -> None:
    client, sessions, _ = portal
    before = len(records(sessions))
    answer = client.get(path)
    assert answer.status_code in (400, 404), (path, answer.status_code)
    assert answer.headers["content-type"].startswith("text/plain")
    new = records(sessions)[before:]
    assert len(new) == 1 and new[0].action == "refusal" and new[0].outcome == 8
    assert new[0].details["status"] == answer.status_code


def test_frames_are_counted_in_one_record_per_study(portal: Any) -> None:
    client, sessions, _ = portal
    viewer_app = client.app.routes[-1].app  # type: ignore[attr-defined]
    audit: ViewAudit = viewer_app.state.viewer.audit
    instances = client.get(f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances").json()
    before = len(records(sessions))
    for item in instances:
        sop = item["00080018"]["Value"][0]
        for window in ("40,400", "-600,1500"):
            url = f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{sop}/frames/1/rendered"
            assert client.get(url, params={"window": window}).status_code == 200
    client.get(f"/viewer/studies/{CT_STUDY}/thumbnail")
    opened = records(sessions)[before:]
    assert [(r.action, r.details["phase"]) for r in opened] == [("image-view", "opened")]
    import asyncio

    assert asyncio.run(audit.flush(everything=True)) == 1
    [viewed] = records(sessions)[before + 1 :]
    assert viewed.action == "image-view" and viewed.side == "consumer"
    assert viewed.details["frames"] == 12 and viewed.details["thumbnails"] == 1
    assert viewed.num_instances == 6  # the thumbnail shows one of the six axial images
    assert viewed.actor_id == "hp-42" and viewed.studies == [CT_STUDY]


# -- every route, every way of asking: never DICOM ---------------------------------------------

DICOM_ACCEPTS = [
    None,
    "application/dicom",
    'multipart/related; type="application/dicom"',
    'multipart/related; type="application/octet-stream"',
    "application/octet-stream",
    "application/dicom+json",
    "*/*",
    "image/*",
]
FORBIDDEN_TYPES = ("application/dicom", "application/octet-stream")


def _fill(path: str) -> list[str]:
    """Concrete paths for a route template, with values that exist in the store."""
    values = {
        "study": [CT_STUDY, OTHER_STUDY],
        "series": [CT_SERIES, f"{OTHER_STUDY}.1"],
        "sop": [f"{CT_SERIES}.1", MULTI_SOP, BROKEN_SOP],
        "frames": ["1", "1,2"],
        "name": ["viewer.js", "viewer.css"],
        "rest": ["studies/x/bulk/7FE00010", "studies/1.2/series/1.2/instances/1.2/bulkdata"],
    }
    found = [path]
    for name, options in values.items():
        token = re.compile(r"\{" + name + r"(:[^}]*)?\}")
        found = (
            [token.sub(option, p) for p in found for option in options]
            if any(token.search(p) for p in found)
            else found
        )
    return found


def test_no_route_of_the_viewer_ever_answers_dicom(portal: Any) -> None:
    client, _, _ = portal
    viewer_app = client.app.routes[-1].app  # type: ignore[attr-defined]
    templates = [r.path for r in viewer_app.routes if isinstance(r, Route)]
    expected = {
        "/", "/static/{name}", "/context", "/initial", "/studies", "/studies/{study}/series",
        "/studies/{study}/first-image", "/studies/{study}/series/{series}/instances",
        "/{rest:path}",
    }  # fmt: skip
    levels = [
        "/studies/{study}",
        "/studies/{study}/series/{series}",
        "/studies/{study}/series/{series}/instances/{sop}",
        "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    ]
    expected |= {f"{level}/{kind}" for level in levels for kind in ("rendered", "thumbnail")}
    # A new route must be added here, and so be walked below.
    assert set(templates) == expected
    asked = 0
    for template in templates:
        for path in _fill(template):
            for accept in DICOM_ACCEPTS:
                for params in ({}, {"accept": accept} if accept else {}):
                    headers = {"Accept": accept} if accept else {}
                    answer = client.get("/viewer" + path, headers=headers, params=params)
                    asked += 1
                    kind = answer.headers.get("content-type", "")
                    media = kind.split(";")[0].strip().lower()
                    assert media not in FORBIDDEN_TYPES, (path, accept, kind)
                    assert 'type="application/dicom"' not in kind
                    assert "transfer-syntax" not in kind
                    body = answer.content
                    assert b"DICM" not in body[:200], (path, accept)
                    assert b"application/dicom\r" not in body
                    if answer.status_code == 200:
                        allowed = ("image/", "multipart/related; type=\"image/", "text/",
                                   "application/json", "application/dicom+json")  # fmt: skip
                        assert kind.startswith(allowed), (path, kind)
    assert asked > 300


def test_no_answer_carries_the_stored_pixel_bytes(portal: Any, store: Path) -> None:
    """The raw pixel data of each stored file appears in no answer of any route."""
    client, _, _ = portal
    import pydicom

    samples = []
    for path in sorted(store.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        data = bytes(ds.PixelData)
        if len(data) >= 64:
            samples.append(data[len(data) // 2 : len(data) // 2 + 32])
    viewer_app = client.app.routes[-1].app  # type: ignore[attr-defined]
    for template in [r.path for r in viewer_app.routes if isinstance(r, Route)]:
        for path in _fill(template):
            for params in ({}, {"accept": "image/png"}):
                body = client.get("/viewer" + path, params=params).content
                for sample in samples:
                    assert sample not in body, path
