"""The example generator: deterministic, standard DICOM, a readable DICOMDIR, valid reports."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

from ncp.examples.catalogue import MODALITIES
from ncp.examples.dicom_writer import IMPLEMENTATION_CLASS_UID
from ncp.examples.generate import (
    DEFAULT_PATIENT_ID_ISSUER,
    GenerationError,
    GenerationSummary,
    generate_examples,
)
from ncp.examples.plan import REFERENCE_DATE, austrian_svnr, plan_run
from ncp.examples.reports import patient_identifier_system, plan_report

PATIENTS, SEED, BIG = 4, 7, 14
SECTION_CODES = {"18726-0", "55115-0", "11329-0", "55111-9", "59776-5", "19005-8", "18783-1"}
REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyID",
    "ProcedureCodeSequence",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReferringPhysicianName",
    "InstitutionName",
    "Manufacturer",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "AcquisitionNumber",
    "InstanceNumber",
    "ImageType",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PhotometricInterpretation",
    "PixelData",
)

Generated = tuple[Path, GenerationSummary]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    out = tmp_path_factory.mktemp("tree") / "out"
    return out, generate_examples(out, patients=PATIENTS, seed=SEED, big_patient_studies=BIG)


@pytest.fixture(scope="module")
def headers(tree: Generated) -> dict[Path, Dataset]:
    return {f: dcmread(f) for f in sorted((tree[0] / "dicom").rglob("*.dcm"))}


@pytest.fixture(scope="module")
def manifest(tree: Generated) -> dict[str, Any]:
    return json.loads((tree[0] / "manifest.json").read_text(encoding="utf-8"))


def digest(root: Path) -> dict[str, str]:
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def test_same_seed_gives_byte_identical_trees_and_another_seed_does_not(
    tree: Generated, tmp_path: Path
) -> None:
    # Worker processes share out the studies; the bytes must not depend on them.
    again = generate_examples(
        tmp_path / "again", patients=PATIENTS, seed=SEED, big_patient_studies=BIG, workers=2
    )
    assert again == tree[1]
    assert digest(tmp_path / "again") == digest(tree[0])
    generate_examples(tmp_path / "other", patients=PATIENTS, seed=SEED + 1, big_patient_studies=BIG)
    other = digest(tmp_path / "other")
    assert set(other.values()).isdisjoint(
        v for k, v in digest(tree[0]).items() if k.startswith("dicom/")
    )


def test_summary_counts_what_was_written(tree: Generated, headers: dict[Path, Dataset]) -> None:
    out, summary = tree
    assert summary.patients == PATIENTS
    assert summary.instances == len(headers)
    assert summary.series == len({ds.SeriesInstanceUID for ds in headers.values()})
    assert summary.studies == len({ds.StudyInstanceUID for ds in headers.values()})
    assert summary.report_versions == len(list((out / "reports").rglob("*.json")))
    assert summary.bytes == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    totals = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["totals"]
    assert (totals["instances"], totals["reportVersions"]) == (
        summary.instances,
        summary.report_versions,
    )
    assert totals["dicomBytes"] == sum(f.stat().st_size for f in headers)


def test_every_file_is_standard_part10_with_the_expected_attributes(
    tree: Generated, headers: dict[Path, Dataset], manifest: dict[str, Any]
) -> None:
    out = tree[0] / "dicom"
    names = {p["id"]: p["dicomName"] for p in manifest["patients"]}
    oldest = date(REFERENCE_DATE.year - 15, REFERENCE_DATE.month, REFERENCE_DATE.day)
    for path, ds in headers.items():
        patient_id, study_uid, series_uid, file_name = path.relative_to(out).parts
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        missing = [k for k in REQUIRED if k not in ds]
        assert not missing, (path, missing)
        assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
            patient_id,
            study_uid,
            series_uid,
        )
        assert file_name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.IssuerOfPatientID == DEFAULT_PATIENT_ID_ISSUER
        assert str(ds.PatientName) == names[patient_id]  # round-trips, non-ASCII included
        if not str(ds.PatientName).isascii():
            assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert len(ds.AccessionNumber) <= 16
        assert ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID.endswith("-RIS")
        assert ds.ProcedureCodeSequence[0].CodingSchemeDesignator == "LN"
        assert ds.RequestingServiceCodeSequence[0].CodingSchemeDesignator == "SCT"
        day = str(ds.StudyDate)
        assert oldest <= date(int(day[:4]), int(day[4:6]), int(day[6:])) <= REFERENCE_DATE


def test_patient_ids_are_austrian_social_insurance_numbers(manifest: dict[str, Any]) -> None:
    for patient in manifest["patients"]:
        pid, birth = patient["id"], date.fromisoformat(patient["birthDate"])
        assert len(pid) == 10 and pid.isdigit()
        assert austrian_svnr(int(pid[:3]), birth) == pid


def test_pixels_decode_per_modality(headers: dict[Path, Dataset]) -> None:
    seen: dict[str, Dataset] = {}
    for ds in headers.values():
        seen.setdefault(ds.Modality, ds)
    for modality, ds in seen.items():
        pixels = ds.pixel_array
        assert pixels.std() > 0, modality
        if modality == "US":
            assert ds.PhotometricInterpretation == "RGB" and pixels.shape[-1] == 3
        else:
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
        if modality == "NM":
            assert ds.NumberOfFrames > 1 and pixels.shape[0] == ds.NumberOfFrames
        if modality == "CT":
            assert "RescaleSlope" in ds and "RescaleIntercept" in ds and "KVP" in ds
        if modality == "MG":
            assert ds.ImageLaterality in ("L", "R")


def test_slices_of_a_series_are_stacked_in_space(headers: dict[Path, Dataset]) -> None:
    positions: dict[str, set[tuple[float, ...]]] = {}
    counts: Counter[str] = Counter()
    for ds in headers.values():
        if ds.Modality in ("CT", "MR", "PT"):
            positions.setdefault(ds.SeriesInstanceUID, set()).add(
                tuple(float(v) for v in ds.ImagePositionPatient)
            )
            counts[ds.SeriesInstanceUID] += 1
            assert len(ds.ImageOrientationPatient) == 6
    assert positions
    assert all(len(positions[s]) == counts[s] for s in counts)


def test_studies_cover_every_modality_and_have_several_series(
    tree: Generated, headers: dict[Path, Dataset], manifest: dict[str, Any]
) -> None:
    assert {ds.Modality for ds in headers.values()} == {m.modality for m in MODALITIES}
    series_per_study = Counter(
        (ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in headers.values()
    )
    studies = Counter(study for study, _ in series_per_study)
    assert max(studies.values()) >= 3
    big = manifest["patients"][0]
    assert len(big["studies"]) == BIG
    assert len(list((tree[0] / "dicom" / big["id"]).iterdir())) == BIG
    assert any(not p["dicomName"].isascii() for p in manifest["patients"])


def test_encoded_bytes_are_what_pydicom_writes(headers: dict[Path, Dataset]) -> None:
    seen: set[str] = set()
    for path, ds in headers.items():
        if ds.Modality in seen:
            continue
        seen.add(ds.Modality)
        buffer = io.BytesIO()
        dcmwrite(buffer, dcmread(path), enforce_file_format=True)
        assert buffer.getvalue() == path.read_bytes(), ds.Modality


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_one_file_per_modality_passes_dciodvfy(headers: dict[Path, Dataset]) -> None:
    chosen: dict[str, Path] = {}
    for path, ds in headers.items():
        chosen.setdefault(ds.Modality, path)
    for modality, path in sorted(chosen.items()):
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        errors = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert not errors, (modality, errors)


def test_media_layout_has_a_dicomdir_that_references_every_instance(tmp_path: Path) -> None:
    out = tmp_path / "media"
    summary = generate_examples(
        out, patients=2, seed=3, big_patient_studies=len(MODALITIES), layout="media"
    )
    fs = FileSet(out / "dicom" / "DICOMDIR")
    files = [f for f in (out / "dicom").rglob("*") if f.is_file() and f.name != "DICOMDIR"]
    assert len(fs) == len(files) == summary.instances
    written = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {str(instance.SOPInstanceUID) for instance in fs} == written
    for instance in fs:
        assert Path(instance.path).is_file()
    assert len({str(instance.PatientID) for instance in fs}) == 2
    # The file-set (DICOMDIR included) is as deterministic as the tree.
    generate_examples(
        tmp_path / "again", patients=2, seed=3, big_patient_studies=len(MODALITIES), layout="media"
    )
    assert digest(tmp_path / "again") == digest(out)
    if shutil.which("dciodvfy") is not None:
        result = subprocess.run(
            ["dciodvfy", str(out / "dicom" / "DICOMDIR")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = result.stdout + result.stderr
        assert not [line for line in output.splitlines() if line.startswith("Error")]


def all_strings(node: Any, key: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [pair for k, v in node.items() for pair in all_strings(v, k)]
    if isinstance(node, list):
        return [pair for v in node for pair in all_strings(v, key)]
    return [(key, node)] if isinstance(node, str) else []


def test_report_bundles_are_valid_versioned_documents(
    tree: Generated, manifest: dict[str, Any]
) -> None:
    out = tree[0]
    reported = [s for p in manifest["patients"] for s in p["studies"] if s["report"]]
    assert reported
    for study in reported:
        bundles = [
            json.loads((out / v["file"]).read_text(encoding="utf-8"))
            for v in study["report"]["versions"]
        ]
        compositions = []
        for bundle, version in zip(bundles, study["report"]["versions"], strict=True):
            Bundle.model_validate(bundle)
            first = bundle["entry"][0]["resource"]
            assert first["resourceType"] == "Composition"
            report = next(
                e["resource"]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "DiagnosticReport"
            )
            assert first["status"] == report["status"] == version["status"]
            assert report["identifier"] == [first["identifier"]]
            codes = {s["code"]["coding"][0]["code"] for s in first["section"]}
            assert SECTION_CODES - {"18783-1"} <= codes <= SECTION_CODES
            assert bundle["identifier"]["value"] == version["bundleIdentifier"]
            for key, value in all_strings(bundle):
                if key == "div":
                    value = value.replace('xmlns="http://www.w3.org/1999/xhtml"', "")
                assert key in ("system", "url", "profile") or "http" not in value, (key, value)
            compositions.append(first)
        assert len({json.dumps(c["identifier"]) for c in compositions}) == 1
        assert len({b["identifier"]["value"] for b in bundles}) == len(bundles)
        for previous, later in zip(bundles, compositions[1:], strict=False):
            assert later["relatesTo"][0]["targetIdentifier"] == previous["identifier"]


def test_report_mix_follows_the_intended_shares() -> None:
    run = plan_run(
        patients=40,
        seed=11,
        big_patient_studies=300,
        country="AT",
        issuer=DEFAULT_PATIENT_ID_ISSUER,
    )
    system = patient_identifier_system(DEFAULT_PATIENT_ID_ISSUER)
    studies = [(p, s) for p in run.patients for s in p.studies]
    reports = [
        plan_report(p, s, seed=11, patient_id_system=system, language="en") for p, s in studies
    ]
    done = [r for r in reports if r is not None]
    statuses = [[v.status for v in r.versions] for r in done]
    assert 0.80 < len(done) / len(studies) < 0.90
    assert 0.06 < sum(s == ["preliminary"] for s in statuses) / len(done) < 0.14
    assert 0.10 < sum(len(s) > 1 for s in statuses) / len(done) < 0.20
    assert any(s[-1] == "amended" for s in statuses)
    for report in done:
        assert [v.version for v in report.versions] == list(range(1, len(report.versions) + 1))
        assert all(
            a.issued < b.issued for a, b in zip(report.versions, report.versions[1:], strict=False)
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"language": "fr"}, "language"),
        ({"patient_id_issuer": "AT-SVNR"}, "OID nor an absolute URI"),
        ({"patients": 0}, "patients"),
        ({"country": "Austria"}, "country"),
    ],
)
def test_unusable_arguments_are_refused(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"patients": 1, "seed": 1, "big_patient_studies": 1} | changes
    with pytest.raises(GenerationError, match=message):
        generate_examples(tmp_path / "x", **arguments)


def test_a_used_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    with pytest.raises(GenerationError, match="empty or new"):
        generate_examples(tmp_path, patients=1, seed=1, big_patient_studies=1)
