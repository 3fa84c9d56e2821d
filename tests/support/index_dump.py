"""A canonical, source-independent dump of the study index, for comparing two indexes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.store.models import Instance, Patient, Series, Study

_SKIP = {"id", "patient_pk", "study_pk", "series_pk", "source", "locator", "revision"}
"""Row ids, where an instance is stored (differ by source by design), and the study's revision
(a random change marker: two indexes of the same data differ in it)."""


def _row(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns if c.key not in _SKIP}


def dump_index(session: Session) -> dict[str, Any]:
    """Patients, studies, series and instances keyed by their identifiers, without the columns
    of :data:`_SKIP`."""
    patients = {(p.patient_id, p.issuer): _row(p) for p in session.scalars(select(Patient))}
    studies = {}
    for s in session.scalars(select(Study)):
        row = _row(s)
        row["patient"] = (s.patient.patient_id, s.patient.issuer)
        studies[s.study_uid] = row
    series = {}
    for r in session.scalars(select(Series)):
        row = _row(r)
        row["study"] = r.study.study_uid
        series[r.series_uid] = row
    instances = {}
    for i, series_uid in session.execute(
        select(Instance, Series.series_uid).join(Series, Series.id == Instance.series_pk)
    ):
        row = _row(i)
        row["series"] = series_uid
        instances[i.sop_uid] = row
    return {"patients": patients, "studies": studies, "series": series, "instances": instances}
