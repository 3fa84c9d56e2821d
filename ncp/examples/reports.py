"""Imaging reports for generated studies: which studies have one, its versions, its text.

About 85% of studies are reported. Of the reports, about 10% stay preliminary and about 15%
go through several versions (preliminary then final, sometimes amended later); the rest are
issued final at once. Texts are short English sentences chosen from templates that fit the
modality and the body part. A version that would be issued after the generator's reference
date is not issued at all, so the data never lies in the future.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from ncp.examples.catalogue import Person
from ncp.examples.plan import REFERENCE_DATE, UID_NAMESPACE, PatientPlan, StudyPlan
from ncp.fhir.identifiers import patient_system
from ncp.fhir.manifest import body_part_codings
from ncp.fhir.report import (
    LOINC,
    SNOMED,
    URI,
    Coding,
    HumanName,
    Identifier,
    ReportFinding,
    ReportOrder,
    ReportOrganization,
    ReportPatient,
    ReportStatus,
    ReportStudy,
    ReportText,
    ReportVersion,
    build_report_bundle,
    document_identifier,
)

REPORTED_SHARE = 0.85
PRELIMINARY_ONLY_SHARE = 0.10
MULTI_VERSION_SHARE = 0.15

Template = tuple[str, str, str | None]
"""(findings, impression, recommendation); findings may contain {size}."""

_GROUP = {"CR": "XR", "DX": "XR"}

_HISTORY: dict[str, tuple[str, ...]] = {
    "CHEST": (
        "Persistent cough for three weeks.",
        "Shortness of breath on exertion.",
        "Follow-up of a known pulmonary nodule.",
        "Fever and raised inflammatory markers.",
        "Staging of a newly diagnosed carcinoma.",
    ),
    "HEAD": (
        "Sudden severe headache.",
        "Fall with head trauma, on anticoagulation.",
        "Progressive memory complaints.",
        "Transient weakness of the right arm.",
    ),
    "ABDOMEN": (
        "Right upper quadrant pain.",
        "Abnormal liver function tests.",
        "Weight loss and anaemia.",
        "Follow-up of a renal cyst.",
    ),
    "LSPINE": (
        "Low back pain radiating to the left leg.",
        "Numbness of the right foot.",
        "Back pain for six months despite physiotherapy.",
    ),
    "KNEE": ("Twisting injury during sport, swelling.", "Chronic knee pain on weight bearing."),
    "HIP": ("Groin pain on walking.", "Fall, unable to bear weight."),
    "SHOULDER": ("Painful arc on abduction.", "Fall on the outstretched arm."),
    "PELVIS": ("Pelvic pain and irregular bleeding.", "Follow-up of an ovarian cyst."),
    "NECK": ("Palpable lump in the neck.", "Abnormal thyroid function tests."),
    "BREAST": (
        "Routine screening.",
        "Palpable lump in the breast.",
        "Family history of breast cancer.",
    ),
    "WHOLEBODY": (
        "Staging of a newly diagnosed carcinoma.",
        "Bone pain, known prostate cancer.",
        "Restaging after chemotherapy.",
    ),
}

_NORMAL: dict[str, Template] = {
    "CHEST": (
        "The lungs are clear. No pleural effusion or pneumothorax. The heart is not "
        "enlarged. The mediastinum is not widened.",
        "No acute cardiopulmonary abnormality.",
        None,
    ),
    "HEAD": (
        "No intracranial haemorrhage, mass effect or midline shift. Ventricles and sulci "
        "are normal for age.",
        "No acute intracranial abnormality.",
        None,
    ),
    "ABDOMEN": (
        "Liver, gallbladder, pancreas, spleen and kidneys are unremarkable. No free "
        "fluid. No lymphadenopathy.",
        "No abnormality of the abdominal organs.",
        None,
    ),
    "LSPINE": (
        "Normal alignment of the lumbar spine. Intervertebral discs are of normal height. "
        "No spinal canal or foraminal stenosis.",
        "Normal lumbar spine.",
        None,
    ),
    "KNEE": (
        "No fracture or dislocation. Joint space preserved. No effusion.",
        "No bony injury of the knee.",
        None,
    ),
    "HIP": (
        "No fracture. The hip joint space is preserved.",
        "No bony abnormality of the hip.",
        None,
    ),
    "SHOULDER": (
        "No fracture or dislocation. Normal acromiohumeral distance.",
        "No bony injury of the shoulder.",
        None,
    ),
    "PELVIS": (
        "Uterus and ovaries are of normal size and echotexture. No free fluid.",
        "Normal pelvic ultrasound.",
        None,
    ),
    "NECK": (
        "Both thyroid lobes are of normal size and echotexture. No enlarged lymph nodes.",
        "Normal ultrasound of the neck.",
        None,
    ),
    "BREAST": (
        "Scattered fibroglandular tissue. No mass, architectural distortion or "
        "suspicious calcification.",
        "No evidence of malignancy (BI-RADS 1).",
        "Routine screening in two years.",
    ),
    "WHOLEBODY": (
        "Physiological tracer distribution. No focal uptake suspicious for malignancy.",
        "No evidence of metabolically active disease.",
        None,
    ),
}

_ABNORMAL: dict[str, tuple[Template, ...]] = {
    "CHEST": (
        (
            "A {size} mm solid nodule in the right upper lobe. No mediastinal or hilar "
            "lymphadenopathy. No pleural effusion.",
            "Solitary pulmonary nodule in the right upper lobe.",
            "Follow-up CT of the chest in six months.",
        ),
        (
            "Consolidation in the left lower lobe with air bronchograms. Small left pleural "
            "effusion.",
            "Left lower lobe pneumonia with a small parapneumonic effusion.",
            "Follow-up after treatment to document resolution.",
        ),
        (
            "The heart is enlarged. Upper lobe venous diversion and bilateral small pleural "
            "effusions.",
            "Cardiomegaly with signs of pulmonary venous congestion.",
            None,
        ),
    ),
    "HEAD": (
        (
            "Scattered small lesions in the periventricular white matter, consistent with "
            "chronic small vessel disease. No acute infarct.",
            "Chronic small vessel disease; no acute abnormality.",
            None,
        ),
        (
            "A {size} mm extra-axial lesion along the left frontal convexity with a dural tail. "
            "No oedema.",
            "Findings most consistent with a left frontal meningioma.",
            "Neurosurgical consultation and follow-up imaging in twelve months.",
        ),
    ),
    "ABDOMEN": (
        (
            "Several gallstones, the largest {size} mm. No gallbladder wall thickening. "
            "Common bile duct not dilated.",
            "Cholecystolithiasis without signs of cholecystitis.",
            None,
        ),
        (
            "A {size} mm simple cyst in the lower pole of the right kidney. Otherwise "
            "unremarkable.",
            "Simple renal cyst (Bosniak I), no follow-up required.",
            None,
        ),
        (
            "Diffusely increased liver echogenicity/attenuation consistent with steatosis. "
            "No focal lesion.",
            "Hepatic steatosis.",
            None,
        ),
    ),
    "LSPINE": (
        (
            "Disc degeneration at L4/L5 with a left paracentral disc protrusion contacting the "
            "traversing left L5 nerve root.",
            "L4/L5 disc protrusion with left L5 root contact.",
            "Clinical correlation; consider a spinal surgery referral if symptoms persist.",
        ),
    ),
    "KNEE": (
        (
            "Undisplaced fracture of the lateral tibial plateau. Moderate joint effusion.",
            "Undisplaced lateral tibial plateau fracture.",
            "Orthopaedic referral.",
        ),
        (
            "Narrowing of the medial joint space with marginal osteophytes.",
            "Medial compartment osteoarthritis.",
            None,
        ),
    ),
    "HIP": (
        (
            "Subcapital fracture of the femoral neck with mild displacement.",
            "Displaced femoral neck fracture.",
            "Urgent orthopaedic referral.",
        ),
        (
            "Joint space narrowing with subchondral sclerosis and osteophytes.",
            "Moderate osteoarthritis of the hip.",
            None,
        ),
    ),
    "SHOULDER": (
        (
            "Calcific deposit of {size} mm projecting over the supraspinatus tendon insertion.",
            "Calcific tendinopathy of the supraspinatus.",
            None,
        ),
    ),
    "PELVIS": (
        (
            "A {size} mm thin-walled anechoic cyst in the right ovary.",
            "Simple right ovarian cyst, most likely functional.",
            "Follow-up ultrasound after the next menstrual cycle.",
        ),
    ),
    "NECK": (
        (
            "A {size} mm solid hypoechoic nodule in the left thyroid lobe with regular margins.",
            "Left thyroid nodule (TI-RADS 3).",
            "Follow-up ultrasound in one year.",
        ),
    ),
    "BREAST": (
        (
            "A {size} mm oval circumscribed mass in the upper outer quadrant of the left breast.",
            "Probably benign mass in the left breast (BI-RADS 3).",
            "Short-interval follow-up in six months.",
        ),
        (
            "A {size} mm irregular spiculated mass in the right breast at 10 o'clock.",
            "Suspicious mass in the right breast (BI-RADS 4).",
            "Ultrasound-guided biopsy.",
        ),
    ),
    "WHOLEBODY": (
        (
            "Multiple foci of increased uptake in the thoracic spine and pelvis.",
            "Findings consistent with osseous metastases.",
            "Multidisciplinary tumour board.",
        ),
        (
            "A {size} mm lesion in the right upper lobe with intense uptake and an avid right "
            "hilar lymph node.",
            "Metabolically active lung lesion with hilar nodal involvement.",
            "Tissue diagnosis.",
        ),
    ),
}

# Impressions whose finding the source states in coded form as well (SNOMED CT clinical findings):
# their reports carry the finding as an Observation entry. The other templates stay narrative
# only, as many reports are; codes not confirmed were left out rather than guessed.
_CODED_FINDINGS: dict[str, tuple[str, str]] = {
    "Left lower lobe pneumonia with a small parapneumonic effusion.": ("233604007", "Pneumonia"),
    "Cardiomegaly with signs of pulmonary venous congestion.": ("8186001", "Cardiomegaly"),
    "Cholecystolithiasis without signs of cholecystitis.": ("235919008", "Calculus of gallbladder"),
    "Hepatic steatosis.": ("197321007", "Steatosis of liver"),
    "Medial compartment osteoarthritis.": ("239873007", "Osteoarthritis of knee"),
    "Displaced femoral neck fracture.": ("5913000", "Fracture of neck of femur"),
    "Moderate osteoarthritis of the hip.": ("239872002", "Osteoarthritis of hip"),
    "Simple right ovarian cyst, most likely functional.": ("79883001", "Cyst of ovary"),
    "Left thyroid nodule (TI-RADS 3).": ("237495005", "Thyroid nodule"),
    "Findings consistent with osseous metastases.": (
        "94222008",
        "Secondary malignant neoplasm of bone",
    ),
}

_AMENDMENTS = (
    "Amended after review with the referring physician: measurements re-checked and confirmed.",
    "Amended: comparison with the prior examination from an outside institution shows the "
    "findings to be stable.",
    "Amended: the side was stated incorrectly in the previous version and has been corrected.",
)


@dataclass(frozen=True, slots=True)
class PlannedReport:
    """One study's report: every version, oldest first."""

    versions: tuple[ReportVersion, ...]

    @property
    def latest(self) -> ReportVersion:
        return self.versions[-1]


patient_identifier_system = patient_system
"""Kept for the generator's callers; :mod:`ncp.fhir.identifiers` owns the rule."""


def _statuses(rng: random.Random) -> list[ReportStatus]:
    draw = rng.random()
    if draw < PRELIMINARY_ONLY_SHARE:
        return ["preliminary"]
    if draw < PRELIMINARY_ONLY_SHARE + MULTI_VERSION_SHARE:
        return rng.choice(
            [
                ["preliminary", "final"],
                ["preliminary", "final"],
                ["preliminary", "final", "amended"],
                ["final", "amended"],
            ]
        )
    return ["final"]


def _issue_times(
    rng: random.Random, study: StudyPlan, statuses: list[ReportStatus]
) -> list[datetime]:
    limit = datetime.combine(REFERENCE_DATE, time(23, 59, 59), tzinfo=study.started.tzinfo)
    moment = study.started + timedelta(minutes=rng.randint(20, 240))
    times: list[datetime] = []
    for status in statuses:
        if status == "final" and times:
            moment += timedelta(hours=rng.randint(4, 72))
        elif status == "amended":
            moment += timedelta(days=rng.randint(1, 40))
        # Later versions are signed during the working day, never before the earlier ones.
        if times and moment.hour >= 19:
            moment = (moment + timedelta(days=1)).replace(hour=rng.randint(8, 17))
        elif times and moment.hour < 7:
            moment = moment.replace(hour=rng.randint(8, 17))
        if moment > limit:
            break
        times.append(moment)
    return times


def _name(person: Person) -> HumanName:
    return HumanName(person.family, (person.given,), (person.prefix,) if person.prefix else ())


def _technique(study: StudyPlan) -> str:
    modality = study.modality.modality
    series = ", ".join(s.template.description for s in study.series)
    count = study.instance_count
    text = {
        "CT": f"Helical CT acquisition; reconstructed series: {series} ({count} images).",
        "MR": f"Multiplanar multisequence MR imaging: {series}.",
        "CR": f"Radiographs: {series}.",
        "DX": f"Digital radiographs: {series}.",
        "US": "Real-time B-mode ultrasound with colour Doppler where indicated.",
        "MG": "Bilateral digital mammography in cranio-caudal and medio-lateral oblique views.",
        "NM": "Planar gamma camera imaging after intravenous injection of the radiopharmaceutical.",
        "PT": f"FDG PET after intravenous injection of 250 MBq; series: {series}.",
    }[modality]
    return text


def _texts(rng: random.Random, study: StudyPlan) -> tuple[str, Template, tuple[ReportFinding, ...]]:
    part = study.procedure.body_part
    history = rng.choice(_HISTORY.get(part, _HISTORY["ABDOMEN"]))
    if rng.random() < 0.55:
        template = _NORMAL.get(part, _NORMAL["ABDOMEN"])
    else:
        template = rng.choice(_ABNORMAL.get(part, _ABNORMAL["ABDOMEN"]))
    size = rng.randint(4, 24)
    findings, impression, recommendation = template
    coded = _CODED_FINDINGS.get(impression)
    structured: tuple[ReportFinding, ...] = ()
    if coded is not None:
        sites = [c for c in body_part_codings(part) if c["system"] == SNOMED]
        site = Coding(SNOMED, sites[0]["code"], sites[0]["display"]) if sites else None
        measured = size if "{size}" in findings else None
        structured = (ReportFinding(Coding(SNOMED, *coded), site, measured),)
    return history, (findings.format(size=size), impression, recommendation), structured


def plan_report(
    patient: PatientPlan, study: StudyPlan, *, seed: int, patient_id_system: str, language: str
) -> PlannedReport | None:
    """The versions of a study's report, or None when the study is not reported."""
    rng = random.Random(f"{UID_NAMESPACE}:{seed}:report:{study.uid}")
    if rng.random() >= REPORTED_SHARE:
        return None
    statuses = _statuses(rng)
    times = _issue_times(rng, study, statuses)
    if not times:
        return None
    history, (findings, impression, recommendation), coded = _texts(rng, study)
    amendment = rng.choice(_AMENDMENTS)
    report_id = Identifier(f"urn:oid:{study.institution.report_oid}", f"RPT-{study.accession}")
    common: dict[str, Any] = {
        "report_id": report_id,
        "title": f"Imaging report: {study.procedure.study_description}",
        "language": language,
        "patient": ReportPatient(
            identifier=Identifier(patient_id_system, patient.patient_id),
            name=HumanName(patient.family, (patient.given,)),
            birth_date=patient.birth_date,
            gender="female" if patient.sex == "F" else "male",
        ),
        "study": ReportStudy(
            study_instance_uid=study.uid,
            accession=Identifier(f"urn:oid:{study.institution.accession_oid}", study.accession),
            started=study.started,
            modalities=(study.modality.modality,),
            description=study.procedure.study_description,
            procedure=Coding(LOINC, study.procedure.code.value, study.procedure.code.meaning),
            number_of_series=len(study.series),
            number_of_instances=study.instance_count,
        ),
        "order": ReportOrder(
            requester=_name(study.referring),
            requesting_service=Coding(SNOMED, study.service.code.value, study.service.code.meaning),
            reason=history,
        ),
        "organization": ReportOrganization(
            identifier=Identifier(URI, f"urn:oid:{study.institution.oid}"),
            name=study.institution.name,
            city=study.institution.city,
        ),
        "radiologist": _name(study.radiologist),
    }
    versions: list[ReportVersion] = []
    for number, (status, issued) in enumerate(zip(statuses, times, strict=False), start=1):
        if status == "preliminary":
            # A preliminary reading: findings first, the impression only sometimes.
            text = ReportText(
                history=history,
                procedure=_technique(study),
                findings=findings,
                impression=f"Preliminary: {impression}" if rng.random() < 0.5 else None,
                coded_findings=coded,
            )
        else:
            text = ReportText(
                history=history,
                procedure=_technique(study),
                findings=f"{findings} {amendment}" if status == "amended" else findings,
                impression=impression,
                recommendation=recommendation,
                coded_findings=coded,
            )
        versions.append(
            ReportVersion(
                version=number,
                status=status,
                issued=issued,
                replaces=document_identifier(report_id, number - 1) if number > 1 else None,
                text=text,
                **common,
            )
        )
    return PlannedReport(tuple(versions))


def report_bundles(report: PlannedReport) -> list[dict[str, Any]]:
    """One document Bundle per version, oldest first."""
    return [build_report_bundle(version) for version in report.versions]
