"""The lists the viewer page (and any QIDO-RS client) reads: studies, series and instances of the
studies a viewer may see, in DICOM JSON (PS3.18 F.2), with the attributes a viewer shows.

Only attributes named here are ever copied from a header, so no pixel data, no bulk data and
nothing private reaches an answer, whatever the archive's headers hold.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from ncp.viewer.frames import ImageRef, StudyImages

STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
)
SERIES_KEYWORDS = (
    "SpecificCharacterSet",
    "Modality",
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "BodyPartExamined",
    "Laterality",
    "PatientPosition",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
)
INSTANCE_KEYWORDS = (
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "AcquisitionDate",
    "AcquisitionTime",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SliceThickness",
    "KVP",
    "XRayTubeCurrent",
    "ExposureTime",
    "RepetitionTime",
    "EchoTime",
    "MagneticFieldStrength",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PixelAspectRatio",
    "RecommendedDisplayFrameRate",
    "CineRate",
    "FrameTime",
    "BitsStored",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "LossyImageCompression",
)
_MODALITIES_IN_STUDY = "00080061"
_NUMBER_OF_SERIES = "00201206"
_NUMBER_OF_INSTANCES = "00201208"
_SERIES_INSTANCES = "00201209"
_AVAILABLE_SYNTAX = "00083002"
_BODY_PARTS = "00180015"


def _pick(ds: Dataset, keywords: tuple[str, ...]) -> dict[str, Any]:
    kept = Dataset()
    for keyword in keywords:
        if keyword in ds:
            element = ds[keyword]
            if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"):
                continue  # never binary data, never nested data sets
            kept[Tag(keyword)] = element
    try:
        out: dict[str, Any] = kept.to_json_dict()
    except Exception:  # a value pydicom cannot write as JSON (a malformed header): skip it
        out = {}
        for element in kept:
            try:
                out.update(Dataset({element.tag: element}).to_json_dict())
            except Exception:
                continue
    return out


def study_json(images: StudyImages) -> dict[str, Any]:
    first = images.images[0].header
    out = _pick(first, STUDY_KEYWORDS)
    modalities = sorted({str(i.header.get("Modality", "")) for i in images.images} - {""})
    parts = sorted({str(i.header.get("BodyPartExamined", "")) for i in images.images} - {""})
    out[_MODALITIES_IN_STUDY] = {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
    if parts:
        out[_BODY_PARTS] = {"vr": "CS", "Value": parts}
    out[_NUMBER_OF_SERIES] = {"vr": "IS", "Value": [len(images.series_uids())]}
    out[_NUMBER_OF_INSTANCES] = {"vr": "IS", "Value": [len(images.images)]}
    return out


def series_json(images: StudyImages) -> list[dict[str, Any]]:
    out = []
    for uid in images.series_uids():
        members = images.of_series(uid)
        item = _pick(members[0].header, SERIES_KEYWORDS)
        item[_SERIES_INSTANCES] = {"vr": "IS", "Value": [len(members)]}
        out.append(item)
    return out


def instance_json(image: ImageRef) -> dict[str, Any]:
    """The image's attributes a viewer shows (DICOM JSON). Kept for the header it was made
    of (about a millisecond each with pydicom: a series of hundreds is listed once, not at
    every request); callers must not change it."""
    with _KEPT_LOCK:
        found = _KEPT.get(id(image.header))
        if found is not None and found[0] is image.header and found[1] == image.transfer_syntax:
            _KEPT.move_to_end(id(image.header))
            return found[2]
    item = _pick(image.header, INSTANCE_KEYWORDS)
    if image.transfer_syntax:
        item[_AVAILABLE_SYNTAX] = {"vr": "UI", "Value": [image.transfer_syntax]}
    with _KEPT_LOCK:
        # The entry holds the header itself, so its id() cannot name another one meanwhile.
        _KEPT[id(image.header)] = (image.header, image.transfer_syntax, item)
        while len(_KEPT) > _KEPT_MAX:
            _KEPT.popitem(last=False)
    return item


_KEPT: OrderedDict[int, tuple[Dataset, str, dict[str, Any]]] = OrderedDict()
_KEPT_LOCK = threading.Lock()
_KEPT_MAX = 8192
"""Instance lists kept: about 2 KB each, so at most some 16 MB."""
