"""The clinical vocabulary the example generator draws from.

Everything here is plain, frozen data. Codes are real: LOINC radiology procedure codes (DICOM
Coding Scheme Designator ``LN``), SNOMED CT specialty codes (``SCT``) and the DICOM storage SOP
classes. Only codes whose meaning was checked against a published code list are used; a
procedure the catalogue cannot code honestly is left out rather than coded approximately.
Institutions, people and identifiers are fictional.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from ncp.fhir import canonical

Sex = Literal["M", "F"]


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept in DICOM terms (Code Value, Coding Scheme Designator, Code Meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class SeriesTemplate:
    """One series of an acquisition protocol."""

    description: str
    instances: tuple[int, int]
    """Inclusive range of the number of instances (slices, views or frames' files)."""
    kind: str = "AXIAL"
    """What the pixels show and how slices are laid out: AXIAL, SAGITTAL, CORONAL, LOCALIZER,
    PROJECTION (radiograph), VIEW (mammography), US, NM, or an MR weighting (T1, T2, FLAIR, DWI,
    STIR)."""
    view: str = ""
    """View Position for projection radiography and mammography (PA, LL, AP, CC, MLO)."""
    laterality: str = ""
    """Image laterality of a mammography view (L or R); empty when the series is unpaired."""


@dataclass(frozen=True, slots=True)
class Procedure:
    """A coded imaging procedure and the protocol that acquires it."""

    code: Code
    body_part: str
    """DICOM Body Part Examined (PS3.16 Annex L defined terms)."""
    study_description: str
    series: tuple[SeriesTemplate, ...]
    """Protocol order; a study takes the first N of these."""
    series_count: tuple[int, int]
    services: tuple[str, ...]
    """SNOMED CT codes of the requesting services that typically order it."""
    paired: bool = False
    """Body part is paired (knee, hip, shoulder): the series carries a Laterality."""
    sex: Sex | None = None
    """Restricts the procedure to patients of one sex (mammography, pelvic ultrasound)."""


@dataclass(frozen=True, slots=True)
class ModalitySpec:
    """One acquisition modality: how it is stored and what it is used for."""

    modality: str
    name: str
    sop_class_uid: str
    weight: int
    """Relative frequency among generated studies."""
    procedures: tuple[Procedure, ...]
    equipment: tuple[tuple[str, str], ...]
    """(Manufacturer, Manufacturer's Model Name) pairs."""
    kvp: tuple[int, int] | None = None
    """Peak kilovoltage range for X-ray modalities."""


@dataclass(frozen=True, slots=True)
class RequestingService:
    """A clinical service that orders imaging, coded as a SNOMED CT specialty."""

    name: str
    code: Code


@dataclass(frozen=True, slots=True)
class Person:
    """A health professional, with the name parts DICOM PN and FHIR HumanName both need."""

    family: str
    given: str
    prefix: str = "Dr."

    @property
    def dicom_name(self) -> str:
        """Family^Given^Middle^Prefix, as PS3.5 6.2.1 orders the components."""
        return f"{self.family}^{self.given}^^{self.prefix}"


@dataclass(frozen=True, slots=True)
class Institution:
    """A fictional hospital with its RIS and its own identifier namespaces."""

    code: str
    """Short code; prefixes the accession numbers it issues."""
    name: str
    city: str
    department: str
    ris_issuer: str
    """Local Namespace Entity ID of the RIS that issues accession numbers."""
    oid: str
    """Root of the hospital's identifier namespaces (organisation, accessions, reports)."""
    radiologists: tuple[Person, ...]

    @property
    def accession_oid(self) -> str:
        return f"{self.oid}.1"

    @property
    def report_oid(self) -> str:
        return f"{self.oid}.2"


def _oid(name: str) -> str:
    """A stable OID under the UUID arc 2.25 (ISO/IEC 9834-8), so no OID root must be owned."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'{canonical.BASE}/oid/{name}').int}"


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _lnc(value: str, meaning: str) -> Code:
    return Code(value, "LN", meaning)


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


# --- requesting services (SNOMED CT "specialty" qualifier values) ---------------------------

CARDIOLOGY = "394579002"
GENERAL_MEDICINE = "394802001"
PAEDIATRICS = "394537008"
OBSTETRICS_GYNAECOLOGY = "394585009"
NEPHROLOGY = "394589003"
NEUROLOGY = "394591006"
CLINICAL_ONCOLOGY = "394592004"
INTERVENTIONAL_RADIOLOGY = "408455009"
TRAUMA_ORTHOPAEDICS = "394801008"
GENERAL_SURGERY = "394609007"
GASTROENTEROLOGY = "394584008"
PULMONARY_MEDICINE = "418112009"
GENERAL_PRACTICE = "394814009"

REQUESTING_SERVICES: dict[str, RequestingService] = {
    s.code.value: s
    for s in (
        RequestingService("Cardiology", _sct(CARDIOLOGY, "Cardiology")),
        RequestingService("General medicine", _sct(GENERAL_MEDICINE, "General medicine")),
        RequestingService("Paediatrics", _sct(PAEDIATRICS, "Paediatric specialty")),
        RequestingService(
            "Obstetrics and gynaecology",
            _sct(OBSTETRICS_GYNAECOLOGY, "Obstetrics and gynaecology"),
        ),
        RequestingService("Nephrology", _sct(NEPHROLOGY, "Nephrology")),
        RequestingService("Neurology", _sct(NEUROLOGY, "Neurology")),
        RequestingService("Clinical oncology", _sct(CLINICAL_ONCOLOGY, "Clinical oncology")),
        RequestingService(
            "Interventional radiology",
            _sct(INTERVENTIONAL_RADIOLOGY, "Interventional radiology"),
        ),
        RequestingService(
            "Trauma and orthopaedics", _sct(TRAUMA_ORTHOPAEDICS, "Trauma and orthopaedics")
        ),
        RequestingService("General surgery", _sct(GENERAL_SURGERY, "General surgery")),
        RequestingService("Gastroenterology", _sct(GASTROENTEROLOGY, "Gastroenterology")),
        RequestingService("Pulmonary medicine", _sct(PULMONARY_MEDICINE, "Pulmonary medicine")),
        RequestingService("General practice", _sct(GENERAL_PRACTICE, "General practice")),
    )
}

# --- modalities and their procedures ---------------------------------------------------------

_CT_LOCALIZER = SeriesTemplate("Topogram 0.6 T20f", (1, 1), kind="LOCALIZER")

CT = ModalitySpec(
    modality="CT",
    name="Computed tomography",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    weight=20,
    kvp=(100, 140),
    equipment=(
        ("SIEMENS", "SOMATOM Definition AS"),
        ("GE MEDICAL SYSTEMS", "Revolution CT"),
        ("Philips", "Ingenuity CT"),
        ("Canon Medical Systems", "Aquilion ONE"),
    ),
    procedures=(
        Procedure(
            code=_lnc("24627-2", "CT Chest"),
            body_part="CHEST",
            study_description="CT Chest",
            series=(
                _CT_LOCALIZER,
                SeriesTemplate("Thorax 5.0 Br40 mediastinum", (20, 40)),
                SeriesTemplate("Thorax 1.5 Bl57 lung", (20, 40)),
            ),
            series_count=(2, 3),
            services=(CLINICAL_ONCOLOGY, PULMONARY_MEDICINE, GENERAL_MEDICINE, CARDIOLOGY),
        ),
        Procedure(
            code=_lnc("24725-4", "CT Head"),
            body_part="HEAD",
            study_description="CT Head without contrast",
            series=(
                _CT_LOCALIZER,
                SeriesTemplate("Head 5.0 H31s", (16, 30)),
                SeriesTemplate("Head bone 2.0 H70h", (20, 40)),
            ),
            series_count=(2, 3),
            services=(NEUROLOGY, GENERAL_MEDICINE, TRAUMA_ORTHOPAEDICS, PAEDIATRICS),
        ),
        Procedure(
            code=_lnc("41806-1", "CT Abdomen"),
            body_part="ABDOMEN",
            study_description="CT Abdomen with contrast",
            series=(
                _CT_LOCALIZER,
                SeriesTemplate("Abdomen venous 5.0 Br40", (24, 40)),
                SeriesTemplate("Abdomen venous cor 3.0", (20, 32), kind="CORONAL"),
            ),
            series_count=(2, 3),
            services=(GASTROENTEROLOGY, CLINICAL_ONCOLOGY, GENERAL_SURGERY, NEPHROLOGY),
        ),
    ),
)

MR = ModalitySpec(
    modality="MR",
    name="Magnetic resonance",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
    weight=15,
    equipment=(
        ("SIEMENS", "MAGNETOM Vida"),
        ("Philips", "Ingenia"),
        ("GE MEDICAL SYSTEMS", "SIGNA Premier"),
    ),
    procedures=(
        Procedure(
            code=_lnc("24590-2", "MR Brain"),
            body_part="HEAD",
            study_description="MR Brain",
            series=(
                SeriesTemplate("t1_mprage_sag", (16, 28), kind="T1"),
                SeriesTemplate("t2_tse_tra", (16, 24), kind="T2"),
                SeriesTemplate("t2_flair_tra", (16, 24), kind="FLAIR"),
                SeriesTemplate("ep2d_diff_tra", (16, 24), kind="DWI"),
                SeriesTemplate("t1_se_tra_post_contrast", (16, 24), kind="T1"),
            ),
            series_count=(3, 5),
            services=(NEUROLOGY, CLINICAL_ONCOLOGY, PAEDIATRICS, GENERAL_MEDICINE),
        ),
        Procedure(
            code=_lnc("24968-0", "MR Lumbar spine"),
            body_part="LSPINE",
            study_description="MR Lumbar spine",
            series=(
                SeriesTemplate("t2_tse_sag", (11, 15), kind="T2"),
                SeriesTemplate("t1_tse_sag", (11, 15), kind="T1"),
                SeriesTemplate("t2_tse_tra", (12, 24), kind="T2"),
                SeriesTemplate("stir_sag", (11, 15), kind="STIR"),
            ),
            series_count=(3, 4),
            services=(TRAUMA_ORTHOPAEDICS, NEUROLOGY, GENERAL_PRACTICE),
        ),
        Procedure(
            code=_lnc("24556-3", "MR Abdomen"),
            body_part="ABDOMEN",
            study_description="MR Abdomen",
            series=(
                SeriesTemplate("t2_haste_cor", (16, 24), kind="T2"),
                SeriesTemplate("t2_haste_tra", (20, 32), kind="T2"),
                SeriesTemplate("t1_vibe_dixon_tra", (20, 32), kind="T1"),
                SeriesTemplate("ep2d_diff_tra", (16, 24), kind="DWI"),
                SeriesTemplate("t1_vibe_tra_post_contrast", (20, 32), kind="T1"),
            ),
            series_count=(3, 5),
            services=(GASTROENTEROLOGY, CLINICAL_ONCOLOGY, NEPHROLOGY),
        ),
    ),
)

_CHEST_2_VIEWS = Procedure(
    code=_lnc("36643-5", "XR Chest 2 Views"),
    body_part="CHEST",
    study_description="XR Chest PA and lateral",
    series=(
        SeriesTemplate("Chest PA", (1, 1), kind="PROJECTION", view="PA"),
        SeriesTemplate("Chest lateral", (1, 1), kind="PROJECTION", view="LL"),
    ),
    series_count=(2, 2),
    services=(GENERAL_MEDICINE, PULMONARY_MEDICINE, CARDIOLOGY, GENERAL_PRACTICE, PAEDIATRICS),
)

_KNEE_VIEWS = Procedure(
    code=_lnc("28565-0", "XR Knee Views"),
    body_part="KNEE",
    study_description="XR Knee",
    series=(
        SeriesTemplate("Knee AP", (1, 1), kind="PROJECTION", view="AP"),
        SeriesTemplate("Knee lateral", (1, 1), kind="PROJECTION", view="LL"),
    ),
    series_count=(1, 2),
    services=(TRAUMA_ORTHOPAEDICS, GENERAL_PRACTICE),
    paired=True,
)

CR = ModalitySpec(
    modality="CR",
    name="Computed radiography",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
    weight=12,
    kvp=(60, 125),
    equipment=(("FUJIFILM Corporation", "FCR PROFECT CS"), ("Carestream Health", "DRX-Evolution")),
    procedures=(
        _CHEST_2_VIEWS,
        _KNEE_VIEWS,
        Procedure(
            code=_lnc("24762-7", "XR Hip Views"),
            body_part="HIP",
            study_description="XR Hip",
            series=(
                SeriesTemplate("Hip AP", (1, 1), kind="PROJECTION", view="AP"),
                SeriesTemplate("Hip axial", (1, 1), kind="PROJECTION", view="LL"),
            ),
            series_count=(1, 2),
            services=(TRAUMA_ORTHOPAEDICS, GENERAL_PRACTICE),
            paired=True,
        ),
    ),
)

DX = ModalitySpec(
    modality="DX",
    name="Digital radiography",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
    weight=15,
    kvp=(60, 125),
    equipment=(("SIEMENS", "Ysio Max"), ("Philips", "DigitalDiagnost C90")),
    procedures=(
        _CHEST_2_VIEWS,
        _KNEE_VIEWS,
        Procedure(
            code=_lnc("24909-4", "XR Shoulder Views"),
            body_part="SHOULDER",
            study_description="XR Shoulder",
            series=(
                SeriesTemplate("Shoulder AP", (1, 1), kind="PROJECTION", view="AP"),
                SeriesTemplate("Shoulder Y view", (1, 1), kind="PROJECTION", view="LL"),
            ),
            series_count=(1, 2),
            services=(TRAUMA_ORTHOPAEDICS, GENERAL_PRACTICE),
            paired=True,
        ),
    ),
)

US = ModalitySpec(
    modality="US",
    name="Ultrasound",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
    weight=15,
    equipment=(
        ("GE Healthcare", "LOGIQ E10"),
        ("Philips", "EPIQ 7"),
        ("SIEMENS", "ACUSON Sequoia"),
    ),
    procedures=(
        Procedure(
            code=_lnc("24558-9", "US Abdomen"),
            body_part="ABDOMEN",
            study_description="US Abdomen",
            series=(SeriesTemplate("Abdomen", (4, 12), kind="US"),),
            series_count=(1, 1),
            services=(GASTROENTEROLOGY, GENERAL_MEDICINE, NEPHROLOGY, PAEDIATRICS),
        ),
        Procedure(
            code=_lnc("24869-0", "US Pelvis"),
            body_part="PELVIS",
            study_description="US Pelvis",
            series=(SeriesTemplate("Pelvis", (3, 8), kind="US"),),
            series_count=(1, 1),
            services=(OBSTETRICS_GYNAECOLOGY, GENERAL_PRACTICE),
            sex="F",
        ),
        Procedure(
            code=_lnc("24842-7", "US Neck"),
            body_part="NECK",
            study_description="US Neck",
            series=(SeriesTemplate("Neck", (3, 8), kind="US"),),
            series_count=(1, 1),
            services=(GENERAL_MEDICINE, CLINICAL_ONCOLOGY, PAEDIATRICS),
        ),
        Procedure(
            code=_lnc("24601-7", "US Breast"),
            body_part="BREAST",
            study_description="US Breast",
            series=(SeriesTemplate("Breast", (3, 8), kind="US"),),
            series_count=(1, 1),
            services=(OBSTETRICS_GYNAECOLOGY, CLINICAL_ONCOLOGY, GENERAL_PRACTICE),
            paired=True,
            sex="F",
        ),
    ),
)

_MG_VIEWS = (
    SeriesTemplate("R CC", (1, 1), kind="VIEW", view="CC", laterality="R"),
    SeriesTemplate("L CC", (1, 1), kind="VIEW", view="CC", laterality="L"),
    SeriesTemplate("R MLO", (1, 1), kind="VIEW", view="MLO", laterality="R"),
    SeriesTemplate("L MLO", (1, 1), kind="VIEW", view="MLO", laterality="L"),
)

MG = ModalitySpec(
    modality="MG",
    name="Mammography",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
    weight=8,
    kvp=(25, 35),
    equipment=(("HOLOGIC, Inc.", "Selenia Dimensions"), ("SIEMENS", "MAMMOMAT Revelation")),
    procedures=(
        Procedure(
            code=_lnc("24606-6", "MG Breast Screening"),
            body_part="BREAST",
            study_description="MG Screening bilateral",
            series=_MG_VIEWS,
            series_count=(4, 4),
            services=(GENERAL_PRACTICE, OBSTETRICS_GYNAECOLOGY),
            sex="F",
        ),
        Procedure(
            code=_lnc("24605-8", "MG Breast Diagnostic"),
            body_part="BREAST",
            study_description="MG Diagnostic bilateral",
            series=_MG_VIEWS,
            series_count=(4, 4),
            services=(OBSTETRICS_GYNAECOLOGY, CLINICAL_ONCOLOGY),
            sex="F",
        ),
    ),
)

NM = ModalitySpec(
    modality="NM",
    name="Nuclear medicine",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
    weight=4,
    equipment=(("SIEMENS", "Symbia Intevo"), ("GE MEDICAL SYSTEMS", "Discovery NM/CT 670")),
    procedures=(
        Procedure(
            # Code meaning as DICOM CID 100 gives it.
            code=_lnc("49118-3", "NM unspecified body region"),
            body_part="WHOLEBODY",
            study_description="NM Bone scan whole body",
            series=(
                SeriesTemplate("WB anterior/posterior", (1, 1), kind="NM"),
                SeriesTemplate("Spot views", (1, 2), kind="NM"),
            ),
            series_count=(1, 2),
            services=(CLINICAL_ONCOLOGY, TRAUMA_ORTHOPAEDICS),
        ),
        Procedure(
            code=_lnc("39632-5", "SPECT brain"),
            body_part="HEAD",
            study_description="NM Brain perfusion",
            series=(SeriesTemplate("Brain perfusion", (1, 1), kind="NM"),),
            series_count=(1, 1),
            services=(NEUROLOGY,),
        ),
    ),
)

PT = ModalitySpec(
    modality="PT",
    name="Positron emission tomography",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
    weight=3,
    equipment=(("SIEMENS", "Biograph Vision"), ("GE MEDICAL SYSTEMS", "Discovery MI")),
    procedures=(
        Procedure(
            code=_lnc("44139-4", "PET whole body"),
            body_part="WHOLEBODY",
            study_description="PET FDG whole body",
            series=(
                SeriesTemplate("PET AC", (24, 40)),
                SeriesTemplate("PET NAC", (24, 40)),
            ),
            series_count=(1, 2),
            services=(CLINICAL_ONCOLOGY,),
        ),
        Procedure(
            code=_lnc("44136-0", "PET unspecified body region"),
            body_part="CHEST",
            study_description="PET FDG thorax",
            series=(SeriesTemplate("PET AC thorax", (20, 32)),),
            series_count=(1, 1),
            services=(CLINICAL_ONCOLOGY, PULMONARY_MEDICINE),
        ),
    ),
)

MODALITIES: tuple[ModalitySpec, ...] = (CT, MR, CR, DX, US, MG, NM, PT)
MODALITY_BY_CODE: dict[str, ModalitySpec] = {m.modality: m for m in MODALITIES}

# --- institutions and people ------------------------------------------------------------------

INSTITUTIONS: tuple[Institution, ...] = (
    Institution(
        code="KDN",
        name="Klinikum Donauufer Nord",
        city="Wien",
        department="Institut für Radiologie",
        ris_issuer="KDN-RIS",
        oid=_oid("institution/KDN"),
        radiologists=(Person("Hofbauer", "Christina"), Person("Zöchling", "Markus")),
    ),
    Institution(
        code="LKA",
        name="Landesklinikum Alpenblick",
        city="Innsbruck",
        department="Radiologie",
        ris_issuer="LKA-RIS",
        oid=_oid("institution/LKA"),
        radiologists=(Person("Pfeifer", "Gerhard"), Person("Ranftl", "Verena")),
    ),
    Institution(
        code="SAS",
        name="Krankenhaus St. Anna am See",
        city="Klagenfurt",
        department="Abteilung für Radiologie",
        ris_issuer="SAS-RIS",
        oid=_oid("institution/SAS"),
        radiologists=(Person("Kogler", "Birgit"), Person("Jäger", "Thomas")),
    ),
    Institution(
        code="RZS",
        name="Radiologiezentrum Südbahnhof",
        city="Graz",
        department="Radiologie",
        ris_issuer="RZS-RIS",
        oid=_oid("institution/RZS"),
        radiologists=(Person("Strasser", "Ulrike"),),
    ),
)

REFERRING_PHYSICIANS: tuple[Person, ...] = (
    Person("Gruber", "Anna"),
    Person("Huber", "Stefan"),
    Person("Wagner", "Elisabeth"),
    Person("Pichler", "Georg"),
    Person("Steiner", "Martina"),
    Person("Moser", "Florian"),
    Person("Öztürk", "Selin"),
    Person("Nowak", "Paweł"),
    Person("Horváth", "Zsófia"),
    Person("Brandstätter", "Lukas"),
)

# --- patient names: a third of patients draw from the non-ASCII list ---------------------------

FAMILY_NAMES_ASCII: tuple[str, ...] = _words(
    """
    Gruber Huber Wagner Pichler Steiner Moser Mayer Hofer Leitner Berger Fuchs Eder Fischer
    Schmid Winkler Weber Schwarz Maier Schneider Reiter Wimmer Egger Brunner Lang Auer
    Binder Lechner Wolf Wallner Aigner Ebner Koller Haas Schuster Novak Kovacs
    """
)
FAMILY_NAMES_NON_ASCII: tuple[str, ...] = _words(
    """
    Müller Ñúñez Ørsted Dvořák Wróbel Żak Sørensen Åberg Öztürk Jovanović Šimunović
    Kovačević Horváth Großmann Bäcker Fernández
    """
)
GIVEN_NAMES: dict[Sex, tuple[str, ...]] = {
    "M": _words(
        """
        Lukas Łukasz Jakob Maximilian Tobias Stefan Andreas Michael Jürgen Jörg Søren Matěj
        José Ömer Zoltán Dávid Piotr Jan Paul Felix Florian Georg Niklas David
        """
    ),
    "F": _words(
        """
        Anna Sophie Lena Marie Katharina Zoë Małgorzata Ágnes Sigrún Eva Magdalena Chloé Renée
        Željka Ines Julia Sarah Laura Hannah Johanna Elisabeth Théa Agnieszka Maria
        """
    ),
}
