"""Reading a WADO-RS answer (multipart/related, RFC 2046 5.1) part by part, in constant memory,
for B's retriever.

The gateway's reader (:class:`ncp.gateway.multipart.MultipartReader`) is asynchronous and built
around moving archive ranges; the retriever runs in worker threads on a blocking HTTP client, so
it reads the same framing synchronously here. A part's body is handed out as views into the
chunks received: only the few bytes that could start a delimiter at a chunk's end are carried
over, so no part (and no study) is ever held in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator

from ncp.gateway.multipart import MAX_PART_HEADER, MultipartError, boundary_of

__all__ = ["MultipartError", "PartReader", "boundary_of"]

Piece = bytes | memoryview


class PartReader:
    """Parts of a multipart body read from ``chunks``: :meth:`next_part` gives the next part's
    headers (lower-case names), or None after the close delimiter; :meth:`read` gives the current
    part's body piece by piece, then None. MultipartError when the body breaks RFC 2046 (a
    truncated transfer: the connection ended inside a part)."""

    def __init__(self, chunks: Iterator[bytes], boundary: bytes) -> None:
        self._chunks = chunks
        self._dash = b"--" + boundary
        self._delimiter = b"\r\n" + self._dash
        self._data: bytes = b""
        self._pos = 0
        self._state = "preamble"  # preamble, between, body, done

    def _chunk(self) -> bytes | None:
        for chunk in self._chunks:
            if chunk:
                return chunk
        return None

    def _more(self) -> bool:
        """Append the next chunk to what is left (copies the rest: used for part heads only)."""
        chunk = self._chunk()
        if chunk is None:
            return False
        rest = len(self._data) - self._pos
        self._data = chunk if rest <= 0 else self._data[self._pos :] + chunk
        self._pos = 0
        return True

    def next_part(self) -> dict[str, str] | None:
        while self._state == "body":  # the caller left the rest of a part unread
            self.read()
        if self._state == "done":
            return None
        if self._state == "preamble":
            while (i := self._data.find(self._dash, self._pos)) < 0:
                if len(self._data) - self._pos > MAX_PART_HEADER or not self._more():
                    raise MultipartError("no opening boundary")
            self._pos = i + len(self._dash)
        while len(self._data) - self._pos < 2:
            if not self._more():
                raise MultipartError("body ends after a boundary")
        if self._data[self._pos : self._pos + 2] == b"--":
            self._state = "done"
            return None
        while (end := self._data.find(b"\r\n\r\n", self._pos)) < 0:
            if len(self._data) - self._pos > MAX_PART_HEADER or not self._more():
                raise MultipartError("unterminated part headers")
        lines = self._data[self._pos : end].split(b"\r\n")
        self._pos = end + 4
        if lines[0].strip(b" \t"):
            raise MultipartError("garbage after a boundary")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise MultipartError("a part header line without ':'")
            headers[name.strip().lower()] = value.strip()
        self._state = "body"
        return headers

    def read(self) -> Piece | None:
        """The next piece of the current part's body, or None at its end."""
        if self._state != "body":
            return None
        delimiter = self._delimiter
        keep = len(delimiter) - 1
        while True:
            j = self._data.find(delimiter, self._pos)
            if j >= 0:
                piece = memoryview(self._data)[self._pos : j]
                self._pos = j + len(delimiter)
                self._state = "between"
                return piece if len(piece) else None
            safe = len(self._data) - keep
            if safe > self._pos:
                piece = memoryview(self._data)[self._pos : safe]
                self._pos = safe
                return piece
            # Only a possible start of the delimiter is left: look across into the next chunk
            # without copying it (a body crosses thousands of chunk edges).
            tail = self._data[self._pos :]
            chunk = self._chunk()
            if chunk is None:
                raise MultipartError("the body ends inside a part (no closing boundary)")
            if tail and len(chunk) >= keep:
                edge = tail + chunk[:keep]
                j = edge.find(delimiter)
                self._data, self._pos = chunk, 0
                if j >= 0:  # the delimiter straddles the two chunks
                    self._pos = j + len(delimiter) - len(tail)
                    self._state = "between"
                    return edge[:j] or None
                return tail
            self._data, self._pos = tail + chunk, 0

    def body(self) -> Iterator[Piece]:
        """The current part's body as an iterator of pieces."""
        while (piece := self.read()) is not None:
            yield piece
