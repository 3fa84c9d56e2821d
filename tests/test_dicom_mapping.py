"""DICOM header → index record: the documented rules, and odd-but-legal headers as properties."""

from __future__ import annotations

import io
from datetime import date, datetime

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from ncp.dicom.mapping import Code, map_header
from ncp.dicom.source import InstanceHeader, SourceEntry
from ncp.errors import UnreadableInstance
from tests.support.dicom_factory import encode, make_instance


def read_back(ds: Dataset) -> InstanceHeader:
    """Encode and decode as the folder source does, so character sets are really exercised."""
    data = encode(ds)
    parsed = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    syntax = str(parsed.file_meta.TransferSyntaxUID)
    del parsed.file_meta
    return InstanceHeader(SourceEntry("x.dcm", "fp"), parsed, len(data), syntax)


def test_full_header_maps_every_field() -> None:
    ds = make_instance(
        IssuerOfPatientID="urn:oid:1.2.40.0.10.1.4.3.1",
        PatientName="Müller^Jürgen",
        StudyDescription="CT Thorax",
        StudyID="42",
        SeriesDescription="Axial 1mm",
        RequestingService="Kardiologie",
        ReferringPhysicianName="Huber^Anna",
        InstitutionName="LKH Graz",
        Laterality="R",
        SeriesDate="20240102",
        SeriesTime="1016",
    )
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "LKH-GRAZ"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "24627-2", "LN", "CT Chest"
    ds.ProcedureCodeSequence = [code]
    service = Dataset()
    service.CodeValue, service.CodingSchemeDesignator, service.CodeMeaning = (
        "394579002",
        "SCT",
        "Cardiology",
    )
    ds.RequestingServiceCodeSequence = [service]

    rec = map_header(read_back(ds))

    assert rec.patient.patient_id == "PAT-1"
    assert rec.patient.issuer == "urn:oid:1.2.40.0.10.1.4.3.1"
    assert (rec.patient.family_name, rec.patient.given_name) == ("Müller", "Jürgen")
    assert rec.patient.birth_date == date(1970, 1, 1)
    assert rec.study.accession_issuer == "LKH-GRAZ"
    assert rec.study.started == datetime(2024, 1, 2, 10, 15)
    assert rec.study.procedure_code == Code("LN", "24627-2", "CT Chest")
    assert rec.study.requesting_service_code == Code("SCT", "394579002", "Cardiology")
    assert rec.study.referring_physician == "Anna Huber"
    assert rec.series.started == datetime(2024, 1, 2, 10, 16)
    assert rec.series.laterality == "R"
    assert rec.instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert rec.instance.size_bytes > 0
    assert rec.notes == ()


@pytest.mark.parametrize(
    "keyword",
    ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"],
)
def test_identity_attributes_are_required(keyword: str) -> None:
    ds = make_instance(**{keyword: None})
    with pytest.raises(UnreadableInstance, match=keyword):
        map_header(read_back(ds))


@pytest.mark.parametrize(
    "bad", ["1.2.3*", "../1.2", "1.2.3 4", "x" * 10, "1." * 40, "..", ".", "1..2", "1.2."]
)
def test_malformed_uid_is_refused(bad: str) -> None:
    header = read_back(make_instance())
    header.dataset.StudyInstanceUID = bad
    with pytest.raises(UnreadableInstance, match="not a valid UID"):
        map_header(header)


def test_unparseable_dates_become_none_with_a_note() -> None:
    ds = make_instance(StudyDate="2024-13-45", StudyTime="9999", PatientBirthDate="19700231")
    rec = map_header(read_back(ds))
    assert rec.study.started is None
    assert rec.patient.birth_date is None
    assert any("StudyDate" in n for n in rec.notes)
    assert any("PatientBirthDate" in n for n in rec.notes)


def test_bad_time_keeps_the_date() -> None:
    rec = map_header(read_back(make_instance(StudyTime="2561")))
    assert rec.study.started == datetime(2024, 1, 2)
    assert any("StudyTime" in n for n in rec.notes)


# --- properties over odd but legal headers -------------------------------------------------

# PN components: no component or group separators, no control characters, at most 64 chars.
_pn_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="^=\\"
    ),
    max_size=20,
)
_lo_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\\"
    ),
    max_size=64,
)
_cs = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ", max_size=16)


@st.composite
def odd_headers(draw: st.DrawFn) -> tuple[Dataset, dict[str, object]]:
    family, given = draw(_pn_text), draw(_pn_text)
    body = draw(st.one_of(st.none(), _cs, _cs.map(str.lower)))
    modalities = draw(
        st.lists(st.sampled_from(["CT", "MR", "PT", "OT", "SR"]), min_size=1, max_size=3)
    )
    description = draw(st.one_of(st.none(), _lo_text))
    private = draw(st.booleans())
    ds = make_instance(PatientName=f"{family}^{given}")
    if body is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = body
    ds.Modality = modalities if len(modalities) > 1 else modalities[0]
    if description is not None:
        ds.StudyDescription = description
        ds.SeriesDescription = description
    if private:
        block = ds.private_block(0x0009, "NCP TEST", create=True)
        block.add_new(0x01, "LO", "private value")
        block.add_new(0x02, "UN", b"\x00\x01\x02\x03")
    expect = {
        "family": family.strip() or None,
        "given": given.strip() or None,
        "body": (body.strip().upper() or None) if body is not None else None,
        "modality": modalities[0],
        "description": (description.strip() or None) if description is not None else None,
    }
    return ds, expect


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(odd_headers())
def test_odd_headers_never_crash_and_map_as_documented(
    case: tuple[Dataset, dict[str, object]],
) -> None:
    ds, expect = case
    rec = map_header(read_back(ds))
    assert rec.patient.family_name == expect["family"]
    assert rec.patient.given_name == expect["given"]
    assert rec.series.body_part == expect["body"]
    assert rec.series.modality == expect["modality"]
    assert rec.study.description == expect["description"]
    assert rec.series.description == expect["description"]


@settings(max_examples=50, deadline=None)
@given(odd_headers())
def test_private_tags_do_not_change_the_record(case: tuple[Dataset, dict[str, object]]) -> None:
    ds, _ = case
    with_private = map_header(read_back(ds))
    for elem in list(ds):
        if elem.tag.is_private:
            del ds[elem.tag]
    without_private = map_header(read_back(ds))
    assert with_private.study == without_private.study
    assert with_private.series == without_private.series
    assert with_private.patient == without_private.patient
    assert with_private.instance.sop_uid == without_private.instance.sop_uid


@pytest.mark.parametrize("text", ["INF", "-inf", "1e400", "NaN", "2147483648", "-2147483649", "x"])
def test_integer_fields_out_of_range_are_noted_not_kept(text: str) -> None:
    # An IS value the index cannot hold (or that is no number) is dropped with a note.
    header = read_back(make_instance())
    raw = text.encode()
    tag = Tag("SeriesNumber")
    header.dataset[tag] = RawDataElement(tag, "IS", len(raw), raw, 0, False, True)
    rec = map_header(header)
    assert rec.series.number is None
    assert any("SeriesNumber" in note for note in rec.notes)


def test_integer_fields_at_the_edge_of_range_are_kept() -> None:
    header = read_back(make_instance())
    header.dataset.SeriesNumber = "2147483647"
    assert map_header(header).series.number == 2**31 - 1


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "StudyDate",
                "StudyTime",
                "PatientBirthDate",
                "SeriesNumber",
                "InstanceNumber",
                "NumberOfFrames",
                "PatientSex",
                "AccessionNumber",
                "InstitutionName",
            ]
        ),
        st.text(max_size=20),
    )
)
def test_arbitrary_values_in_tolerated_fields_never_crash(values: dict[str, str]) -> None:
    header = read_back(make_instance())
    for keyword, value in values.items():
        # Raw bytes, decoded lazily on access, as a foreign archive or a damaged file hands them.
        tag = Tag(keyword)
        raw = value.encode("utf-8")
        header.dataset[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    rec = map_header(header)
    assert rec.instance.sop_uid == "1.2.826.0.1.3680043.10.1.1.1.1"
