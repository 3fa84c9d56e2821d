"""Conditional read decisions (ncp.provider.conditional): entity tags compared weakly, a list's
every member considered, dates to the second, anything unreadable never a 304."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime

from hypothesis import given
from hypothesis import strategies as st

from ncp.provider.conditional import not_modified

MOMENT = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)

versions = st.integers(min_value=1, max_value=10**6).map(str)


@given(held=st.lists(versions, max_size=5), current=versions, weak=st.lists(st.booleans()))
def test_a_tag_list_matches_exactly_when_it_names_the_version(
    held: list[str], current: str, weak: list[bool]
) -> None:
    tags = [("W/" if i < len(weak) and weak[i] else "") + f'"{v}"' for i, v in enumerate(held)]
    header = ", ".join(tags)
    expected = current in held
    assert not_modified({"if-none-match": header}, f'W/"{current}"', MOMENT) is expected


@given(
    st.text(max_size=40)
    | st.lists(st.sampled_from(['W/"3"', '"3"', ",", " ", '"', "*"])).map("".join)
)
def test_no_if_none_match_is_a_304_unless_it_names_the_version(header: str) -> None:
    if not_modified({"if-none-match": header}, 'W/"3"', MOMENT):
        assert header.strip() == "*" or '"3"' in header


@given(st.text(max_size=40) | st.datetimes(timezones=st.just(UTC)).map(format_datetime))
def test_no_if_modified_since_is_a_304_unless_it_is_a_date_not_before_the_version(
    header: str,
) -> None:
    if not_modified({"if-modified-since": header}, 'W/"3"', MOMENT):
        assert parsedate_to_datetime(header) >= MOMENT.replace(microsecond=0)


def test_a_date_counts_to_the_second() -> None:
    same_second = format_datetime(MOMENT.replace(microsecond=0), usegmt=True)
    before = format_datetime(MOMENT - timedelta(seconds=1), usegmt=True)
    assert not_modified({"if-modified-since": same_second}, 'W/"3"', MOMENT)
    assert not not_modified({"if-modified-since": before}, 'W/"3"', MOMENT)
    assert not not_modified({"if-modified-since": same_second}, 'W/"3"', None)


def test_if_none_match_decides_over_a_date() -> None:
    later = format_datetime(MOMENT + timedelta(days=1), usegmt=True)
    headers = {"if-none-match": 'W/"2"', "if-modified-since": later}
    assert not not_modified(headers, 'W/"3"', MOMENT)


def test_no_condition_is_no_304() -> None:
    assert not not_modified({}, 'W/"3"', MOMENT)
