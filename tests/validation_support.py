"""Shared by the validation tests and the benchmark: report bundles as the generator makes them
(planned in memory, without writing DICOM files) and small edits of bundles."""

from __future__ import annotations

import copy
import functools
from typing import Any

from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER
from ncp.examples.plan import plan_run
from ncp.examples.reports import patient_identifier_system, plan_report, report_bundles


def generated_bundles(
    patients: int = 2, seed: int = 1, big_patient_studies: int = 5
) -> list[dict[str, Any]]:
    """The report bundles ``ncp examples generate`` writes for these arguments (a copy)."""
    return copy.deepcopy(list(_generated(patients, seed, big_patient_studies)))


@functools.cache
def _generated(patients: int, seed: int, big_patient_studies: int) -> tuple[dict[str, Any], ...]:
    run = plan_run(
        patients=patients,
        seed=seed,
        big_patient_studies=big_patient_studies,
        country="AT",
        issuer=DEFAULT_PATIENT_ID_ISSUER,
    )
    system = patient_identifier_system(DEFAULT_PATIENT_ID_ISSUER)
    out: list[dict[str, Any]] = []
    for patient in run.patients:
        for study in patient.studies:
            report = plan_report(patient, study, seed=seed, patient_id_system=system, language="en")
            if report is not None:
                out.extend(report_bundles(report))
    return tuple(out)


def entry_of(bundle: dict[str, Any], resource_type: str) -> tuple[int, dict[str, Any]]:
    """(index, resource) of the first entry of a type."""
    for i, entry in enumerate(bundle["entry"]):
        if entry["resource"]["resourceType"] == resource_type:
            return i, entry["resource"]
    raise KeyError(resource_type)


def location(bundle: dict[str, Any], resource_type: str) -> str:
    index, _ = entry_of(bundle, resource_type)
    return f"Bundle.entry[{index}].resource.ofType({resource_type})"
