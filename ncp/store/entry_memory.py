"""The memory tier of the rendered list entries (:class:`ncp.store.models.ListEntry`).

The database keeps every rendered entry for all replicas; reading a thousand bodies back still
costs a list request more than anything else it does. Each process therefore also keeps the most
recently used bodies, tagged with the renderer and source they were built from, so a request
only asks the database whether those are still current (:mod:`ncp.provider.list_entries`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ncp.store.models import EntryKind

__all__ = ["EntryMemory"]


class EntryMemory:
    """The most recently used rendered entries of one process, up to ``max_bytes`` of bodies,
    each with the renderer and source it was built from: a hit still needs the database to say
    that source is the current one (:func:`_kept`), but not the body's bytes. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[EntryKind, int], tuple[str, str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[EntryKind, int], renderer: str, source: str) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != renderer or found[1] != source:
                return None
            self._entries.move_to_end(key)
            return found[2]

    def put(self, key: tuple[EntryKind, int], renderer: str, source: str, body: bytes) -> None:
        if len(body) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[2])
            self._entries[key] = (renderer, source, body)
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
