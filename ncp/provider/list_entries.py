"""Rendered metadata list entries: a list of a thousand studies is read from the index, not built.

Building an ImagingStudy manifest (series, instances, endpoints) takes most of a millisecond in
Python; a patient's list of a thousand takes most of a second. So each entry, once built, is
kept in the index as compact FHIR JSON (:class:`ncp.store.models.ListEntry`) with what it was
built from that can change: its ``source`` (the study's ``revision``, new whenever the indexer
changes the study; the patient's name, the subject's display; for report entries the version's
``latest`` flag and status and the indexed study they show) and its ``renderer`` (a fingerprint
of the node's URLs and custodian, the ncp version and :data:`RENDERER_VERSION`). A request reads
the kept entries of its page whose source and renderer are still the current ones, compared in
SQL (:func:`_source_sql` writes there what :func:`_source` writes here), and builds only the
rest, which it keeps for the next request.

Why compare sources rather than have the writers delete entries: the indexer commits in
batches and a replica may render between two of them. An entry built from a mix of old and new
rows carries a revision that is no longer the study's once the indexer's last step has run, so
it is never served again; no writer needs to know the renderer, and a change of the node's URLs
re-renders by itself.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import ncp
from ncp.config import NodeSettings
from ncp.fhir.io import to_json
from ncp.fhir.listing import manifest_reference, patient_resource, report_reference
from ncp.fhir.manifest import Custodian, ImagingEndpoints, ManifestError, imaging_study
from ncp.fhir.values import PatientFacts
from ncp.provider.describe import describe_patient, describe_report, describe_study
from ncp.provider.search import (
    EntryKey,
    ManifestMatch,
    PageKeys,
    PatientInclude,
    ReportMatch,
    StudyMatch,
    load_page,
    parse_search,
)
from ncp.store.entry_memory import EntryMemory
from ncp.store.models import EntryKind, ListEntry, Patient, ReportVersion, Study

log = logging.getLogger(__name__)

RENDERER_VERSION = "2"
"""Raise when the builders' output changes without a change of the ncp version."""
_CHUNK = 500
"""Keys per ``IN`` list."""


class Rendered(NamedTuple):
    """One entry of a page: its resource as compact JSON (None: the builder refused it,
    ``problem`` says why) and the Study Instance UID it names, if any (for the audit)."""

    kind: EntryKind | None
    """None for the included Patient."""
    pk: int
    resource_type: str
    resource_id: str
    version_id: str | None
    body: bytes | None
    study_uid: str | None
    problem: str = ""


@dataclass(frozen=True)
class Source:
    """An entry built now, to be kept (:func:`store`)."""

    kind: EntryKind
    pk: int
    renderer: str
    source: str
    body: bytes


class EntryRenderer:
    """Renders a page's entries with the node's endpoints, custodian and base URL, reading
    what the index keeps and building the rest."""

    def __init__(self, settings: NodeSettings, memory: EntryMemory | None = None) -> None:
        self.memory = memory or EntryMemory(0)
        self.base = settings.urls.standard.rstrip("/")
        self.custodian = Custodian.from_settings(settings)
        self._settings = settings
        self._endpoints: ImagingEndpoints | None = None
        self.fingerprint = _fingerprint(self.base, self.custodian, self.endpoints)

    @property
    def endpoints(self) -> ImagingEndpoints:
        if self._endpoints is None:
            self._endpoints = ImagingEndpoints.from_settings(self._settings)
        return self._endpoints

    def page(
        self, session: Session, keys: PageKeys
    ) -> tuple[list[Rendered], list[Rendered], list[Source]]:
        """The page's matches and included entries, rendered, and the entries built now that
        the caller should :func:`store` once its read is over."""
        wanted = [k for k in (*keys.matches, *keys.included) if isinstance(k, EntryKey)]
        kept = _kept(session, wanted, self.fingerprint, keys.patient_pk, self.memory)
        missing = [k for k in dict.fromkeys(wanted) if (k.kind, k.pk) not in kept]
        built: dict[tuple[EntryKind, int], Rendered] = {}
        fresh: list[Source] = []
        if missing:
            loaded = load_page(
                session, PageKeys(keys.query, keys.total, keys.patient_pk, tuple(missing))
            )
            for key, match in zip(missing, loaded.matches, strict=True):
                rendered = self._build(match, key.pk)
                built[(key.kind, key.pk)] = rendered
                if rendered.body is not None:
                    source = _source(match)
                    fresh.append(Source(key.kind, key.pk, self.fingerprint, source, rendered.body))
                    self.memory.put((key.kind, key.pk), self.fingerprint, source, rendered.body)

        def one(key: EntryKey | PatientInclude) -> Rendered:
            if isinstance(key, PatientInclude):
                return self._build(key, 0)
            found = built.get((key.kind, key.pk))
            if found is not None:
                return found
            report = key.kind == EntryKind.REPORT
            return Rendered(
                key.kind,
                key.pk,
                key.resource_type,
                key.resource_id,
                str(key.version) if report else None,
                kept[(key.kind, key.pk)],
                key.study_uid,
            )

        return [one(k) for k in keys.matches], [one(k) for k in keys.included], fresh

    # -- building -----------------------------------------------------------------------------

    def _build(self, row: Any, pk: int) -> Rendered:
        kind = _kind_of(row)
        try:
            resource, uid = self._resource(row)
        except ManifestError as exc:
            rtype = "ImagingStudy" if isinstance(row, StudyMatch) else "DocumentReference"
            # Which entry and why, so an operator can find the study and fix its data.
            log.warning(
                "list entry left out: %s of %s: %s (rule: %s)",
                rtype,
                _subject_of(row),
                exc,
                exc.rule or "unnamed",
            )
            return Rendered(kind, pk, rtype, "", None, None, None, str(exc))
        version = resource.get("meta", {}).get("versionId")
        body = to_json(resource)
        return Rendered(kind, pk, resource["resourceType"], resource["id"], version, body, uid)

    def _resource(self, row: Any) -> tuple[dict[str, Any], str | None]:
        if isinstance(row, StudyMatch):
            study = describe_study(row.study, row.series, row.instances)
            resource = imaging_study(study, self.endpoints, self.custodian)
            return resource, row.study.study_uid
        if isinstance(row, ManifestMatch):
            resource = manifest_reference(
                describe_study(row.study), self.custodian, base_url=self.base
            )
            return resource, row.study.study_uid
        if isinstance(row, ReportMatch):
            resource = report_reference(
                describe_report(row.report, row.version),
                base_url=self.base,
                study=describe_study(row.study) if row.study is not None else None,
                custodian=self.custodian,
            )
            # Versions of one report share the entry's id: the version tells them apart (bdl-7).
            resource["meta"] = {**resource.get("meta", {}), "versionId": str(row.version.version)}
            return resource, row.version.study_uid
        if isinstance(row, PatientInclude):
            patient = (
                describe_patient(row.patient)
                if row.patient is not None
                else PatientFacts(patient_id=row.value, issuer=row.issuer)
            )
            return patient_resource(patient), None
        raise TypeError(f"unexpected search row {type(row).__name__}")


def _subject_of(row: Any) -> str:
    """What an entry is about, for the log (UIDs and ids only, no patient data)."""
    if isinstance(row, StudyMatch | ManifestMatch):
        return f"study {row.study.study_uid}"
    if isinstance(row, ReportMatch):
        return f"report {row.report.id} (study {row.version.study_uid or 'none'})"
    return "the patient"


def _kind_of(row: Any) -> EntryKind | None:
    if isinstance(row, StudyMatch):
        return EntryKind.STUDY
    if isinstance(row, ManifestMatch):
        return EntryKind.MANIFEST
    if isinstance(row, ReportMatch):
        return EntryKind.REPORT
    return None


def store(sessions: sessionmaker[Session], entries: Sequence[Source]) -> None:
    """Keep entries built by :meth:`EntryRenderer.page` (insert or overwrite). A failure only
    costs the next request the building again: it is logged, not raised."""
    if not entries:
        return
    rows = [
        {
            "kind": int(e.kind),
            "subject_pk": e.pk,
            "renderer": e.renderer,
            "source": e.source,
            "body": e.body,
        }
        for e in entries
    ]
    try:
        with sessions.begin() as session:
            dialect = session.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            stmt = insert(ListEntry)
            stmt = stmt.on_conflict_do_update(
                index_elements=[ListEntry.kind, ListEntry.subject_pk],
                set_={
                    "renderer": stmt.excluded.renderer,
                    "source": stmt.excluded.source,
                    "body": stmt.excluded.body,
                },
            )
            for start in range(0, len(rows), _CHUNK):
                session.execute(stmt, rows[start : start + _CHUNK])
    except SQLAlchemyError as exc:
        log.warning("rendered list entries not kept: %s", type(exc).__name__)


def render_studies(
    settings: NodeSettings, sessions: sessionmaker[Session], study_pks: Iterable[int]
) -> int:
    """Render and keep the ImagingStudy and manifest entries of these studies, so that the next
    list is read, not built (``ncp index`` calls it for the studies it changed). Studies that are
    gone are passed over. Returns how many entries were kept."""
    renderer = EntryRenderer(settings)
    pks = sorted(set(study_pks))
    kept = 0
    for start in range(0, len(pks), _CHUNK):
        with sessions() as session:
            rows = session.execute(
                select(Study.id, Study.study_uid, Study.patient_pk).where(
                    Study.id.in_(pks[start : start + _CHUNK])
                )
            ).all()
            fresh: list[Source] = []
            for patient_pk in sorted({row.patient_pk for row in rows}):
                keys = tuple(
                    EntryKey(kind, row.id, row.study_uid)
                    for row in rows
                    if row.patient_pk == patient_pk
                    for kind in (EntryKind.STUDY, EntryKind.MANIFEST)
                )
                page = PageKeys(_ANY_LIST, len(keys), patient_pk, keys)
                fresh += renderer.page(session, page)[2]
        store(sessions, fresh)
        kept += len(fresh)
    return kept


_ANY_LIST = parse_search("ImagingStudy", [])
"""The query a page made outside a search carries (loading does not read it)."""


# --- sources ---------------------------------------------------------------------------------

_SEP = "|"


def _study_source(study: Study | None) -> str:
    if study is None:
        return "-"
    patient = study.patient
    return _SEP.join((study.revision, patient.family_name or "", patient.given_name or ""))


def _source(row: Any) -> str:
    """What an entry built from ``row`` depends on that can change (see the module docstring);
    :func:`_source_sql` must write the same text from the tables."""
    if isinstance(row, ReportMatch):
        latest = "1" if row.version.latest else "0"
        return _SEP.join((latest, row.version.status, _study_source(row.study)))
    return _study_source(row.study)


def _study_source_sql(study: type[Study] | Any, patient: type[Patient] | Any) -> ColumnElement[str]:
    sep = literal(_SEP)
    return (
        study.revision
        + sep
        + func.coalesce(patient.family_name, "")
        + sep
        + func.coalesce(patient.given_name, "")
    )


def _source_sql(kind: EntryKind) -> ColumnElement[str]:
    """:func:`_source` in SQL, over the joins of :func:`_kept`."""
    if kind != EntryKind.REPORT:
        return _study_source_sql(Study, Patient)
    latest = case((ReportVersion.latest, literal("1")), else_=literal("0"))
    study = func.coalesce(_study_source_sql(Study, Patient), literal("-"))
    return latest + literal(_SEP) + ReportVersion.status + literal(_SEP) + study


def _fingerprint(base: str, custodian: Custodian, endpoints: ImagingEndpoints) -> str:
    text = repr((RENDERER_VERSION, ncp.__version__, base, custodian, endpoints))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def _kept_statements(
    kind: EntryKind,
) -> tuple[Select[int, str], Select[int, str, bytes]]:
    """The two statements of :func:`_kept` for one kind, built once: which kept entries are
    current (renderer and source), and their bodies. Built per request they cost more of the
    node's CPU than SQLite spends running them (expressions, cache keys); bound here by name:
    ``renderer``, ``pks`` (expanding) and, for reports, ``patient_pk``."""
    pks: BindParameter[list[int]] = bindparam("pks", expanding=True)
    current = select(ListEntry.subject_pk, ListEntry.source).where(
        ListEntry.kind == int(kind), ListEntry.renderer == bindparam("renderer")
    )
    if kind == EntryKind.REPORT:
        # The study a report entry shows: the patient's indexed study with the report's UID.
        shown = and_(
            Study.study_uid == ReportVersion.study_uid,
            Study.patient_pk == bindparam("patient_pk"),
        )
        current = (
            current.join(ReportVersion, ReportVersion.id == ListEntry.subject_pk)
            .outerjoin(Study, shown)
            .outerjoin(Patient, Patient.id == Study.patient_pk)
        )
    else:
        current = current.join(Study, Study.id == ListEntry.subject_pk).join(
            Patient, Patient.id == Study.patient_pk
        )
    current = current.where(ListEntry.source == _source_sql(kind), ListEntry.subject_pk.in_(pks))
    bodies = select(ListEntry.subject_pk, ListEntry.source, ListEntry.body).where(
        ListEntry.kind == int(kind), ListEntry.subject_pk.in_(bindparam("pks", expanding=True))
    )
    return current, bodies


def _kept(
    session: Session,
    keys: Sequence[EntryKey],
    renderer: str,
    patient_pk: int | None,
    memory: EntryMemory,
) -> dict[tuple[EntryKind, int], bytes]:
    """The kept bodies of these entries whose renderer and source are the current ones: from
    ``memory`` when it has them with that source, else from the database (and then remembered)."""
    out: dict[tuple[EntryKind, int], bytes] = {}
    # Plain rows of columns: Core on the session's connection, not the ORM's statement path.
    connection = session.connection()
    for kind in EntryKind:
        pks = sorted({k.pk for k in keys if k.kind == kind})
        if not pks:
            continue
        current, bodies = _kept_statements(kind)
        params: dict[str, Any] = {"renderer": renderer}
        if kind == EntryKind.REPORT:
            # No patient row (reports only): a NULL compares equal to no study, as before.
            params["patient_pk"] = patient_pk
        for start in range(0, len(pks), _CHUNK):
            chunk = pks[start : start + _CHUNK]
            unread: dict[int, str] = {}
            for pk, source in connection.execute(current, {**params, "pks": chunk}):
                body = memory.get((kind, pk), renderer, source)
                if body is not None:
                    out[(kind, pk)] = body
                else:
                    unread[pk] = source
            if unread:
                rows = connection.execute(bodies, {"pks": sorted(unread)})
                for pk, source, body in rows:
                    if unread.get(pk) == source:  # not overwritten since
                        out[(kind, pk)] = body
                        memory.put((kind, pk), renderer, source, body)
    return out


__all__ = ["RENDERER_VERSION", "EntryRenderer", "Rendered", "Source", "render_studies", "store"]
