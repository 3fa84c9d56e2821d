"""Country A's data in the demo: the archive indexed, the report folder loaded into A's report
store, and the patient with the most studies (the one the demo shows)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.config import NodeSettings
from ncp.demo.configs import DemoError
from ncp.demo.layout import COUNTRY_A
from ncp.dicom.archive import open_archive
from ncp.fhir.datatypes import zone_of
from ncp.provider.indexer import index_source
from ncp.provider.list_entries import render_studies
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Patient, Study
from ncp.store.queries import patient_studies


def _load_reports(settings: NodeSettings, sessions: sessionmaker[Session]) -> None:
    """The report folder into A's report store, through the ingest path (validated, versioned).
    Loading again stores nothing new."""
    if settings.reports.kind != "folder" or settings.reports.path is None:
        return
    from ncp.provider.reports import load_folder
    from ncp.validation.engine import Validator

    print("loading the imaging reports (each validated against its profile) ...", flush=True)
    summary = load_folder(
        sessions,
        settings.reports.path,
        validator=Validator.default(),
        now=lambda: datetime.now(UTC),
    )
    print(
        f"reports of country {COUNTRY_A}: {summary.stored} report versions stored (of "
        f"{len(summary.reports)} reports), {summary.unchanged} already stored, "
        f"{len(summary.failed)} refused; a report corrected or amended keeps each version"
    )
    for failure in summary.failed[:10]:
        print(f"  refused {failure.path}: {failure.reason}")


@dataclass(frozen=True)
class TopPatient:
    patient_id: str
    issuer: str
    studies: int
    newest: str | None = None
    """The Study Instance UID of the patient's newest study."""
    family: str | None = None
    given: str | None = None
    birth_date: str | None = None
    """ISO 8601 date."""


def index_and_list(settings: NodeSettings) -> TopPatient:
    """Index A's archive and print the list of the patient with the most studies."""
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        sessions = session_factory(engine)
        zone = zone_of(settings.node.country)
        run = index_source(
            sessions,
            open_archive(settings.archive),
            zone=zone,
            patient_id_issuer=settings.archive.patient_id_issuer,
        )
        rendered = render_studies(settings, sessions, run.touched)
        print(
            f"index of country {COUNTRY_A}: {run.added} added, {run.updated} updated, "
            f"{run.unchanged} unchanged, {run.removed} removed, {len(run.skipped)} skipped; "
            f"{rendered} list entries rendered"
        )
        _load_reports(settings, sessions)
        issuer = settings.node.patient_id_issuer
        with sessions() as session:
            top = session.execute(
                select(
                    Patient.patient_id,
                    Patient.family_name,
                    Patient.given_name,
                    Patient.birth_date,
                    func.count(Study.id),
                )
                .join(Study, Study.patient_pk == Patient.id)
                .where(Patient.issuer == issuer)
                .group_by(
                    Patient.id,
                    Patient.patient_id,
                    Patient.family_name,
                    Patient.given_name,
                    Patient.birth_date,
                )
                .order_by(func.count(Study.id).desc(), Patient.patient_id)
            ).first()
            if top is None:
                raise DemoError("the index is empty: nothing to show")
            pid, family, given, born, count = top
            studies = patient_studies(session, pid, issuer)
    finally:
        engine.dispose()
    print(f"\npatient {pid} ({given} {family}): {count} studies; the ten newest:")
    for st in studies[:10]:
        when = st.started.strftime("%Y-%m-%d") if st.started else "----------"
        print(
            f"  {when}  {st.modalities:<6} {(st.description or '')[:34]:<34} "
            f"{st.num_series:>2} series {st.num_instances:>4} instances "
            f"{st.size_bytes / 1e6:6.1f} MB"
        )
    return TopPatient(
        pid,
        issuer,
        int(count),
        studies[0].study_uid if studies else None,
        family=family,
        given=given,
        birth_date=born.isoformat() if born else None,
    )
