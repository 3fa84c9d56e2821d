"""Verification of every pulled instance against A's manifest, before anything is stored.

An instance is read from its first bytes only (:func:`read_header`: the file meta group and the
data set's top level up to the Series Instance UID, by ``ncp.gateway.parthead``) and checked by
:class:`StudyCheck` against the study's :class:`~ncp.consumer.model.StudyManifest`: patient
identifier, study, series and SOP Instance UIDs, SOP class, and size where A states it. What
fails is a :class:`Problem` naming the instance and why; at the end of a study, the manifest's
instances that never arrived are problems too (:meth:`StudyCheck.missing`).

Rules (the reader is strict where a wrong answer would store someone else's images):

- the file meta's Media Storage SOP Instance UID equals the data set's SOP Instance UID;
- Patient ID equals A's identifier exactly; an Issuer of Patient ID, when the instance has one,
  equals the identifier's issuer (an instance without one is accepted: A's index keeps such
  patients under A's own issuer, and A's gateway checked the patient before sending);
- Study Instance UID is the study asked for, the SOP Instance UID is in the manifest, in the
  series the manifest puts it in, with the SOP class the manifest gives, and arrives once;
- the instance's size in bytes, as A sent it, equals the manifest's where A gives one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ncp.consumer.model import ManifestInstance, StudyManifest
from ncp.dicom.uids import is_uid
from ncp.fhir.identifiers import issuer_of
from ncp.gateway.errors import StreamBroken
from ncp.gateway.parthead import HEAD_LIMIT, file_meta, meta_end, top_level_values

ProblemKind = Literal["extra", "missing", "different", "unreadable"]
"""extra: not in the manifest (or sent twice); missing: in the manifest, never arrived;
different: in the manifest, but its content says otherwise; unreadable: not a DICOM object."""

_SOP_CLASS, _SOP = 0x00080016, 0x00080018
_PATIENT_ID, _ISSUER = 0x00100020, 0x00100021
_STUDY, _SERIES = 0x0020000D, 0x0020000E
_WANTED = frozenset({_SOP_CLASS, _SOP, _PATIENT_ID, _ISSUER, _STUDY, _SERIES})


class Unreadable(Exception):
    """A part that cannot be read as a DICOM instance (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What an instance says of itself, from its first bytes."""

    meta_sop_uid: str
    transfer_syntax: str
    sop_uid: str | None
    sop_class_uid: str | None
    study_uid: str | None
    series_uid: str | None
    patient_id: str | None
    patient_issuer: str | None


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    detail: str

    def __str__(self) -> str:
        name = f"instance {self.sop_uid}" if self.sop_uid else "an instance"
        return f"{name}: {self.detail}"


def read_header(head: bytes | bytearray | memoryview, *, whole: bool) -> InstanceHeader | int:
    """The header of an instance from the first bytes of its part, or how many bytes are
    needed (more than ``len(head)``). ``whole``: ``head`` is the entire part. Unreadable when
    it is not a Part 10 object or its header cannot be walked."""
    try:
        meta = file_meta(head)
        if meta is None:
            need = max(meta_end(head), len(head) + 1)
            if whole or need > HEAD_LIMIT:
                raise Unreadable("not a DICOM Part 10 object (no complete file meta group)")
            return need
        meta_sop, syntax = meta
        values = top_level_values(head, meta_end(head), syntax, _WANTED, whole=whole)
    except StreamBroken as exc:
        raise Unreadable(str(exc).removeprefix("a part's ").removeprefix("a part ")) from None
    if isinstance(values, int):
        if whole:
            raise Unreadable("its data set is unreadable (truncated)")
        return values
    return InstanceHeader(
        meta_sop_uid=meta_sop,
        transfer_syntax=syntax,
        sop_uid=_uid(values.get(_SOP)),
        sop_class_uid=_uid(values.get(_SOP_CLASS)),
        study_uid=_uid(values.get(_STUDY)),
        series_uid=_uid(values.get(_SERIES)),
        patient_id=_text(values.get(_PATIENT_ID)),
        patient_issuer=_text(values.get(_ISSUER)),
    )


def _uid(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("ascii", "replace").strip("\x00 ")
    return text or None


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    # LO values are padded with spaces (PS3.5 6.2); leading spaces are not significant either.
    return text.strip("\x00 ") or None


class StudyCheck:
    """Checks one study's instances as they arrive (:meth:`check`) and, at the end, which of
    the manifest's never came (:meth:`missing`). Not thread-safe: one per study and worker."""

    def __init__(self, manifest: StudyManifest, *, seen: Iterable[str] = ()) -> None:
        self.manifest = manifest
        self._where: dict[str, tuple[str, ManifestInstance]] = {
            inst.sop_instance_uid: (series.series_uid, inst)
            for series in manifest.series
            for inst in series.instances
        }
        self._issuer = issuer_of(manifest.patient.system)
        self._seen: set[str] = set(seen)

    def expects(self, sop_uid: str) -> bool:
        return sop_uid in self._where

    def check(self, header: InstanceHeader) -> Problem | None:
        """A problem with this instance's header, or None. An instance that passes is counted
        as seen: the same SOP Instance UID again is an extra."""
        study = self.manifest.study_uid
        sop = header.sop_uid
        if sop is None or not is_uid(sop):
            return Problem(
                "unreadable",
                study,
                header.series_uid,
                header.meta_sop_uid,
                "its data set names no valid SOP Instance UID",
            )
        if header.meta_sop_uid != sop:
            return Problem(
                "different",
                study,
                header.series_uid,
                sop,
                f"its file meta names SOP Instance {header.meta_sop_uid}, its data set {sop}",
            )
        where = self._where.get(sop)
        if where is None:
            other = "" if header.study_uid == study else f" (it says study {header.study_uid})"
            return Problem("extra", study, header.series_uid, sop, f"not in A's manifest{other}")
        if sop in self._seen:
            return Problem("extra", study, header.series_uid, sop, "sent more than once")
        series_uid, expected = where
        problem = self._differences(header, series_uid, expected)
        if problem is not None:
            return Problem("different", study, series_uid, sop, problem)
        self._seen.add(sop)
        return None

    def check_size(self, sop_uid: str, size: int) -> Problem | None:
        """A problem when A's manifest gives this instance a size other than ``size``."""
        where = self._where.get(sop_uid)
        if where is None or where[1].size is None or where[1].size == size:
            return None
        self._seen.discard(sop_uid)
        return Problem(
            "different",
            self.manifest.study_uid,
            where[0],
            sop_uid,
            f"{size} bytes arrived, A's manifest says {where[1].size}",
        )

    def forget(self, sop_uid: str) -> None:
        """An instance that passed :meth:`check` but was not stored (its transfer broke)."""
        self._seen.discard(sop_uid)

    def _differences(
        self, header: InstanceHeader, series_uid: str, expected: ManifestInstance
    ) -> str | None:
        manifest = self.manifest
        if header.study_uid != manifest.study_uid:
            return f"it says study {header.study_uid}, A's manifest {manifest.study_uid}"
        if header.series_uid != series_uid:
            return f"it says series {header.series_uid}, A's manifest {series_uid}"
        if header.sop_class_uid != expected.sop_class_uid:
            return (
                f"its SOP class is {header.sop_class_uid}, A's manifest says "
                f"{expected.sop_class_uid}"
            )
        if header.patient_id != manifest.patient.value:
            # The values are patient data: say what differs, not what they are.
            return "its Patient ID is not the identifier of the patient in A's manifest"
        if header.patient_issuer is not None and header.patient_issuer != self._issuer:
            return "its Issuer of Patient ID is not the issuer of the patient in A's manifest"
        return None

    def missing(self, present: Iterable[str]) -> list[Problem]:
        """The manifest's instances not in ``present`` (SOP Instance UIDs stored)."""
        have = set(present)
        return [
            Problem(
                "missing", self.manifest.study_uid, series, sop, "in A's manifest, not received"
            )
            for sop, (series, _) in self._where.items()
            if sop not in have
        ]
