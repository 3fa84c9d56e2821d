"""An archive error is not a stale index (issue 13, item 5).

Option A checks a retrieve against the node's index. A transfer that shows the index wrong makes
the gateway list that study at the archive for 10 minutes. After Orthanc failed to transcode one
instance of a study (its answer left it out), that fallback took the archive's failure for a
stale index: the next ``*`` retrieve, which had worked, was checked the archive's way and failed
with 502 for ten minutes. The index is distrusted only when the archive's own listing of the
study disagrees with it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ncp.gateway.dicomjson import element
from ncp.gateway.errors import BadArchiveAnswer, NotFound
from ncp.gateway.relay import Chunk
from ncp.gateway.stream import DicomPart
from tests.gateway_support import (
    AS_STORED,
    ISSUER_OID,
    PATIENT,
    ServedGateway,
    bearer,
    fetch,
    patient_instance,
    serve_gateway,
    token,
)
from tests.support.dicom_factory import encode

STUDY = "1.2.826.0.1.3680043.10.77.50"
SERIES = f"{STUDY}.1"
SOPS = [f"{SERIES}.{n}" for n in (1, 2, 3)]
DEFAULT = 'multipart/related; type="application/dicom"'  # Explicit VR Little Endian


class TranscodeFailingArchive:
    """A DICOMweb archive stand-in: it serves the study as stored, leaves out the instance it
    cannot transcode when another syntax is asked for, and its series listing is what
    ``series_counts`` says (None: the listing itself fails)."""

    kind = "dicomweb"
    archive_base = None

    def __init__(self) -> None:
        self.files = {sop: encode(patient_instance(STUDY, SERIES, sop)) for sop in SOPS}
        self.series_counts: int | None = None
        self.asked: list[str] = []

    async def study(self, study: str, fields: Iterable[str]) -> list[dict[str, Any]]:
        return [
            {
                "0020000D": element("UI", study),
                "00100020": element("LO", PATIENT.value),
                "00100021": element("LO", ISSUER_OID),
            }
        ]

    async def search(
        self, study: str, level: str, series: str | None, fields: Iterable[str]
    ) -> list[dict[str, Any]]:
        if self.series_counts is None:
            raise BadArchiveAnswer("the archive answered HTTP 500")
        return [
            {
                "0020000D": element("UI", study),
                "0020000E": element("UI", SERIES),
                "00201209": element("IS", self.series_counts),
            }
        ]

    async def metadata(self, study: str, series: str | None, sop: str | None) -> list[Any]:
        raise NotFound("not here")

    def stored_syntaxes(self, study: str, series: str | None, sop: str | None) -> set[str] | None:
        return None

    async def retrieve(
        self, study: str, series: str | None, sop: str | None, accept_syntax: str
    ) -> AsyncIterator[DicomPart]:
        self.asked.append(accept_syntax)
        sent = SOPS if accept_syntax == "*" else SOPS[:2]  # the third failed to transcode

        async def body(data: bytes) -> AsyncIterator[Chunk]:
            yield data

        async def parts() -> AsyncIterator[DicomPart]:
            for one in sent:
                yield DicomPart(body(self.files[one]))

        return parts()

    async def raw(self, path: str, accept: str) -> tuple[str, AsyncIterator[Any]]:
        raise NotFound("not here")

    async def aclose(self) -> None:
        return None


class FixedIndex:
    """The node's index: the study's three instances, as ``ncp index`` found them."""

    async def instances(self, study: str) -> dict[str, str] | None:
        return dict.fromkeys(SOPS, SERIES) if study == STUDY else None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[TranscodeFailingArchive, ServedGateway]]:
    archive = TranscodeFailingArchive()
    served = serve_gateway(tmp_path, archive, None, index=FixedIndex())
    try:
        yield archive, served
    finally:
        served.stop()


def _retrieves(served: ServedGateway) -> list[Any]:
    return [r for r in served.audit.records() if r.action == "image-retrieve"]


def _get(served: ServedGateway, accept: str) -> tuple[int, bytes, Exception | None]:
    """A retrieve read to its end; returns once its audit record is written (a broken
    transfer's is written just after the connection is aborted)."""
    before = len(_retrieves(served))
    headers = {**bearer(token(served.base, (STUDY,))), "Accept": accept}
    with httpx.Client(timeout=30.0) as http:
        status, _, body, error = fetch(http, f"{served.base}/studies/{STUDY}", headers)
    deadline = time.monotonic() + 5
    while len(_retrieves(served)) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    return status, body, error


def _last_retrieve(served: ServedGateway) -> Any:
    return _retrieves(served)[-1]


@pytest.mark.parametrize("listing", [None, 3], ids=["listing-fails", "listing-agrees"])
def test_a_failed_transcode_does_not_make_the_index_distrusted(
    rig: tuple[TranscodeFailingArchive, ServedGateway], listing: int | None
) -> None:
    archive, served = rig
    archive.series_counts = listing
    status, body, error = _get(served, DEFAULT)
    assert status == 200 and error is not None, "the transcoded transfer breaks"
    assert b"--\r\n" not in body[-8:]
    assert "of the 3 instances" in (_last_retrieve(served).reason or "")
    status, body, error = _get(served, AS_STORED)
    assert (status, error) == (200, None), body[:300]
    record = _last_retrieve(served)
    assert record.outcome == 0
    assert record.details["listed_by"] == "index"
    assert sorted(record.details["instances"]) == SOPS
    assert archive.asked == ["1.2.840.10008.1.2.1", "*"]


def test_an_index_the_archives_listing_contradicts_is_distrusted(
    rig: tuple[TranscodeFailingArchive, ServedGateway],
) -> None:
    """The archive lists four instances in the series where the index names three: the index
    is stale, and the study is checked the archive's way for a while."""
    archive, served = rig
    archive.series_counts = 4
    status, _, error = _get(served, DEFAULT)
    assert status == 200 and error is not None
    _get(served, AS_STORED)
    assert _last_retrieve(served).details["listed_by"] == "archive"
