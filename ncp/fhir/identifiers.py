"""How index values become FHIR identifiers and back.

The index keeps DICOM's Issuer of Patient ID as found (an OID such as ``1.2.40.0.10.1.4.3.1``, or
a URI); FHIR wants an ``Identifier.system`` URI, so an OID is written ``urn:oid:<oid>``. Every
FHIR resource the node emits and every patient reference it reads (``$match``, searches, tokens)
goes through these two functions, so the two spellings never meet unconverted.
"""

from __future__ import annotations

import hashlib
import re

from ncp.fhir import canonical

STUDY_UID_SYSTEM = "urn:dicom:uid"
"""System of Study, Series and SOP Instance UIDs; the value is ``urn:oid:<uid>``."""
UNQUALIFIED_ACCESSION_SYSTEM = f"{canonical.BASE}/sid/accession-number-unqualified"
"""System of an accession number whose DICOM gives no issuer: it matches an accession number of
any system with the same value (the order placer's system is simply unknown to the archive)."""


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(value: str) -> bool:
    """Whether ``value`` is a FHIR logical id (R4 ``id``: 1 to 64 of ``A-Z a-z 0-9 - .``), as a
    resource id in a path or a reference must be."""
    return _FHIR_ID.fullmatch(value) is not None


def is_oid(value: str) -> bool:
    parts = value.split(".")
    return len(parts) > 1 and all(p.isdigit() for p in parts)


def patient_system(issuer: str) -> str:
    """The FHIR ``Identifier.system`` for an Issuer of Patient ID (OID or absolute URI)."""
    if is_oid(issuer):
        return f"urn:oid:{issuer}"
    if ":" in issuer:
        return issuer
    raise ValueError(f"issuer {issuer!r} is neither an OID nor an absolute URI")


def issuer_of(system: str) -> str:
    """The index's issuer for a FHIR ``Identifier.system`` (inverse of :func:`patient_system`)."""
    if system.startswith("urn:oid:") and is_oid(system.removeprefix("urn:oid:")):
        return system.removeprefix("urn:oid:")
    return system


def uid_value(uid: str) -> str:
    """A DICOM UID as the value of an identifier with system ``urn:dicom:uid``."""
    return f"urn:oid:{uid}"


def uid_of(value: str) -> str | None:
    """The DICOM UID in an ``urn:dicom:uid`` identifier value, or None if it is not one."""
    return value.removeprefix("urn:oid:") if value.startswith("urn:oid:") else None


# --- logical ids of the resources the node serves -----------------------------------------------
# Derived from business identifiers, never from database keys: every replica, and every rebuild of
# the index, gives a resource the same id, so B's links and caches stay valid.


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:32]


def patient_resource_id(system: str, value: str) -> str:
    """Patient id for a patient identifier (FHIR system, value)."""
    return "p" + _digest(system, value)


def report_resource_id(system: str, value: str) -> str:
    """Id of a report (Composition.identifier system, value): its Bundle and its report
    DocumentReference share it; versions are the Bundle's ``_history``."""
    return "r" + _digest(system, value)


def imaging_study_id(study_uid: str) -> str:
    """ImagingStudy id: the Study Instance UID itself (digits and dots, at most 64: a FHIR id)."""
    return study_uid


def manifest_reference_id(study_uid: str) -> str:
    """Id of the DocumentReference that lists a study manifest."""
    return "m" + _digest(study_uid)
