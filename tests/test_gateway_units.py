"""The gateway's pieces on their own: the multipart reader and writer, transfer slots, QIDO
matching, Accept negotiation, URL rewriting and path parsing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncp.gateway.app import parse_path
from ncp.gateway.errors import BadRequest, NotAcceptable, NotFound, StreamBroken, Unavailable
from ncp.gateway.limits import TransferSlots, rank_of
from ncp.gateway.multipart import MultipartReader, MultipartWriter, PartHead
from ncp.gateway.qido import parse_query
from ncp.gateway.rewrite import UrlRewriter
from ncp.gateway.wado import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    archive_accept,
    choose_syntax,
    dicom_syntaxes,
)

# -- multipart ------------------------------------------------------------------------------


async def _chunks(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))):
        yield data[start:cut]
        start = cut
    yield data[start:]


async def _read_all(data: bytes, cuts: list[int], boundary: bytes) -> list[tuple[str, bytes]]:
    reader = MultipartReader(_chunks(data, cuts), boundary)
    parts = []
    while (headers := await reader.next_part()) is not None:
        body = b"".join([piece async for piece in reader.body()])
        parts.append((headers.get("content-type", ""), body))
    return parts


def _frame(parts: list[bytes]) -> tuple[bytes, bytes]:
    writer = MultipartWriter("application/dicom")
    out = (
        b"".join(writer.open_part(PartHead("application/dicom")) + body for body in parts)
        + writer.close()
    )
    return out, writer.boundary.encode()


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=300), min_size=0, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_parts_survive_any_split_into_chunks(parts: list[bytes], cuts: list[int]) -> None:
    data, boundary = _frame(parts)
    read = asyncio.run(_read_all(data, cuts, boundary))
    assert [body for _, body in read] == parts
    assert all(kind == "application/dicom" for kind, _ in read)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=4),
       keep=st.integers(min_value=0, max_value=10_000))  # fmt: skip
def test_a_body_cut_short_is_a_broken_stream_never_fewer_parts(
    parts: list[bytes], keep: int
) -> None:
    data, boundary = _frame(parts)
    cut = data[: min(keep, len(data) - 3)]  # never the whole close delimiter
    try:
        read = asyncio.run(_read_all(cut, [], boundary))
    except StreamBroken:
        return
    raise AssertionError(f"a truncated body read as {len(read)} complete parts")


def test_archive_part_headers_are_not_passed_on() -> None:
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n"
        b"Content-Location: http://archive.internal:8042/dicom-web/x\r\n\r\nDATA\r\n--b--\r\n"
    )
    parts = asyncio.run(_read_all(body, [7, 30], b"b"))
    assert parts == [("application/dicom", b"DATA")]
    writer = MultipartWriter("application/dicom")
    assert b"archive" not in writer.open_part(PartHead(parts[0][0]))


# -- transfer slots -------------------------------------------------------------------------


def test_waiters_are_served_by_urgency_then_arrival() -> None:
    async def scenario() -> list[str]:
        slots = TransferSlots(1, queue_timeout_s=60, retry_after_s=3)
        order: list[str] = []
        await slots.acquire(rank_of("routine", "TREAT"))

        async def wait(name: str, priority: str, purpose: str = "TREAT") -> None:
            await slots.acquire(rank_of(priority, purpose))
            order.append(name)
            slots.release()

        tasks = []
        for name, priority, purpose in [
            ("routine-1", "routine", "TREAT"),
            ("urgent", "urgent", "TREAT"),
            ("routine-2", "routine", "TREAT"),
            ("stat", "stat", "TREAT"),
            ("emergency", "routine", "ETREAT"),
        ]:
            tasks.append(asyncio.create_task(wait(name, priority, purpose)))
            await asyncio.sleep(0)
        assert slots.waiting == 5
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.in_use == 0
        return order

    assert asyncio.run(scenario()) == ["emergency", "stat", "urgent", "routine-1", "routine-2"]


def test_a_full_gateway_refuses_after_the_queue_timeout_and_forgets_the_waiter() -> None:
    async def scenario() -> None:
        slots = TransferSlots(1, queue_timeout_s=0.01, retry_after_s=9)
        await slots.acquire(rank_of("stat", "ETREAT"))
        with pytest.raises(Unavailable) as refused:
            await slots.acquire(rank_of("stat", "ETREAT"))
        assert refused.value.headers == {"Retry-After": "9"}
        assert slots.waiting == 0
        slots.release()
        assert slots.in_use == 0
        async with slots.slot(rank_of("routine", "TREAT")):
            assert slots.in_use == 1

    asyncio.run(scenario())


def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    async def scenario() -> None:
        slots = TransferSlots(1, queue_timeout_s=60, retry_after_s=1)
        await slots.acquire((0, 0))
        waiter = asyncio.create_task(slots.acquire((0, 0)))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        slots.release()
        assert slots.in_use == 0

    asyncio.run(scenario())


# -- QIDO matching ------------------------------------------------------------------------------


def _item(**values: tuple[str, list[object]]) -> dict[str, object]:
    return {tag: {"vr": vr, "Value": list(v)} for tag, (vr, v) in values.items()}


ITEM = {
    "00100020": {"vr": "LO", "Value": ["PAT200"]},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
    "00080020": {"vr": "DA", "Value": ["20240102"]},
    "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
    "00201208": {"vr": "IS", "Value": [3]},
}


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ("PatientID=PAT200", True),
        ("PatientID=pat200", False),  # case-sensitive, unlike Orthanc
        ("PatientID=PAT2*", True),
        ("PatientID=PAT20?", True),
        ("PatientID=PAT2", False),
        ("PatientID=*", True),
        ("PatientID=", True),
        ("00100020=PAT200", True),
        ("PatientName=Doe^*", True),
        ("PatientName=doe^*", False),
        ("StudyDate=20240101-20240131", True),
        ("StudyDate=-20231231", False),
        ("StudyDate=20240102-", True),
        ("StudyInstanceUID=1.2.3,1.2.4", True),
        ("StudyInstanceUID=1.2.4", False),
        ("NumberOfStudyRelatedInstances=3", True),
        ("PatientID=.*", False),  # regular expression syntax is literal
    ],
)
def test_matching_is_exact_on_our_side(query: str, matches: bool) -> None:
    key, _, value = query.partition("=")
    assert parse_query([(key, value)]).matches(ITEM) is matches


@pytest.mark.parametrize(
    "params",
    [
        [("StudyInstanceUID", "*")],
        [("StudyInstanceUID", "1.2.?")],
        [("NoSuchKeyword", "x")],
        [("PatientID", "a\x00b")],
        [("limit", "-1")],
        [("offset", "x")],
        [("PatientID", "a"), ("00100020", "b")],
        [("ReferencedStudySequence", "x")],
        [("00081110.00081150", "1.2")],
        [("fuzzymatching", "maybe")],
        [("includefield", "NotAKeyword")],
    ],
)
def test_unsafe_or_unknown_parameters_are_refused(params: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest):
        parse_query(params)


def test_paging_and_includefield() -> None:
    query = parse_query(
        [("limit", "2"), ("offset", "1"), ("includefield", "StudyDescription,00080020")]
    )
    assert query.include == {"00081030", "00080020"}
    assert query.page([{"n": i} for i in range(5)]) == [{"n": 1}, {"n": 2}]  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab*?.^$[]()\\+", max_size=8), value=st.text(alphabet="ab.", max_size=8)
)
def test_wildcards_never_match_more_than_fnmatch_semantics(text: str, value: str) -> None:

    expected = re.fullmatch(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text),
        value,
        re.DOTALL,
    )
    item = {"00100020": {"vr": "LO", "Value": [value]}}
    query = parse_query([("PatientID", text)]) if text else None
    if query is not None:
        assert query.matches(item) is (expected is not None)


# -- Accept negotiation ---------------------------------------------------------------------


def test_transfer_syntax_negotiation() -> None:
    assert dicom_syntaxes(None) == [EXPLICIT_VR_LITTLE_ENDIAN]
    assert dicom_syntaxes('multipart/related; type="application/dicom"') == [
        EXPLICIT_VR_LITTLE_ENDIAN
    ]
    assert dicom_syntaxes('multipart/related; type="application/dicom"; transfer-syntax=*') == ["*"]
    both = (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50;'
        ' q=0.5, multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    )
    assert dicom_syntaxes(both) == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"]
    with pytest.raises(NotAcceptable):
        dicom_syntaxes("application/json")
    with pytest.raises(BadRequest):
        dicom_syntaxes('multipart/related; type="application/dicom"; transfer-syntax=1.2.*')
    with pytest.raises(BadRequest):
        dicom_syntaxes("multipart/related; type=\r\nX-Injected: 1")
    jpeg, jpeg_ls = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80"
    assert choose_syntax(["*"], {jpeg}) == "*"
    assert choose_syntax([EXPLICIT_VR_LITTLE_ENDIAN], None) == EXPLICIT_VR_LITTLE_ENDIAN
    # A folder: as stored when accepted, else transcoded to an uncompressed syntax.
    assert choose_syntax([EXPLICIT_VR_LITTLE_ENDIAN, jpeg], {jpeg}) == jpeg
    assert choose_syntax([EXPLICIT_VR_LITTLE_ENDIAN, "*"], {jpeg, jpeg_ls}) == "*"
    assert choose_syntax([jpeg_ls, EXPLICIT_VR_LITTLE_ENDIAN], {jpeg}) == EXPLICIT_VR_LITTLE_ENDIAN
    with pytest.raises(NotAcceptable):
        choose_syntax([jpeg_ls], {jpeg})


def test_the_archive_gets_a_rebuilt_accept_header() -> None:
    default = 'multipart/related; type="application/octet-stream"'
    assert archive_accept(None, default) == default
    assert archive_accept('multipart/related; type="*/*"', default) == default
    assert archive_accept("*/*", default) == default
    rebuilt = archive_accept(
        'multipart/related;type="image/jpeg" ;  transfer-syntax=1.2.3', default
    )
    assert rebuilt == 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.3'


# -- URL rewriting --------------------------------------------------------------------------


def test_archive_urls_are_rewritten_and_foreign_ones_dropped() -> None:
    rewriter = UrlRewriter("https://gw.example/dicomweb", "http://127.0.0.1:8042/dicom-web")
    item = {
        "00081190": {"vr": "UR", "Value": ["http://127.0.0.1:8042/dicom-web/studies/1.2"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://other-host/dicom-web/studies/1.2/bulk/x"},
        "00091001": {"vr": "UR", "Value": ["http://evil.example/steal"]},
        "00400275": {
            "vr": "SQ",
            "Value": [{"00081190": {"vr": "UR", "Value": ["/dicom-web/studies/1.3"]}}],
        },
        "00420011": {"vr": "OB", "BulkDataURI": "http://127.0.0.1:8042/dicom-web/../admin"},
    }
    rewriter.dataset(item)
    assert item["00081190"]["Value"] == ["https://gw.example/dicomweb/studies/1.2"]
    assert item["7FE00010"]["BulkDataURI"] == "https://gw.example/dicomweb/studies/1.2/bulk/x"
    assert "00091001" not in item
    assert "00420011" not in item
    nested = item["00400275"]["Value"][0]  # type: ignore[index]
    assert nested["00081190"]["Value"] == ["https://gw.example/dicomweb/studies/1.3"]


# -- paths ------------------------------------------------------------------------------------


def test_paths_name_uids_only() -> None:
    target = parse_path("studies/1.2/series/1.2.3/instances/1.2.3.4/frames/1,2")
    assert (target.kind, target.study, target.series, target.sop, target.tail) == (
        "frames", "1.2", "1.2.3", "1.2.3.4", "1,2"
    )  # fmt: skip
    assert parse_path("studies/1.2/series").kind == "search"
    assert (
        parse_path("studies/1.2/series/1.3/instances/1.4/bulk/00420011/0/7FE00010").kind == "bulk"
    )
    for bad in ("studies/..", "studies/1.2/series/..", "studies/1.2.*", "studies/1..2",
                "studies/1.2/series/1.3/instances/1.4/frames/0",
                "studies/1.2/series/1.3/instances/1.4/bulk/../x"):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_path(bad)
    for unknown in ("patients", "studies/1.2/rendered", "studies/1.2/series/1.3/series", ""):
        with pytest.raises(NotFound):
            parse_path(unknown)
