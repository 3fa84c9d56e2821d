"""The one interface every image archive sits behind (folder of files, any DICOMweb server).

The indexer walks a source in two steps so that it re-reads only what changed:

1. :meth:`ArchiveSource.entries` lists every instance the source holds with a *fingerprint* that
   changes when the stored object changes (file size and mtime for a folder; nothing for DICOMweb,
   where an instance is immutable under its SOP Instance UID).
2. :meth:`ArchiveSource.read_headers` reads the headers of the new or changed entries, in batches
   the source chooses (a DICOMweb source asks for a whole study's metadata at once). Pixel data is
   never loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydicom.dataset import Dataset


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One stored object as the source lists it, before it is read."""

    locator: str
    """Stable key within the source: a relative POSIX path, or 'study/series/instance' UIDs."""
    fingerprint: str
    """Changes whenever the stored bytes change; equal fingerprints are not read again."""


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the indexer needs of one instance: its header (no pixel data) and storage facts."""

    entry: SourceEntry
    dataset: Dataset
    """The data set without Pixel Data (and without the file meta group)."""
    size_bytes: int
    """Size of the stored Part 10 object as the archive returns it, preamble included."""
    transfer_syntax_uid: str
    meta_sop_uid: str | None = None
    """The file meta group's Media Storage SOP Instance UID, where the source sees the file
    meta (a folder); the instance is its data set's SOP Instance UID all the same."""


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """An entry that could not be indexed, and why. Never fatal to the index run."""

    entry: SourceEntry
    reason: str


@runtime_checkable
class ArchiveSource(Protocol):
    """An image archive the node indexes and (later) serves studies from."""

    @property
    def name(self) -> str:
        """A short stable name, kept with every indexed instance (e.g. 'folder', 'dicomweb')."""
        ...

    def entries(self) -> Iterator[SourceEntry | SkippedEntry]:
        """Every object the source holds. Objects known not to be instances may come as skipped."""
        ...

    def read_headers(
        self, entries: Iterable[SourceEntry]
    ) -> Iterator[InstanceHeader | SkippedEntry]:
        """Headers of the given entries, one result per entry, in any order."""
        ...
