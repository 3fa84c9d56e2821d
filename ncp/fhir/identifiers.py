"""How index values become FHIR identifiers and back.

The index keeps DICOM's Issuer of Patient ID as found (an OID such as ``1.2.40.0.10.1.4.3.1``, or
a URI); FHIR wants an ``Identifier.system`` URI, so an OID is written ``urn:oid:<oid>``. Every
FHIR resource the node emits and every patient reference it reads (``$match``, searches, tokens)
goes through these two functions, so the two spellings never meet unconverted.
"""

from __future__ import annotations

STUDY_UID_SYSTEM = "urn:dicom:uid"
"""System of Study, Series and SOP Instance UIDs; the value is ``urn:oid:<uid>``."""


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
