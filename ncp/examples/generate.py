"""Generate a deterministic example data set: DICOM studies, report bundles and a manifest.

Output under ``out``::

    dicom/<patient-id>/<study-uid>/<series-uid>/<sop-uid>.dcm    layout "tree"
    dicom/DICOMDIR + dicom/PT000000/ST000000/SE000000/IM000000   layout "media" (PS3.10 file-set)
    reports/<patient-id>/<accession>-v<N>.json                   one document Bundle per version
    manifest.json                                                what was generated

Everything follows from the arguments: the same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileInstance, FileSet, RecordNode
from pydicom.uid import UID, ExplicitVRLittleEndian

from ncp import __version__
from ncp.examples.dicom_writer import EncodedInstance, encode_study
from ncp.examples.plan import (
    REFERENCE_DATE,
    PatientPlan,
    RunPlan,
    StudyPlan,
    make_uid,
    plan_run,
)
from ncp.examples.reports import PlannedReport, patient_identifier_system, plan_report
from ncp.fhir.report import LOINC, SNOMED, build_report_bundle, document_identifier

Layout = Literal["tree", "media"]

DEFAULT_PATIENT_ID_ISSUER = "1.2.40.0.10.1.4.3.1"
"""Austrian social insurance numbers (the default country is AT)."""
SUPPORTED_LANGUAGES = ("en",)
PARALLEL_FROM_INSTANCES = 3000
"""Below this many instances, starting worker processes costs more than it saves."""
_BATCH = 8
"""Studies per job: small enough to balance the big patient's hundreds of studies."""

_StudyBatch = tuple[PatientPlan, tuple[StudyPlan, ...], int]
"""A worker's job: a patient, some of their studies, the seed."""
_J = TypeVar("_J")
_R = TypeVar("_R")


class GenerationError(ValueError):
    """The generator's arguments are unusable; the message names the argument."""


@dataclass(frozen=True, slots=True)
class GenerationSummary:
    patients: int
    studies: int
    series: int
    instances: int
    reports: int
    report_versions: int
    bytes: int
    """Size of every file written (DICOM, DICOMDIR, reports, manifest)."""


def _check_arguments(
    out: Path,
    patients: int,
    big_patient_studies: int,
    layout: str,
    country: str,
    issuer: str,
    language: str,
) -> str:
    if patients < 1:
        raise GenerationError(f"patients must be at least 1, got {patients}")
    if big_patient_studies < 1:
        raise GenerationError(f"big_patient_studies must be at least 1, got {big_patient_studies}")
    if layout not in ("tree", "media"):
        raise GenerationError(f"layout must be 'tree' or 'media', got {layout!r}")
    if not re.fullmatch(r"[A-Z]{2}", country):
        raise GenerationError(f"country must be an ISO 3166 alpha-2 code, got {country!r}")
    if language not in SUPPORTED_LANGUAGES:
        raise GenerationError(
            f"language {language!r}: report templates exist for {SUPPORTED_LANGUAGES}"
        )
    if len(issuer) > 64 or "\\" in issuer:
        raise GenerationError("patient_id_issuer must fit DICOM LO (64 characters, no backslash)")
    try:
        system = patient_identifier_system(issuer)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GenerationError(f"{out} must be an empty or new directory")
    return system


def generate_examples(
    out: Path,
    *,
    patients: int,
    seed: int,
    big_patient_studies: int = 300,
    layout: Layout = "tree",
    country: str = "AT",
    patient_id_issuer: str = DEFAULT_PATIENT_ID_ISSUER,
    language: str = "en",
    workers: int | None = None,
) -> GenerationSummary:
    """Write a data set of `patients` patients; the first has `big_patient_studies` studies.

    Studies are independent, so large runs are spread over `workers` processes (default: one
    per CPU when there are enough instances to pay for them); the bytes do not depend on it.
    """
    out = Path(out)
    system = _check_arguments(
        out, patients, big_patient_studies, layout, country, patient_id_issuer, language
    )
    run = plan_run(
        patients=patients,
        seed=seed,
        big_patient_studies=big_patient_studies,
        country=country,
        issuer=patient_id_issuer,
    )
    reports = {
        study.uid: plan_report(
            patient, study, seed=seed, patient_id_system=system, language=language
        )
        for patient in run.patients
        for study in patient.studies
    }
    dicom = out / "dicom"
    dicom.mkdir(parents=True)
    totals = _totals(run, reports)
    with _pool(workers, totals.instances) as pool:
        if layout == "tree":
            study_bytes = _write_tree(dicom, run, pool)
        else:
            study_bytes = _write_media(dicom, run, pool)
        report_files = _write_reports(out / "reports", run, reports, pool)
    manifest = _manifest(run, reports, study_bytes, report_files, totals, layout, system, language)
    (out / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    return replace(totals, bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()))


def _totals(run: RunPlan, reports: dict[str, PlannedReport | None]) -> GenerationSummary:
    """Counts of what the plan holds; bytes are known only once written."""
    studies = [s for p in run.patients for s in p.studies]
    done = [r for r in reports.values() if r is not None]
    return GenerationSummary(
        patients=len(run.patients),
        studies=len(studies),
        series=sum(len(s.series) for s in studies),
        instances=sum(s.instance_count for s in studies),
        reports=len(done),
        report_versions=sum(len(r.versions) for r in done),
        bytes=0,
    )


class _Serial:
    """The pool interface, run in this process: small runs do not pay for workers."""

    def map(self, fn: Callable[[_J], _R], jobs: Iterable[_J]) -> Iterator[_R]:
        return map(fn, jobs)

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _pool(workers: int | None, instances: int) -> ProcessPoolExecutor | _Serial:
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if instances >= PARALLEL_FROM_INSTANCES else 1
    return ProcessPoolExecutor(workers) if workers > 1 else _Serial()


def _jobs(run: RunPlan) -> list[_StudyBatch]:
    """Studies in small batches, each with its patient (without the patient's other studies,
    which the worker does not need)."""
    return [
        (replace(patient, studies=()), patient.studies[i : i + _BATCH], run.seed)
        for patient in run.patients
        for i in range(0, len(patient.studies), _BATCH)
    ]


def _write_tree(root: Path, run: RunPlan, pool: ProcessPoolExecutor | _Serial) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for done in pool.map(functools.partial(_write_studies, root), _jobs(run)):
        sizes.update(done)
    return sizes


def _write_studies(root: Path, job: _StudyBatch) -> dict[str, int]:
    patient, studies, seed = job
    sizes: dict[str, int] = {}
    for study in studies:
        folder = root
        for instance in encode_study(patient, study, seed):
            if folder.name != instance.series.uid:
                folder = root / patient.patient_id / study.uid / instance.series.uid
                folder.mkdir(parents=True)
            (folder / f"{instance.sop_instance_uid}.dcm").write_bytes(instance.data)
            sizes[study.uid] = sizes.get(study.uid, 0) + len(instance.data)
    return sizes


class _AppendOnlyFileSet(FileSet):
    """A FileSet for a new file-set whose instances are each added once, written once.

    ``FileSet.add_custom`` first looks for the SOP Instance UID among all staged instances,
    which makes adding N instances take N² steps (minutes for ten thousand). Every UID here is
    new by construction, so that lookup is skipped by hiding the staged instances from it.
    """

    _adding = False

    def __iter__(self) -> Iterator[FileInstance]:
        if self._adding:
            return iter(())
        return super().__iter__()

    def add_custom(self, ds_or_path: Any, leaf: RecordNode) -> FileInstance:
        self._adding = True
        try:
            return super().add_custom(ds_or_path, leaf)
        finally:
            self._adding = False

    def load(self, *args: Any, **kwargs: Any) -> None:
        """``write`` ends by parsing the DICOMDIR it has just written, to refresh this object;
        the object is dropped after writing, so that (a third of the time) is skipped. The
        tests read the DICOMDIR back with a fresh FileSet."""


class _KeyedNode(RecordNode):
    """A directory record node that computes its key once: the tree compares a new node with
    every sibling on each insertion, and a patient has hundreds of studies."""

    _cached_key: str | None = None

    @property
    def key(self) -> str:
        if self._cached_key is None:
            self._cached_key = str(super().key)
        return self._cached_key


class _Encoded(Dataset):
    """What FileSet needs of an instance (its UIDs), carrying bytes already encoded: the file
    is staged by writing those bytes instead of encoding the data set once more."""

    def __init__(self, instance: EncodedInstance, sop_class_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = instance.sop_instance_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        self._encoded = instance.data

    def save_as(self, filename: Any, /, *args: Any, **kwargs: Any) -> None:
        Path(filename).write_bytes(self._encoded)


def _record(record_type: str, charset: str | None, **values: Any) -> Dataset:
    record = Dataset()
    if charset:
        record.SpecificCharacterSet = charset
    record.DirectoryRecordType = record_type
    for keyword, value in values.items():
        setattr(record, keyword, value)
    return record


def _encode_batch(job: _StudyBatch) -> list[list[EncodedInstance]]:
    patient, studies, seed = job
    return [list(encode_study(patient, study, seed)) for study in studies]


def _write_media(root: Path, run: RunPlan, pool: ProcessPoolExecutor | _Serial) -> dict[str, int]:
    """A PS3.10 file-set: pydicom names the files (PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn) and
    writes the DICOMDIR with PATIENT, STUDY, SERIES and IMAGE records (PS3.3 F.5).

    Workers encode the studies while this process files them, in plan order."""
    fs = _AppendOnlyFileSet()
    fs.ID = "NCP EXAMPLES"
    fs.UID = UID(make_uid(run.seed, "file-set"))
    jobs = _jobs(run)
    sizes: dict[str, int] = {}
    for (patient, studies, _), encoded in zip(jobs, pool.map(_encode_batch, jobs), strict=True):
        for study, instances in zip(studies, encoded, strict=True):
            # Records made once per study, shared by the node chains of its files.
            records = (_patient_record(patient), _study_record(study))
            for instance in instances:
                _add_instance(fs, records, study, instance)
            sizes[study.uid] = sum(len(instance.data) for instance in instances)
    fs.write(root)
    return sizes


def _patient_record(patient: PatientPlan) -> Dataset:
    charset = None if patient.is_ascii else "ISO_IR 192"
    return _record("PATIENT", charset, PatientName=patient.dicom_name, PatientID=patient.patient_id)


def _study_record(study: StudyPlan) -> Dataset:
    return _record(
        "STUDY",
        None if study.procedure.study_description.isascii() else "ISO_IR 192",
        StudyDate=study.started.strftime("%Y%m%d"),
        StudyTime=study.started.strftime("%H%M%S"),
        StudyDescription=study.procedure.study_description,
        StudyInstanceUID=study.uid,
        StudyID=study.study_id,
        AccessionNumber=study.accession,
    )


def _add_instance(
    fs: _AppendOnlyFileSet,
    records: tuple[Dataset, Dataset],
    study: StudyPlan,
    instance: EncodedInstance,
) -> None:
    series = instance.series
    # A fresh chain of nodes per instance: the tree merges it into the nodes it already has,
    # by key, and keeps only what is new.
    nodes = [
        _KeyedNode(records[0]),
        _KeyedNode(records[1]),
        _KeyedNode(
            _record(
                "SERIES",
                None,
                Modality=study.modality.modality,
                SeriesInstanceUID=series.uid,
                SeriesNumber=series.number,
            )
        ),
        _KeyedNode(
            _record(
                "IMAGE",
                None,
                InstanceNumber=instance.number,
                ReferencedSOPInstanceUIDInFile=instance.sop_instance_uid,
            )
        ),
    ]
    for parent, child in itertools.pairwise(nodes):
        child.parent = parent
    fs.add_custom(_Encoded(instance, study.modality.sop_class_uid), nodes[-1])


def _write_reports(
    root: Path,
    run: RunPlan,
    reports: dict[str, PlannedReport | None],
    pool: ProcessPoolExecutor | _Serial,
) -> dict[tuple[str, int], str]:
    jobs = [
        (
            patient.patient_id,
            [(s.uid, s.accession, r) for s in patient.studies if (r := reports[s.uid]) is not None],
        )
        for patient in run.patients
    ]
    files: dict[tuple[str, int], str] = {}
    for done in pool.map(functools.partial(_write_patient_reports, root), jobs):
        files.update(done)
    return files


def _write_patient_reports(
    root: Path, job: tuple[str, list[tuple[str, str, PlannedReport]]]
) -> dict[tuple[str, int], str]:
    patient_id, studies = job
    files: dict[tuple[str, int], str] = {}
    folder = root / patient_id
    for study_uid, accession, report in studies:
        folder.mkdir(parents=True, exist_ok=True)
        for version in report.versions:
            path = folder / f"{accession}-v{version.version}.json"
            text = json.dumps(build_report_bundle(version), ensure_ascii=False, indent=1)
            path.write_text(text, encoding="utf-8")
            files[(study_uid, version.version)] = path.relative_to(root.parent).as_posix()
    return files


def _manifest(
    run: RunPlan,
    reports: dict[str, PlannedReport | None],
    study_bytes: dict[str, int],
    report_files: dict[tuple[str, int], str],
    totals: GenerationSummary,
    layout: Layout,
    system: str,
    language: str,
) -> dict[str, Any]:
    return {
        "generator": f"ncp {__version__} examples",
        "seed": run.seed,
        "referenceDate": REFERENCE_DATE.isoformat(),
        "country": run.country,
        "timezone": run.zone,
        "language": language,
        "layout": layout,
        "dicomRoot": "dicom",
        "patientIdIssuer": run.issuer,
        "patientIdSystem": system,
        "totals": {
            "patients": totals.patients,
            "studies": totals.studies,
            "series": totals.series,
            "instances": totals.instances,
            "dicomBytes": sum(study_bytes.values()),
            "reports": totals.reports,
            "reportVersions": totals.report_versions,
        },
        "patients": [
            {
                "id": p.patient_id,
                "dicomName": p.dicom_name,
                "family": p.family,
                "given": p.given,
                "birthDate": p.birth_date.isoformat(),
                "sex": p.sex,
                "studies": [
                    _study_entry(s, reports[s.uid], study_bytes.get(s.uid, 0), report_files)
                    for s in p.studies
                ],
            }
            for p in run.patients
        ],
    }


def _study_entry(
    study: StudyPlan,
    report: PlannedReport | None,
    size: int,
    report_files: dict[tuple[str, int], str],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "studyInstanceUid": study.uid,
        "accessionNumber": study.accession,
        "accessionIssuer": study.institution.ris_issuer,
        "accessionSystem": f"urn:oid:{study.institution.accession_oid}",
        "started": study.started.isoformat(),
        "modalities": [study.modality.modality],
        "description": study.procedure.study_description,
        "procedure": {
            "system": LOINC,
            "code": study.procedure.code.value,
            "display": study.procedure.code.meaning,
        },
        "bodyPart": study.procedure.body_part,
        "institution": study.institution.name,
        "requestingService": {
            "system": SNOMED,
            "code": study.service.code.value,
            "display": study.service.code.meaning,
        },
        "series": [
            {
                "uid": s.uid,
                "number": s.number,
                "description": s.template.description,
                "instances": len(s.instance_uids),
            }
            for s in study.series
        ],
        "instances": study.instance_count,
        "bytes": size,
        "report": None,
    }
    if report is not None:
        latest = report.latest
        entry["report"] = {
            "identifier": {"system": latest.report_id.system, "value": latest.report_id.value},
            "status": latest.status,
            "versions": [
                {
                    "version": v.version,
                    "status": v.status,
                    "issued": v.issued.isoformat(),
                    "bundleIdentifier": document_identifier(v.report_id, v.version).value,
                    "file": report_files[(study.uid, v.version)],
                }
                for v in report.versions
            ],
        }
    return entry
