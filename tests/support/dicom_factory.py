"""Small, valid DICOM instances for tests, built in memory with pydicom."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian


def make_instance(
    *,
    patient_id: str = "PAT-1",
    study_uid: str = "1.2.826.0.1.3680043.10.1.1",
    series_uid: str = "1.2.826.0.1.3680043.10.1.1.1",
    sop_uid: str = "1.2.826.0.1.3680043.10.1.1.1.1",
    pixels: bool = True,
    **attrs: Any,
) -> Dataset:
    """A CT image instance; keyword arguments set (or, with None, delete) further attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    if pixels:
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def with_references(
    ds: Dataset, depth: int, *, undefined: bool = False, foreign_ids: bool = False
) -> Dataset:
    """``ds`` with a Referenced Study Sequence of two items, each ``depth`` levels of Referenced
    Series Sequence deep around an item naming SOP instance 9.9.9.1.1 (and, with
    ``foreign_ids``, study 9.9.9 and series 9.9.9.1: UIDs a reader must not take for ``ds``'s);
    ``undefined``: the sequences in undefined length form."""
    item = Dataset()
    if foreign_ids:
        item.StudyInstanceUID = "9.9.9"
        item.SeriesInstanceUID = "9.9.9.1"
    item.ReferencedSOPInstanceUID = "9.9.9.1.1"
    for _ in range(depth):
        outer = Dataset()
        outer.SOPInstanceUID = "9.9.8.1"
        outer.ReferencedSeriesSequence = Sequence([item])
        outer["ReferencedSeriesSequence"].is_undefined_length = undefined
        item = outer
    ds.ReferencedStudySequence = Sequence([item, item])
    ds["ReferencedStudySequence"].is_undefined_length = undefined
    return ds


def write_instance(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
