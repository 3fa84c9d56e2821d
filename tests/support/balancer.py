"""A TCP load balancer for the scale-out tests: each connection to a front port goes to the next
of its backends in turn (round robin), bytes passed through untouched, so TLS (and mutual TLS)
ends at the replica, as behind a layer-4 load balancer in production. One asyncio loop on a
thread of its own serves every front port; :meth:`Balancer.close` stops it.

Each front port counts the connections it gave each backend, so a test can show that both
replicas were used.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Iterator, Sequence

HOST = "127.0.0.1"
CHUNK = 1 << 16


class Balancer:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="balancer", daemon=True)
        self.thread.start()
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: dict[int, Counter[int]] = {}

    def add(self, front: int, backends: Sequence[int]) -> None:
        """Accept on ``front`` and spread its connections over ``backends`` (ports on HOST)."""
        turn = itertools.cycle(list(backends))
        counts: Counter[int] = Counter()
        self.connections[front] = counts

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backend = next(turn)
            counts[backend] += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(HOST, backend)
            except OSError:
                writer.close()
                return
            try:
                await asyncio.gather(
                    _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
                )
            finally:
                for end in (writer, up_writer):
                    with contextlib.suppress(Exception):
                        end.close()

        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_server(handle, HOST, front, reuse_address=True)

        self.servers.append(asyncio.run_coroutine_threadsafe(start(), self.loop).result(10))

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """One direction; at its end a half close, so the other direction still finishes."""
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
    finally:
        with contextlib.suppress(Exception):
            if sink.can_write_eof():
                sink.write_eof()


@contextlib.contextmanager
def balancer() -> Iterator[Balancer]:
    made = Balancer()
    try:
        yield made
    finally:
        made.close()
