"""A tree of DICOM files as an archive source: the demo default and CD/DVD-style imports.

Any layout works: files are found by walking the tree, whatever their names (portable media use
names like ``IMAGES/IM0001`` without extension). A ``DICOMDIR`` is not indexed as an instance;
its references are checked, and files it lists that are missing are reported as skipped.

Locators are POSIX paths relative to the root. :meth:`FolderSource.path_of` is the only way back
from a locator to a file and refuses anything that leaves the root, so a locator that came from
outside (a URL, a database row) can never reach another file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from ncp.dicom.elements import (
    MEDIA_STORAGE_SOP_CLASS_UID,
    MEDIA_STORAGE_SOP_INSTANCE_UID,
    TRANSFER_SYNTAX_UID,
    uid_value,
)
from ncp.dicom.source import InstanceHeader, SkippedEntry, SourceEntry
from ncp.errors import ArchiveError, UnreadableInstance

DICOMDIR = "DICOMDIR"


class FolderSource:
    """Instances stored as Part 10 files below ``root``."""

    name = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._dirs: dict[str, Path | Literal[False]] = {}

    def entries(self) -> Iterator[SourceEntry | SkippedEntry]:
        if not self.root.is_dir():
            raise ArchiveError(f"archive folder does not exist: {self.root}")
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            # Sorted walk: the same tree is always listed in the same order.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                path = Path(dirpath, filename)
                locator = path.relative_to(self.root).as_posix()
                if path.is_symlink():
                    yield SkippedEntry(SourceEntry(locator, ""), "symbolic link: not followed")
                    continue
                if filename.upper() == DICOMDIR:
                    yield from self._check_dicomdir(path)
                    continue
                stat = path.stat()
                yield SourceEntry(locator, f"{stat.st_size}:{stat.st_mtime_ns}")

    def read_headers(
        self, entries: Iterable[SourceEntry]
    ) -> Iterator[InstanceHeader | SkippedEntry]:
        for entry in entries:
            try:
                yield self._read(entry)
            except UnreadableInstance as exc:
                yield SkippedEntry(entry, exc.reason)

    def path_of(self, locator: str) -> Path:
        """The file behind ``locator``; refuses absolute paths and anything outside the root.

        Only the canonical form this source hands out is accepted (no '..', '.', '//', NUL), and
        the folder is resolved so that a symbolic link inside the tree cannot lead out. The file
        itself is opened without following a link (see :meth:`_read`).
        """
        parts = locator.split("/")
        if not locator or "\x00" in locator or any(p in ("", ".", "..") for p in parts):
            raise UnreadableInstance(locator, "locator leaves the archive folder")
        # realpath costs a system call per component: resolve each folder once.
        parent = self._resolved_dir("/".join(parts[:-1]))
        if parent is None:
            raise UnreadableInstance(locator, "locator leaves the archive folder")
        return parent / parts[-1]

    def _resolved_dir(self, rel_dir: str) -> Path | None:
        cached = self._dirs.get(rel_dir)
        if cached is None:
            resolved = (self.root / rel_dir).resolve()
            cached = resolved if resolved.is_relative_to(self.root) else False
            self._dirs[rel_dir] = cached
        return cached or None

    def _read(self, entry: SourceEntry) -> InstanceHeader:
        path = self.path_of(entry.locator)
        try:
            # O_NOFOLLOW: a file replaced by a link after listing is refused, not followed.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
        except InvalidDicomError:
            raise UnreadableInstance(
                entry.locator, "not a DICOM Part 10 file (no DICM prefix)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnreadableInstance(entry.locator, "symbolic link: not followed") from None
            raise UnreadableInstance(entry.locator, f"cannot be read: {exc.strerror}") from None
        except Exception as exc:  # truncated or corrupt: pydicom raises many kinds
            raise UnreadableInstance(
                entry.locator, f"corrupt DICOM: {type(exc).__name__}: {exc}"
            ) from None
        meta = ds.file_meta
        syntax = uid_value(meta, TRANSFER_SYNTAX_UID) or ""
        if uid_value(meta, MEDIA_STORAGE_SOP_CLASS_UID) == MediaStorageDirectoryStorage:
            raise UnreadableInstance(entry.locator, "a media directory (DICOMDIR), not an instance")
        if not syntax:
            raise UnreadableInstance(entry.locator, "no Transfer Syntax UID in the file meta")
        meta_sop = uid_value(meta, MEDIA_STORAGE_SOP_INSTANCE_UID)
        del ds.file_meta
        return InstanceHeader(
            entry=entry,
            dataset=ds,
            size_bytes=size,
            transfer_syntax_uid=syntax,
            meta_sop_uid=meta_sop,
        )

    def read_head(self, locator: str, limit: int) -> bytes:
        """The first ``limit`` bytes of the file behind ``locator`` (links refused)."""
        fd = os.open(self.path_of(locator), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(limit)

    def _check_dicomdir(self, path: Path) -> Iterator[SkippedEntry]:
        """Report the files a DICOMDIR lists that are not there (a damaged or partial medium)."""
        base = path.parent
        locator = path.relative_to(self.root).as_posix()
        try:
            ds = pydicom.dcmread(path)
            records = ds.DirectoryRecordSequence
        except Exception as exc:
            yield SkippedEntry(
                SourceEntry(locator, ""), f"unreadable DICOMDIR: {type(exc).__name__}"
            )
            return
        existing = _case_insensitive_index(base)
        for record in records:
            file_id = record.get("ReferencedFileID")
            if not file_id:
                continue
            parts = [file_id] if isinstance(file_id, str) else list(file_id)
            # ISO 9660 media may add a ';1' version suffix and change case.
            rel = "/".join(str(p).split(";")[0] for p in parts)
            if rel.upper() not in existing:
                missing = (base / rel).relative_to(self.root).as_posix()
                yield SkippedEntry(SourceEntry(missing, ""), "listed in DICOMDIR but missing")


def _case_insensitive_index(base: Path) -> set[str]:
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(base):
        rel_dir = Path(dirpath).relative_to(base).as_posix()
        for f in files:
            found.add((f if rel_dir == "." else f"{rel_dir}/{f}").upper())
    return found
