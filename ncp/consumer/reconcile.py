"""Import reconciliation, as national image exchange services do it (IEP asks for the local
patient number in the DICOM header): B's local identifier of the patient becomes Patient ID, with
B's issuer; A's identifier is kept in Other Patient IDs Sequence with A's issuer. Study, series and
SOP Instance UIDs, and everything else, stay as A sent them.

Runs on a verified instance only: verification reads A's bytes, reconciliation writes a new file
beside it. The pixel data is copied as it is (encapsulated or not); the transfer syntax is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence

from ncp.errors import NcpError
from ncp.fhir.identifiers import issuer_of
from ncp.security.claims import PatientRef


class ReconcileError(NcpError):
    """An instance could not be rewritten with B's identifier."""


@dataclass(frozen=True)
class LocalIdentity:
    """B's identifier of the patient and its issuer (Issuer of Patient ID)."""

    value: str
    issuer: str


def reconcile(path: Path, a_patient: PatientRef, local: LocalIdentity) -> None:
    """Rewrite the instance at ``path`` in place (through a temporary file and a rename)."""
    try:
        ds = dcmread(path)
    except Exception as exc:  # pydicom raises many kinds; all mean the same here
        raise ReconcileError(f"the instance cannot be read for reconciliation: {exc}") from None
    uids = (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"))
    a_issuer = issuer_of(a_patient.system)
    others = list(ds.get("OtherPatientIDsSequence") or [])
    if not any(
        str(item.get("PatientID", "")) == a_patient.value
        and str(item.get("IssuerOfPatientID", "")) == a_issuer
        for item in others
    ):
        item = Dataset()
        item.PatientID = a_patient.value
        item.IssuerOfPatientID = a_issuer
        item.TypeOfPatientID = "TEXT"
        others.append(item)
    ds.OtherPatientIDsSequence = Sequence(others)
    ds.PatientID = local.value
    ds.IssuerOfPatientID = local.issuer
    if uids != (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")):
        raise AssertionError("reconciliation must never change UIDs")
    temp = path.with_name(path.name + ".reconciled")
    try:
        dcmwrite(temp, ds, enforce_file_format=True)
        os.replace(temp, path)
    except Exception as exc:
        temp.unlink(missing_ok=True)
        raise ReconcileError(f"the reconciled instance cannot be written: {exc}") from None
