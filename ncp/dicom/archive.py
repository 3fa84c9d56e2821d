"""Opens the archive source a node's settings name."""

from __future__ import annotations

from ncp.config import ArchiveSection, DicomwebArchive, FolderArchive
from ncp.dicom.folder import FolderSource
from ncp.dicom.source import ArchiveSource


def open_archive(settings: ArchiveSection) -> ArchiveSource:
    if isinstance(settings, FolderArchive):
        return FolderSource(settings.path)
    if isinstance(settings, DicomwebArchive):
        # Imported here: the folder-only demo needs no HTTP client stack.
        from ncp.dicom.dicomweb import DicomwebSource

        return DicomwebSource(settings.url, timeout_s=settings.timeout_s)
    raise AssertionError(f"unknown archive kind: {settings!r}")
