"""What the viewer still lacked: refusals in the HP's language, the cine speed of a series and
non-square pixels shown with their aspect (the logout is tested at A, in
``test_viewer_launch.py``, and in Chromium).
"""

from __future__ import annotations

import ast
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
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select
from starlette.requests import Request

import ncp.viewer
from ncp.audit.models import AuditRecord, Side
from ncp.audit.record import Auditor
from ncp.dicom.folder import FolderSource
from ncp.store.db import make_engine, migrate, session_factory
from ncp.viewer import i18n
from ncp.viewer.access import ViewerGrant, ViewerRefused
from ncp.viewer.app import build_viewer_app
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.dicomjson import instance_json
from ncp.viewer.frames import ImageRef, frame_source
from ncp.viewer.render import pixel_aspect
from ncp.viewer.render_output import Viewport, fit
from ncp.viewer.render_service import RenderService
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.viewer import CT_SERIES, CT_STUDY, write_ct_series

VIEWER = Path(ncp.viewer.__file__).parent
OTHER = "1.2.826.0.1.3680043.10.543.300.1"
NOT_GRANTED = "1.2.826.0.1.3680043.10.543.300.2"
FIELDS = re.compile(r"\{(\w+)\}")


# -- refusals in the HP's language -------------------------------------------------------------


def _raised_reasons() -> set[str]:
    """Every reason the viewer's code raises or returns as a refusal, as written there."""
    found: set[str] = set()
    for path in VIEWER.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                position = {"ViewerRefused": 1, "BadParameter": 0, "NotAcceptable": 0}.get(name)
                if position is not None and len(node.args) > position:
                    reason = node.args[position]
                    if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                        found.add(reason.value)
            if isinstance(node, ast.FunctionDef) and node.name in ("_readable", "_path_trick"):
                for returned in ast.walk(node):
                    if isinstance(returned, ast.Return) and returned.value is not None:
                        value = returned.value
                        if isinstance(value, ast.Tuple):
                            value = value.elts[0]
                        if isinstance(value, ast.Constant) and isinstance(value.value, str):
                            found.add(value.value)
    return found


def test_every_refusal_the_viewer_raises_is_in_the_catalogue() -> None:
    raised = _raised_reasons()
    assert len(raised) > 40
    missing = sorted(raised - set(i18n.REASONS))
    assert missing == [], missing
    for reason, said in i18n.REASONS.items():
        assert set(said) == {"de", "fr"}, reason
        for language, text in said.items():
            assert set(FIELDS.findall(text)) == set(FIELDS.findall(reason)), (reason, language)
            assert text != reason, (reason, language)
    # Nothing in the catalogue that the code no longer says.
    stale = sorted(set(i18n.REASONS) - raised - {"the audit record could not be written"})
    assert stale == [], stale


def test_a_reason_is_said_in_the_language_asked_and_english_otherwise() -> None:
    refusal = ViewerRefused(404, "the image has {frames} frame(s)", params={"frames": 3})
    assert refusal.reason == "the image has 3 frame(s)"  # what the audit keeps
    assert refusal.said_in("de-AT") == "Das Bild hat 3 Frame(s)"
    assert refusal.said_in("fr") == "l'image a 3 trame(s)"
    assert refusal.said_in("it") == "the image has 3 frame(s)"
    own = ViewerRefused(401, "log in to the portal first")  # a portal's own words
    assert own.said_in("fr") == "log in to the portal first"


class Portal:
    def __init__(self, locale: str) -> None:
        self.locale = locale

    async def __call__(self, request: Request) -> ViewerGrant:
        if request.headers.get("x-portal-user") is None:
            raise ViewerRefused(401, "log in to the portal first")
        studies = frozenset({CT_STUDY, OTHER})
        return ViewerGrant(session="portal-s", subject="hp-7", studies=studies, locale=self.locale)


@pytest.fixture
def b_viewer(tmp_path: Path) -> Iterator[tuple[TestClient, Any, Path]]:
    folder = tmp_path / "store"
    write_ct_series(folder, n=3, size=32)
    broken = make_instance(study_uid=OTHER, series_uid=f"{OTHER}.1", sop_uid=f"{OTHER}.1.1")
    broken.PixelData = b"\0" * 6
    write_instance(folder / "other" / "broken.dcm", broken)
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    app = build_viewer_app(
        service=RenderService(frame_source(FolderSource(folder)), memory_bytes=1 << 22),
        authorise=Portal("fr-BE"),
        audit=ViewAudit(Auditor(sessions, country="BE"), Side.CONSUMER),
    )
    mounted = FastAPI()
    mounted.mount("/viewer", app)
    with TestClient(mounted, base_url="https://portal.be.test") as client:
        client.headers["x-portal-user"] = "hp-7"
        yield client, sessions, folder
    engine.dispose()


def _last(sessions: Any) -> AuditRecord:
    with sessions() as session:
        return session.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc())).first()


def test_refusals_speak_the_hps_language_and_the_audit_keeps_english(b_viewer: Any) -> None:
    client, sessions, _ = b_viewer
    refused = client.get(f"/viewer/studies/{NOT_GRANTED}/thumbnail")
    assert refused.status_code == 403
    assert refused.text.strip() == "cette session ne couvre pas l'examen demandé"
    assert refused.headers["content-language"] == "fr"
    assert _last(sessions).reason == "403: this session does not cover the study asked for"
    frames = client.get(
        f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SERIES}.1/frames/9/rendered"
    )
    assert frames.status_code == 404 and frames.text.strip() == "l'image a 1 trame(s)"
    bad = client.get(f"/viewer/studies/{CT_STUDY}/rendered", params={"viewport": "0,10"})
    assert bad.status_code == 400 and "doivent aller de 1 à 4096" in bad.text
    region = f"/viewer/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SERIES}.1/rendered"
    outside = client.get(region, params={"viewport": "10,10,500,500,5,5"})
    assert outside.status_code == 400 and "hors de l'image" in outside.text  # not a 500
    dicom = client.get(region, headers={"Accept": "application/dicom"})
    assert dicom.status_code == 406 and "jamais en DICOM" in dicom.text


def test_before_anyone_is_known_the_browser_language_is_used(b_viewer: Any) -> None:
    client, sessions, _ = b_viewer
    trick = client.get(
        f"/viewer/studies/{CT_STUDY}/series/%2e%2e/rendered",
        headers={"Accept-Language": "de-DE,de;q=0.9,en;q=0.5"},
    )
    assert trick.status_code == 400
    assert trick.text.strip() == "Der Pfad enthält prozentkodierte Zeichen"
    assert _last(sessions).reason == "400: percent-encoded characters in the path"


def test_the_placeholder_says_why_in_the_hps_language(
    b_viewer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, _ = b_viewer
    import ncp.viewer.render_service as service_module

    drawn: list[list[str]] = []
    real = service_module.placeholder

    def spy(width: int, height: int, lines: list[str]) -> Any:
        drawn.append(lines)
        return real(width, height, lines)

    monkeypatch.setattr(service_module, "placeholder", spy)
    shown = client.get(f"/viewer/studies/{OTHER}/series/{OTHER}.1/instances/{OTHER}.1.1/rendered")
    assert shown.status_code == 200 and "cannot be displayed" in shown.headers["warning"]
    assert drawn and drawn[-1][0] == "Cette image ne peut pas être affichée"


# -- cine speed and pixel aspect: what the page is told ------------------------------------------


def _image(**attrs: Any) -> ImageRef:
    ds = make_instance(**attrs)
    del ds.PixelData
    return ImageRef("1.2", "1.2.3", "1.2.3.4", "x", "1.2.840.10008.1.2.1", ds)


def test_the_page_is_told_a_series_cine_speed_and_pixel_shape() -> None:
    item = instance_json(
        _image(
            RecommendedDisplayFrameRate=25,
            CineRate=30,
            FrameTime=40.0,
            PixelAspectRatio=[2, 1],
            ImagerPixelSpacing=[0.2, 0.1],
        )
    )
    assert item["00082144"]["Value"] == [25]
    assert item["00180040"]["Value"] == [30]
    assert item["00181063"]["Value"] == [40.0]
    assert item["00280034"]["Value"] == [2, 1]
    assert item["00181164"]["Value"] == [0.2, 0.1]


# -- non-square pixels --------------------------------------------------------------------------


def test_pixel_aspect_from_spacing_imager_spacing_functional_groups_or_ratio() -> None:
    assert pixel_aspect(make_instance()) == 1.0
    assert pixel_aspect(make_instance(PixelSpacing=[0.5, 0.25])) == 2.0
    assert pixel_aspect(make_instance(ImagerPixelSpacing=[0.1, 0.2])) == 0.5
    assert pixel_aspect(make_instance(PixelAspectRatio=[4, 3])) == pytest.approx(4 / 3)
    # Pixel Spacing wins over the ratio; a ratio within a thousandth of 1 is square.
    assert pixel_aspect(make_instance(PixelSpacing=[1, 1.0005], PixelAspectRatio=[2, 1])) == 1.0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.9, 0.3]
    shared.PixelMeasuresSequence = Sequence([measures])
    enhanced = make_instance()
    enhanced.SharedFunctionalGroupsSequence = Sequence([shared])
    assert pixel_aspect(enhanced) == pytest.approx(3.0)
    # Nonsense is read as square, extremes are bounded.
    assert pixel_aspect(make_instance(PixelAspectRatio=[0, 1])) == 1.0
    assert pixel_aspect(make_instance(PixelAspectRatio=[1000, 1])) == 10.0


def test_a_viewport_sized_image_shows_non_square_pixels_with_their_aspect() -> None:
    image = np.zeros((32, 64), np.uint8)  # 64 columns, 32 rows of pixels twice as tall
    assert fit(image, Viewport(128, 128), aspect=2.0).shape == (128, 128)
    assert fit(image, Viewport(128, 128)).shape == (64, 128)
    assert fit(image, None, aspect=2.0).shape == (32, 64)  # no viewport: the pixels as stored
    assert fit(image, Viewport(100, 50, (0, 0, 32, 32)), aspect=2.0).shape == (50, 25)


def test_a_thumbnail_of_non_square_pixels_keeps_their_shape(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    wide = make_instance(
        study_uid=OTHER, series_uid=f"{OTHER}.1", sop_uid=f"{OTHER}.1.1", Rows=32, Columns=64,
        PixelSpacing=[1.0, 0.5], WindowCenter=100, WindowWidth=200,
    )  # fmt: skip
    wide.PixelData = np.full((32, 64), 100, np.uint16).tobytes()
    write_instance(folder / "wide.dcm", wide)
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    app = build_viewer_app(
        service=RenderService(frame_source(FolderSource(folder)), memory_bytes=1 << 22),
        authorise=Portal("en"),
        audit=ViewAudit(Auditor(session_factory(engine), country="BE"), Side.CONSUMER),
    )
    with TestClient(app, base_url="https://b.test") as client:
        client.headers["x-portal-user"] = "hp"
        thumb = client.get(f"/studies/{OTHER}/thumbnail")
        assert thumb.status_code == 200, thumb.text
        # 64 x 32 pixels of 0.5 x 1.0 mm: 32 x 32 mm, a square thumbnail.
        assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)
        full = client.get(f"/studies/{OTHER}/series/{OTHER}.1/instances/{OTHER}.1.1/rendered")
        assert full.status_code == 200, (full.status_code, full.headers, full.text[:300])
        assert Image.open(io.BytesIO(full.content)).size == (64, 32)  # as stored
    engine.dispose()
