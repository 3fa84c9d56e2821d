"""Moving bytes from one socket to another inside the kernel (``os.splice`` through a pipe), in
the event loop without blocking it: the zero-copy leg of the byte path for an archive's part
bodies on plain TCP (``docs/decisions/0006-imaging-byte-path.md``).

Both sockets must be non-blocking and must not be served by an asyncio transport while the move
runs (the caller passes a duplicate of a transport's descriptor, its write buffer emptied):
readiness is awaited with ``loop.add_reader`` / ``add_writer`` as ``loop.sock_sendfile`` does.
Back-pressure is the pipe's: the archive is read only while the pipe has room, and the pipe
drains only as fast as the client takes it, so a slow client slows the archive and memory
stays one pipe in the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os

from ncp.errors import NcpError

PIPE_BYTES = 1 << 20
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class SpliceError(NcpError):
    """A splice did not move all it was asked to."""


class SourceFailed(SpliceError):
    """The source ended, failed or stayed silent past the timeout before the range was moved."""


class SinkFailed(SpliceError):
    """The destination (the client's connection) failed."""


class Pipe:
    """A non-blocking pipe between the two sockets, reused for every range of one transfer;
    ``sink``: a descriptor of the destination its user may keep here, closed with the pipe."""

    def __init__(self, size: int = PIPE_BYTES) -> None:
        self.sink: int | None = None
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, size)
        self.size = fcntl.fcntl(self.write_fd, _F_GETPIPE_SZ)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd, self.sink):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.sink = None


async def move(src: int, dst: int, count: int, pipe: Pipe, *, timeout: float) -> int:
    """Move exactly ``count`` bytes from socket ``src`` to socket ``dst``; returns ``count``.

    :class:`SourceFailed` when ``src`` ends or fails first, or gives nothing for ``timeout``
    seconds while the move waits for it alone; :class:`SinkFailed` when ``dst`` fails. Waiting
    for ``dst`` to take bytes has no limit (like a transport's drain: the client sets the pace).
    The pipe is empty when this returns; after a failure it must not be used again."""
    loop = asyncio.get_running_loop()
    left = count  # still in the source
    held = 0  # in the pipe
    while left or held:
        moved = False
        if left and held < pipe.size:
            try:
                n = os.splice(src, pipe.write_fd, min(left, pipe.size - held), flags=_FLAGS)
            except BlockingIOError:
                pass
            except OSError as e:
                raise SourceFailed(f"archive connection failed: {e.strerror or e}") from e
            else:
                if n == 0:
                    raise SourceFailed(f"archive closed its connection {left} bytes early")
                left -= n
                held += n
                moved = True
        if held:
            try:
                n = os.splice(pipe.read_fd, dst, held, flags=_FLAGS)
            except BlockingIOError:
                pass
            except OSError as e:
                raise SinkFailed(f"client connection failed: {e.strerror or e}") from e
            else:
                held -= n
                moved = moved or n > 0
        if not moved:
            await _ready(
                loop, src if left and held < pipe.size else None, dst if held else None, timeout
            )
    return count


async def _ready(
    loop: asyncio.AbstractEventLoop, src: int | None, dst: int | None, timeout: float
) -> None:
    """Until ``src`` is readable or ``dst`` writable (those not None)."""
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    if src is not None:
        loop.add_reader(src, wake)
    if dst is not None:
        loop.add_writer(dst, wake)
    try:
        if dst is not None:
            await woken
        else:
            try:
                async with asyncio.timeout(timeout):
                    await woken
            except TimeoutError:
                raise SourceFailed("archive stopped sending (timeout)") from None
    finally:
        if src is not None:
            loop.remove_reader(src)
        if dst is not None:
            loop.remove_writer(dst)
