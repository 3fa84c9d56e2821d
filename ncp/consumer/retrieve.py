"""Downloading instances over the imaging channel (WADO-RS, PS3.18 10.4) with an image access
token, part by part, into files in the staging folder.

A :class:`Unit` is one request: a whole series, or one instance (what a resumed job still
lacks of a series it had begun). Each part of the answer is written to its own staging file as it
arrives, its first bytes read for the instance's header (:func:`ncp.consumer.verify.read_header`);
nothing is held in memory but the reader's buffer (:mod:`ncp.consumer.multipart`) and, at
times, a part's first bytes. The caller verifies
each :class:`Received` and stores or discards its file.

Answers are sorted into errors that say what to do next: :class:`Transient` (retry later: the
peer, its archive or the network failed, a transfer broke), :class:`TokenRefused` (401: renew the
token), :class:`NotAtPeer` (404: the instances are not there) and :class:`Refused` (any other
refusal: do not retry).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from ncp.consumer.connections import Connections, NetworkError
from ncp.consumer.multipart import MultipartError, PartReader, boundary_of
from ncp.consumer.verify import InstanceHeader, Unreadable, read_header
from ncp.errors import NcpError
from ncp.gateway.parthead import HEAD_LIMIT

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
"""Instances as A's archive stores them: the bytes A's manifest sizes describe."""


class FetchError(NcpError):
    """A request of the imaging channel did not give what was asked."""


class Transient(FetchError):
    """Worth retrying later: connection, timeout, a broken transfer, 5xx (``retry_after``: what
    the peer asked for, in seconds)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenRefused(FetchError):
    """401: the token expired or was not accepted; a fresh one may help once."""


class NotAtPeer(FetchError):
    """404: the series or instance is not at the peer (the manifest promised it)."""


class Refused(FetchError):
    """Any other refusal (403, 4xx): retrying will not help."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One WADO-RS request: a whole series, or one instance of it."""

    study_uid: str
    series_uid: str
    sop_uid: str | None = None

    def path(self) -> str:
        out = f"/studies/{self.study_uid}/series/{self.series_uid}"
        return out if self.sop_uid is None else f"{out}/instances/{self.sop_uid}"


@dataclass(frozen=True, slots=True)
class Received:
    """One part, in its staging file (the caller's to store or discard)."""

    path: Path
    size: int
    header: InstanceHeader | None
    unreadable: str | None = None
    """Why the part is not a readable instance (then ``header`` is None)."""

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Fetcher:
    """Runs units against one DICOMweb base with one token; ``connections`` are shared by every
    job calling the same peer (the per-peer bound is the callers': ``PeerSlots``)."""

    def __init__(
        self,
        connections: Connections,
        peer: str,
        staging: Path,
        *,
        request_id: str,
        write_back: bool = False,
    ) -> None:
        self.connections = connections
        self.peer = peer
        self.staging = staging
        self.request_id = request_id
        self.write_back = write_back
        """Start each file's write to disk as soon as it is received (Linux: POSIX_FADV_DONTNEED
        starts the write-back of dirty pages, then leaves them out of the page cache), so the
        store's flush finds most of it written."""

    @contextlib.contextmanager
    def open(self, base_url: str, token: str, unit: Unit) -> Iterator[Iterator[Received]]:
        """The parts of ``unit``'s answer as they arrive; leaving the block early closes the
        connection (the rest of the answer is not read)."""
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": ACCEPT,
            "X-Request-ID": self.request_id,
        }
        url = base_url.rstrip("/") + unit.path()
        with contextlib.ExitStack() as stack:
            try:
                response = stack.enter_context(self.connections.get(self.peer, url, headers))
                _check_status(response)
            except NetworkError as exc:
                raise Transient(f"the request to the peer failed: {_what(exc)}") from None
            try:
                boundary = boundary_of(response.getheader("content-type") or "")
            except MultipartError as exc:
                raise Transient(f"the peer answered without multipart: {exc}") from None
            reader = PartReader(_Network(response), boundary)
            try:
                yield self._parts(reader)
                # The caller read every part; what follows the close delimiter is read too,
                # so the connection can serve the next request.
                _Network(response).drain()
            except MultipartError as exc:
                raise Transient(f"the transfer from the peer broke off: {exc}") from None

    def _parts(self, reader: PartReader) -> Iterator[Received]:
        while reader.next_part() is not None:
            yield self._receive(reader)

    def _receive(self, reader: PartReader) -> Received:
        path = self.staging / f"{next(_names)}.part"
        head = bytearray()
        need = 144  # the preamble and the start of the file meta group
        header: InstanceHeader | None = None
        unreadable: str | None = None
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while (piece := reader.read()) is not None:
                if header is None and unreadable is None:
                    if not head and len(piece) >= need:
                        # The part's first piece holds the header, usually: read in place.
                        header, need, unreadable = _header(piece[:HEAD_LIMIT], need, whole=False)
                        if header is None and unreadable is None:
                            head += piece[:HEAD_LIMIT]  # more than that is needed: gather
                    elif len(head) < HEAD_LIMIT:
                        head += piece[: HEAD_LIMIT - len(head)]
                        if len(head) >= need:
                            header, need, unreadable = _header(head, need, whole=False)
                size += len(piece)
                _write_all(fd, piece)
            if header is None and unreadable is None:
                header, _, unreadable = _header(head, need, whole=size == len(head))
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if self.write_back:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        if header is None and unreadable is None:
            unreadable = "its header does not fit in its first bytes"
        return Received(path, size, header, unreadable)


class _Network:
    """The response body as the part reader reads it: a failure of the network is Transient,
    never mistaken for one of the disk's."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._response = response

    def readinto(self, view: memoryview, /) -> int:
        try:
            return self._response.readinto(view)
        except NetworkError as exc:
            raise Transient(f"the transfer from the peer failed: {_what(exc)}") from None

    def drain(self, most: int = 64 * 1024) -> None:
        """Read what is left of the body (an epilogue): a few bytes, or the connection is not
        kept."""
        with contextlib.suppress(*NetworkError):
            self._response.read(most)


_names = itertools.count()
"""Staging file names, unique in the process (each job has its own staging folder)."""


def _what(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _header(
    head: bytearray | memoryview, need: int, *, whole: bool
) -> tuple[InstanceHeader | None, int, str | None]:
    try:
        found = read_header(head, whole=whole)
    except Unreadable as exc:
        return None, need, str(exc)
    if isinstance(found, int):
        return None, found, None
    return found, need, None


def _write_all(fd: int, piece: bytes | memoryview) -> None:
    view = memoryview(piece)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _check_status(response: http.client.HTTPResponse) -> None:
    status = response.status
    if status == 200:
        return
    body = response.read(4096)  # an error answer: its start is enough
    text = response.getheader("warning") or body.decode("utf-8", "replace")[:200]
    if status == 401:
        raise TokenRefused(f"the peer refused the image access token (401): {text}")
    if status == 404:
        raise NotAtPeer(f"the peer does not have it (404): {text}")
    if status in (408, 429) or status >= 500:
        raise Transient(
            f"the peer or its archive is unavailable ({status})",
            _retry_after(response.getheader("retry-after")),
        )
    raise Refused(f"the peer refused ({status}): {text}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        from datetime import UTC, datetime

        moment = parsedate_to_datetime(value)
        return max(0.0, (moment - datetime.now(UTC)).total_seconds())
    return None
