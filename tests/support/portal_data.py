"""The metadata list of a generated patient, exactly as country A's standard channel serves it:
the portal's list page is tested and measured against these shapes, not hand-made ones.

:func:`generated_list` generates one patient with ``studies`` studies (``ncp.examples``),
indexes them into a node A's SQLite database, loads the reports through the report store, and
answers the two searchsets A serves for that patient (``DocumentReference``: manifests and
reports; ``ImagingStudy``: the manifests with their counts), through the provider's own search
and entry renderer (``ncp.fhir.listing``). Results are cached per arguments under ``cache``.

:func:`as_read` reads such entries as the peer client does (``ncp.consumer.read``): the
``MetadataList`` and manifests the portal's view model is built from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ncp.config import settings_from_mapping
from ncp.consumer.model import StudyManifest
from ncp.consumer.read import Notes, list_entry, manifest
from ncp.consumer.results import ListedReport, ListedStudy, MetadataList
from ncp.dicom.archive import open_archive
from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER, generate_examples
from ncp.fhir.datatypes import zone_of
from ncp.provider.indexer import index_source
from ncp.provider.list_api import searchset
from ncp.provider.list_entries import EntryRenderer
from ncp.provider.reports import load_folder
from ncp.provider.search import find_page
from ncp.provider.search_params import parse_search
from ncp.security.claims import PatientRef
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Patient
from ncp.validation.engine import Validator

COUNTRY_A = "AT"


@dataclass(frozen=True)
class GeneratedList:
    patient_id: str
    issuer: str
    document_references: list[dict[str, Any]]
    imaging_studies: list[dict[str, Any]]

    @property
    def patient(self) -> PatientRef:
        return PatientRef(f"urn:oid:{self.issuer}", self.patient_id)


def as_read(
    patient: PatientRef,
    document_references: list[dict[str, Any]],
    imaging_studies: list[dict[str, Any]],
) -> tuple[MetadataList, dict[str, StudyManifest]]:
    """A's entries read as B's peer client reads them (its reader, tolerant of quirks)."""
    notes = Notes(COUNTRY_A)
    entries = [
        list_entry(r, patient, notes, f"entry[{i}]") for i, r in enumerate(document_references)
    ]
    listed = MetadataList(
        studies=tuple(e for e in entries if isinstance(e, ListedStudy)),
        reports=tuple(e for e in entries if isinstance(e, ListedReport)),
        total=len(entries),
        pages=1,
        quirks=tuple(notes.quirks),
    )
    manifests = {m.study_uid: m for m in (manifest(s, patient, notes) for s in imaging_studies)}
    return listed, manifests


def generated_list(cache: Path, *, studies: int = 300, seed: int = 11) -> GeneratedList:
    """The list of a generated patient with ``studies`` studies (see the module docstring)."""
    done = cache / f"list-{studies}-{seed}.json"
    if done.exists():
        return GeneratedList(**json.loads(done.read_text(encoding="utf-8")))
    work = cache / f"work-{studies}-{seed}"
    generate_examples(work / "data", patients=1, seed=seed, big_patient_studies=studies)
    settings = settings_from_mapping(
        {
            "node": {
                "country": COUNTRY_A,
                "name": "NCPeH-AT imaging (test)",
                "patient_id_issuer": DEFAULT_PATIENT_ID_ISSUER,
            },
            "urls": {
                "standard": "https://ncp-a.test/fhir",
                "imaging": "https://ncp-a.test/dicomweb",
                "viewer": "https://ncp-a.test/viewer",
            },
            "database": {"url": "sqlite:///index.db"},
            "archive": {"kind": "folder", "path": "data/dicom"},
        },
        base_dir=work,
    )
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        sessions = session_factory(engine)
        index_source(sessions, open_archive(settings.archive), zone=zone_of(COUNTRY_A))
        load_folder(
            sessions,
            work / "data" / "reports",
            validator=Validator.default(),
            now=lambda: datetime.now(UTC),
        )
        with sessions() as session:
            patient = session.query(Patient).one()
            pid, issuer = patient.patient_id, patient.issuer
        out: dict[str, list[dict[str, Any]]] = {}
        for rtype in ("DocumentReference", "ImagingStudy"):
            out[rtype] = []
            while True:  # every page, as the peer client follows them
                query = parse_search(
                    rtype,
                    [
                        ("patient.identifier", f"urn:oid:{issuer}|{pid}"),
                        ("_count", "1000"),
                        ("_offset", str(len(out[rtype]))),
                    ],
                )
                with sessions() as session:
                    page = find_page(session, query, patient=(issuer, pid), zone=zone_of(COUNTRY_A))
                    bundle, _fresh = searchset(session, EntryRenderer(settings), page)
                entries = json.loads(bundle.json()).get("entry", [])
                out[rtype] += [e["resource"] for e in entries]
                if not entries or len(out[rtype]) >= page.total:
                    break
    finally:
        engine.dispose()
    result = GeneratedList(pid, issuer, out["DocumentReference"], out["ImagingStudy"])
    done.write_text(json.dumps(result.__dict__), encoding="utf-8")
    return result
