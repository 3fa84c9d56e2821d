"""Index and report-store rows as the plain values the FHIR builders take (:mod:`ncp.fhir.values`).

The one place where country A's storage meets the resource builders: the builders never see a
row, so country B can build and read the same values from A's resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.fhir.manifest import instance_order, series_order
from ncp.fhir.values import (
    DicomCode,
    InstanceFacts,
    Organisation,
    PatientFacts,
    ReportFacts,
    SeriesFacts,
    StudyFacts,
)
from ncp.store.models import Instance, Patient, Report, ReportVersion, Series, Study


def _items(joined: str) -> tuple[str, ...]:
    """A backslash-joined index column (DICOM multi-value style) as its non-blank items."""
    return tuple(item for item in joined.split("\\") if item.strip())


def describe_patient(patient: Patient) -> PatientFacts:
    return PatientFacts(
        patient_id=patient.patient_id,
        issuer=patient.issuer or "",
        family_name=patient.family_name,
        given_name=patient.given_name,
        birth_date=patient.birth_date,
        sex=patient.sex,
    )


def describe_instance(row: Instance) -> InstanceFacts:
    return InstanceFacts(
        sop_uid=row.sop_uid,
        sop_class_uid=row.sop_class_uid,
        number=row.instance_number,
        frames=row.number_of_frames,
        size_bytes=row.size_bytes,
        document_title=(
            DicomCode(row.title_scheme, row.title_code, row.title_meaning)
            if row.title_code or row.title_meaning
            else None
        ),
    )


def describe_series(series: Series, instances: Iterable[Instance] = ()) -> SeriesFacts:
    described = sorted((describe_instance(i) for i in instances), key=instance_order)
    return SeriesFacts(
        series_uid=series.series_uid,
        number=series.number,
        modality=series.modality,
        description=series.description,
        body_part=series.body_part,
        laterality=series.laterality,
        started=series.started,
        instances=tuple(described),
    )


def describe_study(
    study: Study,
    series: Sequence[Series] | None = None,
    instances: Mapping[str, Sequence[Instance]] | None = None,
) -> StudyFacts:
    """A study with the series given (each with its instances from ``instances``, by Series
    Instance UID); without ``series`` the study's own values only (what a manifest's
    DocumentReference needs).

    The start is Study Date/Time, else the earliest series start: reading the series for that
    only when the study has no date of its own.
    """
    started = study.started
    if started is None:
        starts = [s.started for s in (series or study.series) if s.started is not None]
        started = min(starts) if starts else None
    described: tuple[SeriesFacts, ...] = ()
    if series is not None:
        by_uid = instances or {}
        described = tuple(
            sorted(
                (describe_series(s, by_uid.get(s.series_uid, ())) for s in series),
                key=series_order,
            )
        )
    procedure = DicomCode(study.procedure_scheme, study.procedure_code, study.procedure_meaning)
    requesting = DicomCode(
        study.requesting_scheme,
        study.requesting_code,
        study.requesting_meaning or study.requesting_service,
    )
    return StudyFacts(
        study_uid=study.study_uid,
        patient=describe_patient(study.patient),
        started=started,
        accession_number=study.accession_number,
        accession_issuer=study.accession_issuer,
        description=study.description,
        procedure=procedure,
        requesting=requesting,
        referring_physician=study.referring_physician,
        referring_organization=study.referring_organization,
        modalities=_items(study.modalities),
        body_parts=_items(study.body_parts),
        size_bytes=study.size_bytes,
        series=described,
    )


def describe_indexed_study(session: Session, study: Study) -> StudyFacts:
    """A study of the index with all its series and instances (one query for the instances:
    the index model has no Series→Instance relationship)."""
    uid_of = {s.id: s.series_uid for s in study.series}
    instances: dict[str, list[Instance]] = {uid: [] for uid in uid_of.values()}
    if uid_of:
        rows = session.scalars(select(Instance).where(Instance.series_pk.in_(list(uid_of))))
        for row in rows:
            instances[uid_of[row.series_pk]].append(row)
    return describe_study(study, study.series, instances)


def describe_report(report: Report, version: ReportVersion) -> ReportFacts:
    custodian = None
    if version.custodian_name and version.custodian_system and version.custodian_value:
        custodian = Organisation(
            version.custodian_name, version.custodian_system, version.custodian_value
        )
    return ReportFacts(
        resource_id=report.id,
        identifier_system=report.identifier_system,
        identifier_value=report.identifier_value,
        patient_id=report.patient_id,
        patient_issuer=report.patient_issuer,
        version=version.version,
        latest=version.latest,
        bundle_system=version.bundle_system,
        bundle_value=version.bundle_value,
        status=version.status,
        title=version.title,
        date=version.date,
        size_bytes=version.size_bytes,
        language=version.language,
        author=version.author,
        custodian=custodian,
        study_uid=version.study_uid,
        accession_number=version.accession_number,
        accession_issuer=version.accession_issuer,
        modalities=_items(version.modalities),
        body_parts=_items(version.body_parts),
        procedure_code=version.procedure_code,
        requesting_code=version.requesting_code,
        priority=version.priority,
    )


__all__ = [
    "describe_indexed_study",
    "describe_instance",
    "describe_patient",
    "describe_report",
    "describe_series",
    "describe_study",
]
