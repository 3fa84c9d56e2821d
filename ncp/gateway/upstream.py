"""The archive side of a gateway: a DICOMweb archive (Orthanc, dcm4chee, a cloud archive) or a
folder of files (``ncp.gateway.catalogue``), behind one asynchronous interface.

Every UID that goes into an archive URL has passed :func:`ncp.dicom.uids.is_uid` (digits and
dots): no caller value ever reaches the archive as a matching key, so the archive's loose
matching (Orthanc: case-insensitive, ``*`` and ``?`` wildcards) cannot widen an answer. The
archive's answers are checked again on our side by the callers (``qido.py``, ``wado.py``).

Failures before an answer starts become gateway errors: the archive slow to answer or down is
503 with Retry-After; an answer that is not what was asked is 502. After the answer started,
every failure is :class:`~ncp.gateway.errors.StreamBroken`.

Small JSON answers (QIDO, metadata) and frames or bulk data go through one pooled httpx client;
the retrieve of instances from a plain ``http://`` archive (the bulk of the bytes) is read
through :func:`ncp.gateway.relay.open_upstream`: a raw socket, 1 MiB reads, the archive's
framing checked, the parts passed on as views into what was read (decision 0006).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx

from ncp.config import ArchiveSection, FolderArchive
from ncp.dicom.uids import is_uid
from ncp.errors import ConfigError
from ncp.gateway.dicomjson import SERIES_UID, SOP_UID, STUDY_UID, single_text
from ncp.gateway.errors import (
    BadArchiveAnswer,
    BadRequest,
    GatewayError,
    NotAcceptable,
    NotFound,
    StreamBroken,
    Unavailable,
)
from ncp.gateway.multipart import (
    Buffer,
    MultipartError,
    MultipartReader,
    boundary_of,
    content_type,
    safe_header_value,
)
from ncp.gateway.relay import ArchiveUnavailable, TransferBroken, Upstream, open_upstream
from ncp.gateway.stream import DicomPart

Level = Literal["series", "instances"]
RawPart = tuple[str, AsyncIterator[Buffer]]
"""A part of a frames or bulk data answer: its media type and its body."""


class GatewayArchive(Protocol):
    """What a gateway needs of an archive. Every method takes UIDs already checked."""

    kind: str
    archive_base: str | None
    """The archive's DICOMweb base (its URLs are rewritten), None for a folder."""

    async def study(self, study: str, fields: Iterable[str]) -> list[dict[str, Any]]:
        """Study-level QIDO answer for one Study Instance UID (exact match checked by caller)."""
        ...

    async def search(
        self, study: str, level: Level, series: str | None, fields: Iterable[str]
    ) -> list[dict[str, Any]]:
        """Series of a study, or instances of a study or of one of its series."""
        ...

    async def metadata(self, study: str, series: str | None, sop: str | None) -> list[Any]: ...

    def stored_syntaxes(self, study: str, series: str | None, sop: str | None) -> set[str] | None:
        """Transfer syntaxes the target's instances are stored in, when known without asking
        (folder; NotFound when the target is not in the study), else None."""
        ...

    async def retrieve(
        self, study: str, series: str | None, sop: str | None, accept_syntax: str
    ) -> AsyncIterator[DicomPart]:
        """The stored instances, as ``accept_syntax`` (a UID or ``*``: as stored)."""
        ...

    async def raw(self, path: str, accept: str) -> tuple[str, AsyncIterator[RawPart]]:
        """Frames or bulk data below a checked instance path: (media type, parts)."""
        ...

    async def warm(self) -> None:
        """Make what the first request needs before the gateway serves (a folder's catalogue)."""
        ...

    async def aclose(self) -> None: ...


_KEEPALIVE = 8
"""Archive connections kept alive between requests (searches across studies use up to 8)."""
_MAX_PAGES = 1000
"""Pages of one study's series or instance list asked for at most."""


def _check(*uids: str | None) -> None:
    for uid in uids:
        if uid is not None and not is_uid(uid):
            raise BadRequest("not a DICOM UID")


class DicomwebUpstream:
    """A DICOMweb archive, asked with one pooled asynchronous HTTP client."""

    kind = "dicomweb"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        retry_after_s: int,
        chunk_bytes: int,
        headers: dict[str, str] | None = None,
        max_connections: int = 64,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ConfigError(f"DICOMweb archive URL must be http(s)://host[:port]/path: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("DICOMweb archive URL must not carry credentials")
        self.archive_base: str | None = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.chunk_bytes = chunk_bytes
        # identity: the bytes relayed are the stored bytes, never a compressed stream.
        self._headers = {**(headers or {}), "Accept-Encoding": "identity"}
        self._raw_retrieve = parts.scheme == "http"  # the relay reads plain HTTP only
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s),
            headers=self._headers,
            follow_redirects=False,
            # Each kept-alive connection holds one of Orthanc's HTTP threads (docs/gateway.md).
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=_KEEPALIVE
            ),
        )

    async def warm(self) -> None:
        return None  # nothing to build: every answer is the archive's

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the answer before streaming ------------------------------------------------------

    async def _open(
        self, path: str, accept: str, params: list[tuple[str, str]] | None = None
    ) -> httpx.Response:
        query: list[tuple[str, str | int | float | bool | None]] = list(params or [])
        request = self._http.build_request("GET", path, params=query, headers={"Accept": accept})
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException:
            raise Unavailable(
                f"the archive did not answer within {self.timeout_s:g} s",
                retry_after_s=self.retry_after_s,
            ) from None
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"the archive cannot be reached ({type(exc).__name__})",
                retry_after_s=self.retry_after_s,
            ) from None
        if response.status_code in (200, 204):
            return response
        await response.aclose()
        raise self._status_error(response.status_code)

    def _status_error(self, status: int) -> GatewayError:
        if status == 404:
            return NotFound("not found in the archive")
        if status == 406:
            return NotAcceptable("the archive cannot serve the representation asked for")
        if status in (429, 503):
            return Unavailable("the archive is busy", retry_after_s=self.retry_after_s)
        if status == 400:
            return BadArchiveAnswer("the archive refused the request (400)")
        return BadArchiveAnswer(f"the archive answered HTTP {status}")

    async def _json(self, path: str, params: list[tuple[str, str]] | None = None) -> list[Any]:
        response = await self._open(path, "application/dicom+json", params)
        try:
            if response.status_code == 204:
                return []
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"the archive failed while answering ({type(exc).__name__})",
                retry_after_s=self.retry_after_s,
            ) from None
        finally:
            await response.aclose()
        try:
            data = json.loads(body) if body.strip() else []
        except ValueError:
            raise BadArchiveAnswer("the archive's answer is not DICOM JSON") from None
        if not isinstance(data, list):
            raise BadArchiveAnswer("the archive's answer is not a JSON array of data sets")
        return data

    # -- QIDO and metadata ---------------------------------------------------------------------

    async def study(self, study: str, fields: Iterable[str]) -> list[dict[str, Any]]:
        _check(study)
        params = [("StudyInstanceUID", study), *(("includefield", f) for f in sorted(fields))]
        return [d for d in await self._json("/studies", params) if isinstance(d, dict)]

    async def search(
        self, study: str, level: Level, series: str | None, fields: Iterable[str]
    ) -> list[dict[str, Any]]:
        _check(study, series)
        if level == "series":
            path = f"/studies/{study}/series"
        elif series is None:
            path = f"/studies/{study}/instances"
        else:
            path = f"/studies/{study}/series/{series}/instances"
        params = [("includefield", f) for f in sorted(fields)]
        # Paged (PS3.18 8.3.4.4): an archive that caps results (Orthanc's LimitFindResults)
        # would otherwise make a long list short. Asked on until a page brings nothing new;
        # one more small search when the archive gave everything at once.
        key = SERIES_UID if level == "series" else SOP_UID
        found: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            offset = [("offset", str(len(found)))] if found else []
            page = [d for d in await self._json(path, params + offset) if isinstance(d, dict)]
            new = {k for d in page if (k := single_text(d, key)) is not None} - seen
            if not new:
                break
            seen |= new
            found += page
        return found

    async def metadata(self, study: str, series: str | None, sop: str | None) -> list[Any]:
        _check(study, series, sop)
        return await self._json(_path(study, series, sop) + "/metadata")

    def stored_syntaxes(self, study: str, series: str | None, sop: str | None) -> set[str] | None:
        return None

    # -- streamed answers ------------------------------------------------------------------

    async def retrieve(
        self, study: str, series: str | None, sop: str | None, accept_syntax: str
    ) -> AsyncIterator[DicomPart]:
        _check(study, series, sop)
        if accept_syntax != "*":
            _check(accept_syntax)
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={accept_syntax}'
        if self._raw_retrieve:
            return await self._retrieve_raw(_path(study, series, sop), accept)
        response = await self._open(_path(study, series, sop), accept)
        reader = self._reader(response)

        async def parts() -> AsyncIterator[DicomPart]:
            try:
                while await reader.next_part() is not None:
                    yield DicomPart(reader.body())
            finally:
                await response.aclose()

        return parts()

    async def _retrieve_raw(self, path: str, accept: str) -> AsyncIterator[DicomPart]:
        """A retrieve read with the relay's raw archive connection (1 MiB reads, no copies)."""
        try:
            upstream = await open_upstream(
                f"{self.archive_base}{path}",
                headers={**self._headers, "Accept": accept},
                timeout=self.timeout_s,
                chunk_bytes=self.chunk_bytes,
            )
        except ArchiveUnavailable:
            raise Unavailable(
                f"the archive cannot be reached or did not answer within {self.timeout_s:g} s",
                retry_after_s=self.retry_after_s,
            ) from None
        try:
            if upstream.status != 200:
                raise self._status_error(upstream.status)
            boundary = boundary_of(upstream.content_type or "")
        except MultipartError as exc:
            await upstream.aclose()
            raise BadArchiveAnswer(f"the archive's answer is {exc}") from None
        except BaseException:
            await upstream.aclose()
            raise
        reader = MultipartReader(_raw_body(upstream), boundary, source=upstream)

        async def parts() -> AsyncIterator[DicomPart]:
            try:
                while await reader.next_part() is not None:
                    yield DicomPart(reader.body())
            finally:
                await upstream.aclose()

        return parts()

    async def raw(self, path: str, accept: str) -> tuple[str, AsyncIterator[RawPart]]:
        response = await self._open(path, accept)
        media = safe_header_value(response.headers.get("content-type", ""))
        reader = self._reader(response)
        part_type = content_type(media or "").get_param("type")

        async def parts() -> AsyncIterator[RawPart]:
            try:
                while (headers := await reader.next_part()) is not None:
                    kind = safe_header_value(headers.get("content-type", "")) or (
                        part_type if isinstance(part_type, str) else "application/octet-stream"
                    )
                    yield kind, reader.body()
            finally:
                await response.aclose()

        return (part_type if isinstance(part_type, str) else "application/octet-stream"), parts()

    def _reader(self, response: httpx.Response) -> MultipartReader:
        try:
            boundary = boundary_of(response.headers.get("content-type", ""))
        except MultipartError as exc:
            raise BadArchiveAnswer(f"the archive's answer is {exc}") from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                # As they arrive (httpx reads up to 64 KiB at a time): a chunk size here would
                # hold bytes back until it filled, stalling a slow archive's first part.
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                raise StreamBroken(
                    f"the archive failed in the middle of the transfer ({type(exc).__name__})"
                ) from None

        return MultipartReader(chunks(), boundary)


async def _raw_body(upstream: Upstream) -> AsyncIterator[bytes | bytearray]:
    try:
        async for chunk in upstream.body():
            yield chunk
    except TransferBroken as exc:
        raise StreamBroken(f"the archive failed in the middle of the transfer: {exc}") from None


def _path(study: str, series: str | None, sop: str | None) -> str:
    path = f"/studies/{study}"
    if series is not None:
        path += f"/series/{series}"
        if sop is not None:
            path += f"/instances/{sop}"
    return path


def open_gateway_archive(
    settings: ArchiveSection, *, timeout_s: float, retry_after_s: int, chunk_bytes: int
) -> GatewayArchive:
    """The gateway's archive from the node's or edge's ``[archive]`` section."""
    if isinstance(settings, FolderArchive):
        from ncp.gateway.catalogue import FolderUpstream

        return FolderUpstream(settings.path, chunk_bytes=chunk_bytes)
    return DicomwebUpstream(
        settings.url,
        timeout_s=min(timeout_s, settings.timeout_s),
        retry_after_s=retry_after_s,
        chunk_bytes=chunk_bytes,
    )


# -- QIDO-RS across studies (issue 7) ---------------------------------------------------------

STUDY_BATCH = 50
"""Study Instance UIDs asked for in one study-level search (a token names at most 50)."""


async def studies_of(
    archive: GatewayArchive, studies: Iterable[str], fields: Iterable[str]
) -> list[dict[str, Any]]:
    """Study-level QIDO answers for several studies, unchecked (the caller matches study and
    patient exactly). A DICOMweb archive is asked once per STUDY_BATCH studies (UID list
    matching, PS3.18 8.3.4.1), not once per study; a study its answer leaves out (an archive
    that caps results or ignores lists, a study gone) is asked on its own."""
    wanted = list(dict.fromkeys(studies))
    _check(*wanted)
    names = sorted(set(fields))
    if not isinstance(archive, DicomwebUpstream) or len(wanted) < 2:
        return [item for study in wanted for item in await archive.study(study, names)]
    found: list[dict[str, Any]] = []
    for start in range(0, len(wanted), STUDY_BATCH):
        batch = wanted[start : start + STUDY_BATCH]
        params = [("StudyInstanceUID", ",".join(batch)), *(("includefield", f) for f in names)]
        items = [d for d in await archive._json("/studies", params) if isinstance(d, dict)]
        found += items
        answered = {single_text(item, STUDY_UID) for item in items}
        for study in batch:
            if study not in answered:
                found += await archive.study(study, names)
    return found
