"""Test support for the option B viewer: a CT series to look at, launches through A's real
``$imaging-access``, and an HTTPS client of the viewer (a browser has no client certificate).

:func:`write_ct_series` writes an axial chest CT made by ``ncp.examples.phantoms`` (stored
values with Rescale Intercept -1024, a 40/400 window), so tests and screenshots see anatomy,
not noise. :func:`launch_url` asks node A for option B exactly as country B's node does: HP
assertion and TRC signed with B's key, B's client certificate on the standard channel.
"""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from pydicom.dataset import Dataset

from ncp.examples import phantoms
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.node import ISSUER, PATIENTS, RunningNode

CT_STUDY = "1.2.826.0.1.3680043.10.543.100.9"
CT_SERIES = f"{CT_STUDY}.1"
CT_LOCALIZER = f"{CT_STUDY}.2"
CT_ACCESSION = "ACCVIEW9"


def ct_slices(n: int, size: int, seed: int = 7) -> np.ndarray:
    """``n`` axial chest slices in stored values (HU + 1024, 12 bits)."""
    rng = np.random.default_rng(seed)
    hu = phantoms.ct_volume("CHEST", "AXIAL", n, size, size, rng)
    return np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)


def ct_instance(
    pixels: np.ndarray,
    *,
    number: int,
    study: str = CT_STUDY,
    series: str = CT_SERIES,
    patient: str = "PAT100",
    **attrs: Any,
) -> Dataset:
    person = PATIENTS[patient]
    rows, cols = pixels.shape
    values: dict[str, Any] = {
        "SeriesNumber": 2,
        "SeriesDescription": "Thorax 5.0 B31f",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "WindowCenter": 40,
        "WindowWidth": 400,
        **attrs,
    }
    ds = make_instance(
        patient_id=patient,
        study_uid=study,
        series_uid=series,
        sop_uid=f"{series}.{number}",
        PatientName=f"{person.family}^{person.given}",
        PatientBirthDate=(person.birth_date or "").replace("-", "") or None,
        PatientSex=person.sex,
        IssuerOfPatientID=ISSUER,
        AccessionNumber=CT_ACCESSION,
        StudyDescription="CT Thorax mit KM",
        InstitutionName="LKH Graz",
        InstanceNumber=number,
        Rows=rows,
        Columns=cols,
        BitsStored=12,
        HighBit=11,
        RescaleIntercept=-1024,
        RescaleSlope=1,
        RescaleType="HU",
        PixelSpacing=[0.7, 0.7],
        SliceThickness=5.0,
        SliceLocation=-5.0 * number,
        **values,
    )
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_ct_series(folder: Path, n: int = 24, size: int = 256) -> np.ndarray:
    """An axial CT series of PAT100 (study :data:`CT_STUDY`) and a one-image localizer
    series; returns the axial stored values (n x size x size)."""
    volume = ct_slices(n, size)
    for i, plane in enumerate(volume, start=1):
        write_instance(folder / "PAT100" / f"ct-{i:03d}.dcm", ct_instance(plane, number=i))
    scout = ct_slices(1, size, seed=3)[0]
    write_instance(
        folder / "PAT100" / "ct-scout.dcm",
        ct_instance(
            scout,
            number=1,
            series=CT_LOCALIZER,
            SeriesNumber=1,
            SeriesDescription="Topogramm",
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
            WindowCenter=-400,
            WindowWidth=1400,
        ),
    )
    return volume


def launch_url(
    node: RunningNode,
    studies: list[str],
    *,
    patient: str = "PAT100",
    locale: str = "en",
    **iid: str,
) -> str:
    """A fresh launch URL from A's ``$imaging-access`` (option B), IID parameters appended."""
    hp = node.b.hp_assertion(preferred_language=locale)
    headers = node.b.headers(patient, hp=hp)
    body = {
        "resourceType": "Parameters",
        "parameter": [
            *({"name": "study", "valueString": uid} for uid in studies),
            {"name": "option", "valueCode": "B"},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }
    with node.client() as http:
        answer = http.post("/fhir/$imaging-access", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    url = next(p["valueUrl"] for p in answer.json()["parameter"] if p["name"] == "viewer")
    for name, value in iid.items():
        url += f"&{name}={quote(value, safe=',')}"
    return str(url)


def viewer_client(node: RunningNode) -> httpx.Client:
    """A browser-like HTTPS client of the viewer: A's CA trusted, no client certificate, no
    redirects followed (tests look at each answer)."""
    assert node.viewer_url is not None
    context = ssl.create_default_context(cafile=node.ca_file)
    origin = node.viewer_url.rsplit("/viewer", 1)[0]
    return httpx.Client(
        verify=context,
        base_url=origin,
        timeout=20.0,
        follow_redirects=False,
        headers={"X-Request-ID": f"viewer-test-{uuid.uuid4()}"},
    )


def path_of(url: str) -> str:
    """The path and query of an absolute URL (what a client of the viewer's origin asks)."""
    return "/" + url.split("://", 1)[1].split("/", 1)[1]
