"""DICOM Part 10 files for one planned study, built with pydicom and NumPy.

pydicom needs a few milliseconds to encode a whole data set, too slow for ten thousand files.
Within a series only a handful of attributes change from one instance to the next (SOP
Instance UID, Instance Number, position, pixel data), so each series is encoded once, by
pydicom, as a template cut at those tags; an instance is the template spliced with its own
few elements, encoded here by the rules of PS3.5. The result is byte for byte what
:func:`pydicom.dcmwrite` writes for the full data set (a test checks it).
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ncp import __version__
from ncp.examples import phantoms
from ncp.examples.catalogue import Code
from ncp.examples.plan import UID_ROOT, PatientPlan, SeriesPlan, StudyPlan

IMPLEMENTATION_CLASS_UID = str(generate_uid(UID_ROOT, ["ncp", "implementation-class-uid"]))
IMPLEMENTATION_VERSION_NAME = f"NCP_{__version__.replace('.', '_')}"[:16]
_PREAMBLE = b"\x00" * 128 + b"DICM"

# Coded anatomy (DICOM CID 4031) for the body parts whose IODs need a code as well.
_ANATOMY = {
    "CHEST": Code("51185008", "SCT", "Chest"),
    "KNEE": Code("72696002", "SCT", "Knee"),
    "HIP": Code("29836001", "SCT", "Hip"),
    "SHOULDER": Code("16982005", "SCT", "Shoulder"),
    "BREAST": Code("76752008", "SCT", "Breast"),
}
# Mammography views (CID 4014) and the Patient Orientation each view implies, per side.
_MG_VIEW = {
    "CC": Code("399162004", "SCT", "cranio-caudal"),
    "MLO": Code("399368009", "SCT", "medio-lateral oblique"),
}
_MG_ORIENTATION = {
    ("R", "CC"): ["P", "L"],
    ("L", "CC"): ["A", "R"],
    ("R", "MLO"): ["P", "FL"],
    ("L", "MLO"): ["A", "FR"],
}
# Direction cosines (row, then column) of the slice planes.
_PLANES = {
    "AXIAL": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "SAGITTAL": [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
    "CORONAL": [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
}
# MR protocol parameters by weighting: scanning sequence, variant, TR, TE, TI, ETL, flip angle.
_MR = {
    "T1": (["GR", "IR"], ["SK", "SP", "MP"], 2300.0, 2.98, 900.0, 1, 9.0),
    "T2": (["SE"], ["SK"], 5000.0, 100.0, None, 15, 150.0),
    "FLAIR": (["SE", "IR"], ["SK", "SP"], 9000.0, 81.0, 2500.0, 16, 150.0),
    "DWI": (["EP"], ["SK", "SP"], 4000.0, 89.0, None, 1, 90.0),
    "STIR": (["IR"], ["SK"], 4000.0, 60.0, 160.0, 13, 150.0),
}


@dataclass(frozen=True, slots=True)
class EncodedInstance:
    """One instance as the bytes of a DICOM Part 10 file."""

    series: SeriesPlan
    number: int
    """Instance Number."""
    sop_instance_uid: str
    data: bytes


Value = str | int | bytes
"""A varying element's value: text (multiple values joined by a backslash), a US integer, or
the raw bytes of OB/OW pixel data."""

# Explicit VR Little Endian puts these VRs behind a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def encode_element(tag: int, vr: str, value: Value) -> bytes:
    """One data element in Explicit VR Little Endian, padded to even length as PS3.5 6.2
    requires (UI and binary with NUL, text with a space)."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, int):
        raw = struct.pack("<H", value) if vr == "US" else struct.pack("<I", value)
    else:
        raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if vr in ("UI", "OB") else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(raw)) + raw
    return struct.pack("<HH2sH", group, element, vr.encode(), len(raw)) + raw


class SeriesEncoder:
    """Encodes the instances of one series: a template cut at the varying tags, spliced with
    each instance's values. Only ASCII text and binary values may vary."""

    def __init__(
        self,
        template: Dataset,
        varying: Sequence[tuple[int, str]],
        reuse: dict[BaseTag, tuple[DataElement, bytes]] | None = None,
    ) -> None:
        """`reuse` remembers encoded elements between the series of one study: an element
        object met again (the study's shared part) is not encoded again."""
        self._varying = sorted(varying)
        tags = [t for t, _ in self._varying]
        encodings = convert_encodings(template.get("SpecificCharacterSet", "ISO_IR 6"))
        known = {} if reuse is None else reuse
        chunks: list[list[bytes]] = [[] for _ in range(len(tags) + 1)]
        for elem in template:  # in tag order
            if elem.tag in tags:
                raise ValueError(f"{elem.tag} varies per instance and cannot be in the template")
            seen = known.get(elem.tag)
            if seen is not None and seen[0] is elem:
                data = seen[1]
            else:
                data = _encode_cached(elem, encodings)
                known[elem.tag] = (elem, data)
            chunks[bisect.bisect(tags, elem.tag)].append(data)
        self._chunks = [b"".join(c) for c in chunks]
        sop_class = encode_element(0x00020002, "UI", str(template.SOPClassUID))
        self._meta_before = encode_element(0x00020001, "OB", b"\x00\x01") + sop_class
        self._meta_after = b"".join(
            encode_element(tag, vr, value)
            for tag, vr, value in (
                (0x00020010, "UI", ExplicitVRLittleEndian),
                (0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
                (0x00020013, "SH", IMPLEMENTATION_VERSION_NAME),
            )
        )

    def encode(self, sop_instance_uid: str, values: Sequence[Value]) -> bytes:
        """Part 10 bytes of one instance; `values` follow the varying tags in tag order."""
        if len(values) != len(self._varying):
            raise ValueError(f"expected {len(self._varying)} varying values, got {len(values)}")
        uid = encode_element(0x00020003, "UI", sop_instance_uid)
        meta_length = len(self._meta_before) + len(uid) + len(self._meta_after)
        parts = [
            _PREAMBLE,
            encode_element(0x00020000, "UL", meta_length),
            self._meta_before,
            uid,
            self._meta_after,
        ]
        for chunk, (tag, vr), value in zip(self._chunks, self._varying, values, strict=False):
            parts += [chunk, encode_element(tag, vr, value)]
        parts.append(self._chunks[-1])
        return b"".join(parts)


def _encode_cached(elem: DataElement, encodings: list[str]) -> bytes:
    """One top-level element as pydicom encodes it, reusing bytes already produced: most
    elements (patient, study, equipment, pixel module) repeat from series to series."""
    key = None if elem.VR == "SQ" else (elem.tag, elem.VR, str(elem.value), *encodings)
    cached = _ELEMENT_CACHE.get(key) if key is not None else None
    if cached is None:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem, encodings)
        cached = fp.getvalue()
        if key is not None and len(_ELEMENT_CACHE) < 50_000:
            _ELEMENT_CACHE[key] = cached
    return cached


_ELEMENT_CACHE: dict[tuple[object, ...], bytes] = {}


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def _age(patient: PatientPlan, study: StudyPlan) -> str:
    day, birth = study.started.date(), patient.birth_date
    years = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
    if years >= 2:
        return f"{years:03d}Y"
    return f"{max((day - birth).days // 30, 0):03d}M"


def _utc_offset(moment: datetime) -> str:
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _texts_need_utf8(patient: PatientPlan, study: StudyPlan) -> bool:
    texts = [
        patient.dicom_name,
        study.referring.dicom_name,
        study.radiologist.dicom_name,
        study.institution.name,
        study.institution.department,
        study.institution.city,
        study.procedure.study_description,
        study.service.name,
        study.manufacturer,
        study.model,
        *(s.template.description for s in study.series),
    ]
    return not all(t.isascii() for t in texts)


def _study_part(patient: PatientPlan, study: StudyPlan) -> dict[BaseTag, DataElement]:
    """Patient, study, equipment and request attributes, the same in every series of a study:
    built once, shared by the series' data sets (and their encoded bytes reused)."""
    ds = Dataset()
    if _texts_need_utf8(patient, study):
        ds.SpecificCharacterSet = "ISO_IR 192"
    modality = study.modality
    ds.SOPClassUID = modality.sop_class_uid
    ds.StudyDate = _da(study.started)
    ds.StudyTime = _tm(study.started)
    ds.AccessionNumber = study.accession
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = study.institution.ris_issuer
    issuer.UniversalEntityID = study.institution.accession_oid
    issuer.UniversalEntityIDType = "ISO"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.Modality = modality.modality
    ds.Manufacturer = study.manufacturer
    ds.InstitutionName = study.institution.name
    ds.InstitutionAddress = study.institution.city
    ds.ReferringPhysicianName = study.referring.dicom_name
    ds.TimezoneOffsetFromUTC = _utc_offset(study.started)
    ds.StationName = study.station
    ds.StudyDescription = study.procedure.study_description
    ds.ProcedureCodeSequence = [_code_item(study.procedure.code)]
    ds.InstitutionalDepartmentName = study.institution.department
    ds.NameOfPhysiciansReadingStudy = study.radiologist.dicom_name
    ds.ManufacturerModelName = study.model
    ds.PatientName = patient.dicom_name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    if _is_oid(patient.issuer):
        qualifiers = Dataset()
        qualifiers.UniversalEntityID = patient.issuer
        qualifiers.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = _age(patient, study)
    ds.BodyPartExamined = study.procedure.body_part
    ds.DeviceSerialNumber = f"{zlib.crc32(f'{study.station}|{study.model}'.encode()) % 10**6:06d}"
    ds.SoftwareVersions = "VA20" if study.manufacturer == "SIEMENS" else "5.1.2"
    ds.ProtocolName = study.procedure.study_description
    ds.StudyInstanceUID = study.uid
    ds.StudyID = study.study_id
    ds.AcquisitionNumber = 1
    ds.RequestingService = study.service.name
    ds.RequestingServiceCodeSequence = [_code_item(study.service.code)]
    if study.kvp is not None:
        ds.KVP = study.kvp
    return {elem.tag: elem for elem in ds}


def _common(
    study_part: dict[BaseTag, DataElement], study: StudyPlan, series: SeriesPlan
) -> Dataset:
    """The study's shared part plus the General Series attributes of one series."""
    ds = Dataset(dict(study_part))
    ds.SeriesDate = _da(series.started)
    ds.AcquisitionDate = _da(series.started)
    ds.ContentDate = _da(series.started)
    ds.SeriesTime = _tm(series.started)
    ds.AcquisitionTime = _tm(series.started)
    ds.ContentTime = _tm(series.started)
    ds.SeriesDescription = series.template.description
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    # DX and MG say it per image (Image Laterality); the series attribute must then be absent.
    if series.laterality and study.modality.modality not in ("DX", "MG"):
        ds.Laterality = series.laterality
    return ds


def _is_oid(value: str) -> bool:
    parts = value.split(".")
    return len(parts) > 1 and all(
        p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts
    )


def _grey_pixel_module(ds: Dataset, rows: int, cols: int, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _window(ds: Dataset, center: float, width: float) -> None:
    ds.WindowCenter = f"{center:.0f}"
    ds.WindowWidth = f"{max(width, 1.0):.0f}"


def _frame_of_reference(ds: Dataset, series: SeriesPlan, body_part: str) -> None:
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    # An external landmark the table was zeroed on (PS3.3 C.7.4.1.1.2): iliac crest for the
    # trunk, orbito-meatal line for the head.
    ds.PositionReferenceIndicator = "OM" if body_part == "HEAD" else "IC"


# --- per-modality templates -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SeriesPixels:
    """Pixel data for every instance of a series and what varies with it."""

    frames: np.ndarray
    """One entry per instance: (rows, cols), (rows, cols, 3) or (frames, rows, cols)."""
    spacing: float
    """Pixel spacing in mm (square pixels)."""
    slice_gap: float


def _plane(series: SeriesPlan) -> str:
    """The slice plane: from the series kind for CT and PET, from the protocol name for MR."""
    kind, name = series.template.kind, series.template.description.lower()
    if kind == "LOCALIZER" or "_cor" in name:
        return "CORONAL"
    if kind in _PLANES:
        return kind
    return "SAGITTAL" if "_sag" in name else "AXIAL"


def _slice_geometry(ds: Dataset, plane: str, pixels: _SeriesPixels) -> list[tuple[str, str]]:
    """Set the Image Plane attributes the slices share on `ds`; return each slice's Image
    Position (Patient) and Slice Location as DS text."""
    orientation = _PLANES[plane]
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    count, rows, cols = pixels.frames.shape[:3]
    # Slices are centred on the origin and advance along the normal (feet-ward when axial).
    offsets = -(np.arange(count) - (count - 1) / 2) * pixels.slice_gap
    half = (cols / 2) * pixels.spacing * row_dir + (rows / 2) * pixels.spacing * col_dir
    corners = offsets[:, None] * normal[None, :] - half[None, :] + 0.0
    ds.ImageOrientationPatient = orientation
    ds.PixelSpacing = [f"{pixels.spacing:.4f}", f"{pixels.spacing:.4f}"]
    ds.SliceThickness = f"{pixels.slice_gap:.2f}"
    return [
        ("\\".join(f"{v:.3f}" for v in corner), f"{offset + 0.0:.3f}")
        for corner, offset in zip(corners, offsets, strict=True)
    ]


def _ct(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    localizer = series.template.kind == "LOCALIZER"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
    n = len(series.instance_uids)
    thin = "1.5" in series.template.description or "2.0" in series.template.description
    gap = 1.5 if thin else (3.0 if series.template.kind == "CORONAL" else 5.0)
    part = study.procedure.body_part
    hu = phantoms.ct_volume(part, _plane(series), n, 64, 64, rng, projection=localizer)
    stored = np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)
    _grey_pixel_module(ds, 64, 64, 12)
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if not localizer:
        ds.RescaleType = "HU"
    description = series.template.description
    if localizer:
        _window(ds, -400, 1400)
    elif "lung" in description:
        _window(ds, -600, 1500)
    elif "bone" in description:
        _window(ds, 500, 2000)
    else:
        _window(ds, 40, 400)
    ds.ConvolutionKernel = series.template.description.split()[-1] if not localizer else "T20f"
    ds.ReconstructionDiameter = 350
    ds.XRayTubeCurrent = 180
    ds.ExposureTime = 500
    ds.PatientPosition = "HFS"
    return _SeriesPixels(stored, 350 / 64, gap)


def _mr(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    kind = series.template.kind
    sequence, variant, tr, te, ti, etl, flip = _MR[kind]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = sequence
    ds.SequenceVariant = variant
    ds.ScanOptions = "FS" if kind == "STIR" else ""
    ds.MRAcquisitionType = "3D" if "mprage" in series.template.description else "2D"
    ds.SequenceName = f"*{series.template.description.split('_')[1]}"
    ds.RepetitionTime = tr
    ds.EchoTime = te
    if ti is not None:
        ds.InversionTime = ti
    ds.EchoTrainLength = etl
    ds.FlipAngle = flip
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 123.25
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = 3 if study.model in ("MAGNETOM Vida", "SIGNA Premier") else 1.5
    ds.PixelBandwidth = 200
    n = len(series.instance_uids)
    values = phantoms.mr_volume(study.procedure.body_part, kind, _plane(series), n, 64, 64, rng)
    stored = np.clip(values, 0, 4095).astype(np.uint16)
    _grey_pixel_module(ds, 64, 64, 12)
    center, width = phantoms.auto_window(stored)
    _window(ds, center, width)
    ds.PatientPosition = "HFS"
    gap = 4.0 if study.procedure.body_part == "LSPINE" else 5.0
    ds.SpacingBetweenSlices = gap
    return _SeriesPixels(stored, 240 / 64, gap)


def _projection_common(ds: Dataset, study: StudyPlan, series: SeriesPlan) -> None:
    ds.ViewPosition = series.template.view
    ds.ImagerPixelSpacing = ["2.78", "2.78"]
    ds.DistanceSourceToDetector = 1800 if study.procedure.body_part == "CHEST" else 1150
    ds.ExposureTime = 20
    ds.XRayTubeCurrent = 250
    ds.Exposure = 5


def _cr(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _projection_common(ds, study, series)
    ds.PlateType = "ST-VI"
    ds.PatientOrientation = ["L", "F"] if series.template.view != "LL" else ["A", "F"]
    stored = _projection_pixels(study, series, rng)
    _grey_pixel_module(ds, 128, 128, 12)
    _window(ds, 2048, 4096)
    return _SeriesPixels(stored, 2.78, 0.0)


def _projection_pixels(
    study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> np.ndarray:
    img = phantoms.radiograph(study.procedure.body_part, series.template.view, 128, 128, rng)
    if series.laterality == "L":
        img = img[:, :, ::-1]
    return np.asarray(np.clip(img, 0, 4095), dtype=np.uint16)


def _dx_family(ds: Dataset, study: StudyPlan, series: SeriesPlan) -> None:
    """DX Series, DX Anatomy Imaged, DX Image, DX Detector and Acquisition Context modules."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = series.laterality or "U"
    anatomy = _ANATOMY.get(study.procedure.body_part)
    if anatomy is not None:
        ds.AnatomicRegionSequence = [_code_item(anatomy)]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "SCINTILLATOR"
    ds.AcquisitionContextSequence = []


def _dx(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    _dx_family(ds, study, series)
    _projection_common(ds, study, series)
    ds.PositionerType = "COLUMN"
    ds.PatientOrientation = ["L", "F"] if series.template.view != "LL" else ["A", "F"]
    stored = _projection_pixels(study, series, rng)
    _grey_pixel_module(ds, 128, 128, 12)
    _window(ds, 2048, 4096)
    ds.DetectorID = f"{study.station}D"
    return _SeriesPixels(stored, 2.78, 0.0)


def _mg(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    _dx_family(ds, study, series)
    side, view = series.laterality, series.template.view
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    view_item = _code_item(_MG_VIEW[view])
    view_item.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_item]
    ds.PatientOrientation = _MG_ORIENTATION[(side, view)]
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.ImagerPixelSpacing = ["1.75", "1.75"]
    ds.DistanceSourceToDetector = 660
    ds.BodyPartThickness = 45
    ds.CompressionForce = 110
    ds.ExposureTime = 800
    ds.XRayTubeCurrent = 100
    img = phantoms.mammogram(view, 128, 128, rng)
    if side == "R":
        img = img[:, :, ::-1]
    stored = np.clip(img, 0, 4095).astype(np.uint16)
    _grey_pixel_module(ds, 128, 128, 12)
    _window(ds, 2048, 4096)
    return _SeriesPixels(stored, 1.75, 0.0)


def _us(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    ds.ImageType = [
        "ORIGINAL",
        "PRIMARY",
        "ABDOMINAL" if study.procedure.body_part == "ABDOMEN" else "SMALL PARTS",
    ]
    rgb = phantoms.ultrasound(len(series.instance_uids), 64, 64, rng)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = 64
    ds.Columns = 64
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PatientPosition = "HFS"
    ds.PatientOrientation = ""
    ds.TransducerData = "C1-6"
    return _SeriesPixels(rgb, 0.0, 0.0)


def _nm(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    frames = 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = [Tag("EnergyWindowVector"), Tag("DetectorVector")]
    ds.EnergyWindowVector = [1] * frames
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = list(range(1, frames + 1))
    ds.NumberOfDetectors = frames
    window = Dataset()
    limits = Dataset()
    limits.EnergyWindowLowerLimit = 126
    limits.EnergyWindowUpperLimit = 154
    window.EnergyWindowRangeSequence = [limits]
    window.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = [window]
    pharma = Dataset()
    pharma.RadionuclideCodeSequence = [_code_item(Code("44588005", "SCT", "Technetium^99m^"))]
    pharma.Radiopharmaceutical = (
        "Tc-99m HMPAO" if study.procedure.body_part == "HEAD" else ("Tc-99m MDP")
    )
    pharma.RadionuclideTotalDose = 740
    ds.RadiopharmaceuticalInformationSequence = [pharma]
    ds.DetectorInformationSequence = [_detector_item(i) for i in range(frames)]
    ds.PatientOrientationCodeSequence = []
    ds.PatientGantryRelationshipCodeSequence = []
    ds.CountsAccumulated = 1_500_000
    ds.ActualFrameDuration = 600_000
    ds.PixelSpacing = [4.8, 4.8]
    counts = phantoms.nm_views(
        study.procedure.body_part, len(series.instance_uids), frames, 64, 64, rng
    )
    _grey_pixel_module(ds, 64, 64, 16)
    return _SeriesPixels(counts.astype(np.uint16), 4.8, 0.0)


def _detector_item(index: int) -> Dataset:
    item = Dataset()
    item.CollimatorGridName = "LEHR"
    item.CollimatorType = "PARA"
    item.ImageOrientationPatient = (
        [1.0, 0.0, 0.0, 0.0, 0.0, -1.0] if index == 0 else [-1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    )
    item.ImagePositionPatient = [-153.6, 0.0, 153.6] if index == 0 else [153.6, 0.0, 153.6]
    return item


def _pt(
    ds: Dataset, study: StudyPlan, series: SeriesPlan, rng: np.random.Generator
) -> _SeriesPixels:
    n = len(series.instance_uids)
    corrected = "NAC" not in series.template.description
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.NumberOfSlices = n
    ds.CorrectedImage = (
        ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
        if corrected
        else ["DECY", "DTIM", "RAN", "NORM"]
    )
    ds.DecayCorrection = "START"
    ds.RandomsCorrectionMethod = "DLYD"
    ds.ReconstructionMethod = "OSEM3D"
    ds.CollimatorType = "NONE"
    ds.AttenuationCorrectionMethod = "CT" if corrected else "NONE"
    pharma = Dataset()
    pharma.Radiopharmaceutical = "Fludeoxyglucose"
    injected = series.started.replace(hour=max(series.started.hour - 1, 0))
    pharma.RadiopharmaceuticalStartTime = _tm(injected)
    pharma.RadionuclideTotalDose = 250_000_000
    pharma.RadionuclideHalfLife = 6586.2
    pharma.RadionuclidePositronFraction = 0.97
    pharma.RadionuclideCodeSequence = [_code_item(Code("77004003", "SCT", "^18^Fluorine"))]
    pharma.RadiopharmaceuticalCodeSequence = [
        _code_item(Code("35321007", "SCT", "Fluorodeoxyglucose F^18^"))
    ]
    ds.RadiopharmaceuticalInformationSequence = [pharma]
    ds.PatientOrientationCodeSequence = []
    ds.PatientGantryRelationshipCodeSequence = []
    ds.FrameReferenceTime = 0
    ds.ActualFrameDuration = 180_000
    ds.DecayFactor = 1.0
    ds.DoseCalibrationFactor = 1.0
    ds.SliceSensitivityFactor = 1.0
    activity = phantoms.pet_volume(study.procedure.body_part, n, 64, 64, rng)
    stored = np.clip(activity, 0, 65535).astype(np.uint16)
    _grey_pixel_module(ds, 64, 64, 16)
    ds.RescaleIntercept = 0
    center, width = phantoms.auto_window(stored)
    _window(ds, center, width)
    return _SeriesPixels(stored, 600 / 64, 3.0)


_BUILDERS = {"CT": _ct, "MR": _mr, "CR": _cr, "DX": _dx, "MG": _mg, "US": _us, "NM": _nm, "PT": _pt}
_SLICED = {"CT", "MR", "PT"}


def encode_study(patient: PatientPlan, study: StudyPlan, seed: int) -> Iterator[EncodedInstance]:
    """Every instance of a study as Part 10 bytes, series by series, in instance order."""
    modality = study.modality.modality
    shared = _study_part(patient, study)
    reuse: dict[BaseTag, tuple[DataElement, bytes]] = {}
    for series in study.series:
        rng = np.random.default_rng([seed, study.index, series.number])
        ds = _common(shared, study, series)
        pixels = _BUILDERS[modality](ds, study, series, rng)
        if modality in _SLICED or modality == "NM":
            _frame_of_reference(ds, series, study.procedure.body_part)
        yield from _encode_series(ds, series, pixels, reuse, sliced=modality in _SLICED)


def _encode_series(
    template: Dataset,
    series: SeriesPlan,
    pixels: _SeriesPixels,
    reuse: dict[BaseTag, tuple[DataElement, bytes]],
    *,
    sliced: bool,
) -> Iterator[EncodedInstance]:
    pet = template.Modality == "PT"
    varying = [
        (0x00080018, "UI"),
        (0x00200013, "IS"),
        (0x7FE00010, "OB" if template.BitsAllocated == 8 else "OW"),
    ]
    geometry: list[tuple[str, str]] = []
    if sliced:
        geometry = _slice_geometry(template, _plane(series), pixels)
        varying += [(0x00200032, "DS"), (0x00201041, "DS")]
    if pet:
        # PET scales each slice on its own (PS3.3 C.8.9.4.1.3): slope and index vary.
        varying += [(0x00281053, "DS"), (0x00541330, "US")]
    encoder = SeriesEncoder(template, varying, reuse)
    order = sorted(range(len(varying)), key=lambda i: varying[i][0])
    for index, uid in enumerate(series.instance_uids):
        values: list[Value] = [uid, str(index + 1), pixels.frames[index].tobytes()]
        if sliced:
            values += geometry[index]
        if pet:
            values += [f"{1.0 + 0.01 * index:.2f}", index + 1]
        data = encoder.encode(uid, [values[i] for i in order])
        yield EncodedInstance(series, index + 1, uid, data)
