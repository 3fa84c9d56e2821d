"""What the generator will write, decided before anything is written.

A plan is pure data derived from the seed alone, so the DICOM writer, the report builder and
the manifest all describe the same patients and studies, and two runs with one seed agree
byte for byte. Every random choice comes from a :class:`random.Random` seeded with a string
(stable across processes, unlike ``hash()``) that names what it decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from ncp.examples.catalogue import (
    FAMILY_NAMES_ASCII,
    FAMILY_NAMES_NON_ASCII,
    GIVEN_NAMES,
    INSTITUTIONS,
    MODALITIES,
    REFERRING_PHYSICIANS,
    REQUESTING_SERVICES,
    Institution,
    ModalitySpec,
    Person,
    Procedure,
    RequestingService,
    SeriesTemplate,
    Sex,
)
from ncp.fhir.datatypes import COUNTRY_ZONES

REFERENCE_DATE = date(2026, 6, 30)
"""Studies lie in the 15 years before this fixed day; the current time is never used."""
HISTORY_YEARS = 15
UID_ROOT = PYDICOM_ROOT_UID
"""pydicom's root, meant for UIDs generated with pydicom; entropy makes them deterministic."""
UID_NAMESPACE = "ncp-examples"


@dataclass(frozen=True, slots=True)
class SeriesPlan:
    uid: str
    number: int
    template: SeriesTemplate
    instance_uids: tuple[str, ...]
    frame_of_reference_uid: str
    started: datetime
    laterality: str
    """Laterality of a paired body part (L or R), or of a mammography view; else empty."""


@dataclass(frozen=True, slots=True)
class StudyPlan:
    index: int
    """Position among all studies of the run; seeds this study's pixel data."""
    uid: str
    accession: str
    study_id: str
    started: datetime
    """Local, timezone-aware date and time of the study."""
    modality: ModalitySpec
    procedure: Procedure
    institution: Institution
    manufacturer: str
    model: str
    station: str
    kvp: int | None
    referring: Person
    service: RequestingService
    radiologist: Person
    series: tuple[SeriesPlan, ...]

    @property
    def instance_count(self) -> int:
        return sum(len(s.instance_uids) for s in self.series)


@dataclass(frozen=True, slots=True)
class PatientPlan:
    index: int
    patient_id: str
    issuer: str
    family: str
    given: str
    birth_date: date
    sex: Sex
    studies: tuple[StudyPlan, ...]

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}"

    @property
    def is_ascii(self) -> bool:
        return self.dicom_name.isascii()


@dataclass(frozen=True, slots=True)
class RunPlan:
    seed: int
    country: str
    issuer: str
    zone: str
    patients: tuple[PatientPlan, ...]


def make_uid(seed: int, *parts: object) -> str:
    """A UID that depends only on the seed and on what it names (PS3.5 9.1 valid, <= 64)."""
    return str(generate_uid(UID_ROOT, [UID_NAMESPACE, str(seed), *map(str, parts)]))


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join([UID_NAMESPACE, str(seed), *map(str, parts)]))


def austrian_svnr(serial: int, birth: date) -> str | None:
    """An Austrian social insurance number (NNNC DDMMYY) for a serial, or None if the serial
    yields check digit 10 (such serials are never issued)."""
    digits = [int(c) for c in f"{serial:03d}{birth:%d%m%y}"]
    weights = (3, 7, 9, 5, 8, 4, 2, 1, 6)
    check = sum(w * d for w, d in zip(weights, digits, strict=True)) % 11
    if check == 10:
        return None
    return f"{serial:03d}{check}{birth:%d%m%y}"


def _patient_id(rng: random.Random, country: str, birth: date, taken: set[str]) -> str:
    while True:
        if country == "AT":
            candidate = austrian_svnr(rng.randrange(100, 1000), birth)
        else:
            candidate = str(rng.randrange(10**9, 10**10))
        if candidate is not None and candidate not in taken:
            taken.add(candidate)
            return candidate


def _age_at(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _eligible(sex: Sex, birth: date, day: date) -> list[tuple[ModalitySpec, Procedure, float]]:
    adult = _age_at(birth, day) >= 18
    options: list[tuple[ModalitySpec, Procedure, float]] = []
    for modality in MODALITIES:
        # Mammography and nuclear medicine are not done on children in this data set.
        if modality.modality in ("MG", "NM", "PT") and not adult:
            continue
        procs = [p for p in modality.procedures if p.sex in (None, sex)]
        options += [(modality, p, modality.weight / len(procs)) for p in procs]
    return options


def _choose_exam(
    rng: random.Random, sex: Sex, birth: date, day: date, forced: ModalitySpec | None
) -> tuple[ModalitySpec, Procedure]:
    options = _eligible(sex, birth, day)
    if forced is not None:
        forced_options = [(m, p) for m, p, _ in options if m is forced]
        if forced_options:
            return rng.choice(forced_options)
    modality, procedure, _ = rng.choices(options, weights=[w for *_, w in options])[0]
    return modality, procedure


def _study_start(rng: random.Random, birth: date, zone: ZoneInfo) -> datetime:
    first = max(REFERENCE_DATE - timedelta(days=365 * HISTORY_YEARS), birth + timedelta(days=30))
    day = first + timedelta(days=rng.randrange((REFERENCE_DATE - first).days + 1))
    moment = time(rng.randrange(7, 19), rng.randrange(60), rng.randrange(60))
    return datetime.combine(day, moment, tzinfo=zone)


def _plan_series(
    rng: random.Random,
    seed: int,
    study_key: tuple[object, ...],
    procedure: Procedure,
    started: datetime,
) -> tuple[SeriesPlan, ...]:
    count = rng.randint(*procedure.series_count)
    side = rng.choice("LR") if procedure.paired else ""
    frame_of_reference = make_uid(seed, *study_key, "frame-of-reference")
    series: list[SeriesPlan] = []
    for number, template in enumerate(procedure.series[:count], start=1):
        n = rng.randint(*template.instances)
        uid = make_uid(seed, *study_key, "series", number)
        series.append(
            SeriesPlan(
                uid=uid,
                number=number,
                template=template,
                instance_uids=tuple(make_uid(seed, uid, "instance", i) for i in range(1, n + 1)),
                frame_of_reference_uid=frame_of_reference,
                started=started + timedelta(minutes=3 * (number - 1), seconds=rng.randrange(60)),
                laterality=template.laterality or side,
            )
        )
    return tuple(series)


def plan_run(
    *, patients: int, seed: int, big_patient_studies: int, country: str, issuer: str
) -> RunPlan:
    """Plan every patient and study of a run. The first patient is the big one."""
    # Where the study took place decides the UTC offset of its local date and time.
    zone_name = COUNTRY_ZONES.get(country, "Europe/Brussels")
    zone = ZoneInfo(zone_name)
    taken_ids: set[str] = set()
    accession_base = _rng(seed, "accession").randrange(100_000, 400_000)
    study_index = 0
    planned: list[PatientPlan] = []
    for p in range(patients):
        rng = _rng(seed, "patient", p)
        big = p == 0
        # The big patient is an adult woman, so every procedure of the catalogue applies.
        sex: Sex = "F" if big else rng.choice(("M", "F"))
        birth = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * (15 if big else 70)))
        families = FAMILY_NAMES_NON_ASCII if p % 3 == 0 else FAMILY_NAMES_ASCII
        family, given = rng.choice(families), rng.choice(GIVEN_NAMES[sex])
        n_studies = big_patient_studies if big else min(1 + int(rng.expovariate(1 / 4)), 15)
        studies: list[StudyPlan] = []
        for s in range(n_studies):
            srng = _rng(seed, "study", p, s)
            started = _study_start(srng, birth, zone)
            # The big patient's first studies walk through every modality once.
            forced = MODALITIES[s] if big and s < len(MODALITIES) else None
            modality, procedure = _choose_exam(srng, sex, birth, started.date(), forced)
            institution = srng.choice(INSTITUTIONS)
            manufacturer, model = srng.choice(modality.equipment)
            number = accession_base + study_index
            study_key: tuple[object, ...] = ("study", p, s)
            studies.append(
                StudyPlan(
                    index=study_index,
                    uid=make_uid(seed, *study_key),
                    accession=f"{institution.code}{started.year}{number:06d}",
                    study_id=str(number),
                    started=started,
                    modality=modality,
                    procedure=procedure,
                    institution=institution,
                    manufacturer=manufacturer,
                    model=model,
                    station=f"{institution.code}{modality.modality}{srng.randint(1, 3):02d}",
                    kvp=srng.randint(*modality.kvp) if modality.kvp else None,
                    referring=srng.choice(REFERRING_PHYSICIANS),
                    service=REQUESTING_SERVICES[srng.choice(procedure.services)],
                    radiologist=srng.choice(institution.radiologists),
                    series=_plan_series(srng, seed, study_key, procedure, started),
                )
            )
            study_index += 1
        studies.sort(key=lambda st: st.started)
        planned.append(
            PatientPlan(
                index=p,
                patient_id=_patient_id(rng, country, birth, taken_ids),
                issuer=issuer,
                family=family,
                given=given,
                birth_date=birth,
                sex=sex,
                studies=tuple(studies),
            )
        )
    return RunPlan(seed, country, issuer, zone_name, tuple(planned))
