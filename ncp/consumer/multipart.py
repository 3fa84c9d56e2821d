"""Reading a WADO-RS answer (multipart/related, RFC 2046 5.1) part by part, in constant memory,
for B's retriever.

The gateway's reader (:class:`ncp.gateway.multipart.MultipartReader`) is asynchronous and built
around moving archive ranges; the retriever runs in worker threads on a blocking connection, so
it reads the same framing synchronously here. The answer is read into one buffer of the
reader's own (1 MiB by default) with ``readinto``: large reads, no allocation per read, and the
delimiter is looked for with ``bytearray.find`` over everything read at once. A part's body is
handed out as views into that buffer, each valid until the next call; only what could start a
delimiter at the end of the buffer is moved to its front before the next read, so no part (and
no study) is ever held in memory whole and the body is never copied in Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from ncp.gateway.multipart import MAX_PART_HEADER, MultipartError, boundary_of, part_headers

__all__ = ["BUFFER_BYTES", "ChunkSource", "MultipartError", "PartReader", "boundary_of"]

BUFFER_BYTES = 1 << 20
"""The reader's buffer: the largest read, and the largest piece of a body it hands out."""


class Source(Protocol):
    """Where the body comes from: ``readinto`` fills some of the view and says how much (0 at
    the end). ``http.client.HTTPResponse`` is one (it undoes the chunked transfer coding)."""

    def readinto(self, view: memoryview, /) -> int: ...


class ChunkSource:
    """A body given as chunks (tests, and anything that yields bytes), read like a socket:
    each ``readinto`` gives at most what is left of the current chunk."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._chunk = memoryview(b"")

    def readinto(self, view: memoryview, /) -> int:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        n = min(len(view), len(self._chunk))
        view[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n


class PartReader:
    """Parts of a multipart body read from ``source``: :meth:`next_part` gives the next part's
    headers (lower-case names), or None after the close delimiter; :meth:`read` gives the current
    part's body piece by piece (a view valid until the next call), then None. MultipartError when
    the body breaks RFC 2046 (a truncated transfer: the connection ended inside a part)."""

    def __init__(
        self, source: Source, boundary: bytes, *, buffer_bytes: int = BUFFER_BYTES
    ) -> None:
        self._source = source
        self._dash = b"--" + boundary
        self._delimiter = b"\r\n" + self._dash
        # Part headers up to MAX_PART_HEADER must fit beside what is kept of a delimiter.
        size = max(buffer_bytes, 2 * MAX_PART_HEADER + 4 * len(self._delimiter))
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._pos = 0  # what is not consumed yet: self._buf[self._pos : self._end]
        self._end = 0
        self._eof = False
        self._state = "preamble"  # preamble, between, body, done

    def _left(self) -> int:
        return self._end - self._pos

    def _more(self) -> bool:
        """Read more after what is left (moved to the front of the buffer first); False at the
        end of the body."""
        if self._eof:
            return False
        left = self._end - self._pos
        if self._pos:
            if left:  # a few bytes (a possible delimiter, part headers): copied, never overlapped
                self._buf[:left] = bytes(self._view[self._pos : self._end])
            self._pos, self._end = 0, left
        got = self._source.readinto(self._view[self._end :])
        if not got:
            self._eof = True
            return False
        self._end += got
        return True

    def _find(self, what: bytes) -> int:
        return self._buf.find(what, self._pos, self._end)

    def next_part(self) -> dict[str, str] | None:
        while self._state == "body":  # the caller left the rest of a part unread
            self.read()
        if self._state == "done":
            return None
        if self._state == "preamble":
            while (i := self._find(self._dash)) < 0:
                if self._left() > MAX_PART_HEADER or not self._more():
                    raise MultipartError("no opening boundary")
            self._pos = i + len(self._dash)
        while self._left() < 2:
            if not self._more():
                raise MultipartError("body ends after a boundary")
        if self._buf[self._pos : self._pos + 2] == b"--":
            self._state = "done"
            return None
        while (end := self._find(b"\r\n\r\n")) < 0:
            if self._left() > MAX_PART_HEADER or not self._more():
                raise MultipartError("unterminated part headers")
        head = bytes(self._view[self._pos : end])
        self._pos = end + 4
        headers = part_headers(head)
        self._state = "body"
        return headers

    def read(self) -> memoryview | None:
        """The next piece of the current part's body, or None at its end. The piece is a view
        into the reader's buffer: use it before calling the reader again."""
        if self._state != "body":
            return None
        delimiter = self._delimiter
        keep = len(delimiter) - 1
        while True:
            j = self._find(delimiter)
            if j >= 0:
                piece = self._view[self._pos : j]
                self._pos = j + len(delimiter)
                self._state = "between"
                return piece if len(piece) else None
            # Everything but what could be the start of a delimiter is body.
            safe = self._end - keep
            if safe > self._pos:
                piece = self._view[self._pos : safe]
                self._pos = safe
                return piece
            if not self._more():
                raise MultipartError("the body ends inside a part (no closing boundary)")

    def body(self) -> Iterator[memoryview]:
        """The current part's body as an iterator of pieces (each valid until the next)."""
        while (piece := self.read()) is not None:
            yield piece
