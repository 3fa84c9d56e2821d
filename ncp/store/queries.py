"""Read queries over the study index shared by the CLI and (later) the provider API."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.store.models import Patient, Study


def patient_studies(session: Session, patient_id: str, issuer: str) -> list[Study]:
    """The studies of one patient, newest first. Identifier and issuer match exactly: the
    index never widens a match the way some archives do (case folding, wildcards)."""
    stmt = (
        select(Study)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(Patient.patient_id == patient_id, Patient.issuer == issuer)
        .order_by(Study.started.desc(), Study.study_uid)
    )
    return list(session.scalars(stmt))


def patient_issuers(session: Session, patient_id: str) -> list[str]:
    """The issuers the index holds this exact Patient ID under ("" for none), for saying
    where a patient is when the issuer asked for holds none."""
    stmt = select(Patient.issuer).where(Patient.patient_id == patient_id).order_by(Patient.issuer)
    return list(session.scalars(stmt))
