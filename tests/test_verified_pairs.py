"""The memory of verified HP assertion + TRC pairs (``ncp.security.verified``): a pair that
passed once is not verified again, and nothing that would refuse it in full is skipped: expiry,
a clock set back, a key rotated, withdrawn or no longer trusted, another audience or country.
Then the same through a running node A: the second request of a pair skips the check, and the
pair is still refused (and audited) once it expires or its peer's keys go."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

import ncp.provider.auth as auth
from ncp.security.claims import HP_ASSERTION, TRC
from ncp.security.keys import KeySet
from ncp.security.pair import RequestContext, check_request_pair
from ncp.security.tokens import issue
from ncp.security.verified import VerifiedPairs
from tests.support import node as node_support
from tests.support.node import RunningNode
from tests.support.token_factory import (
    A_NODE,
    B_KEY,
    NOW,
    B,
    b_resolver,
    hp_claims,
    key_set,
    new_key,
    trc_claims,
)

node_a = node_support.node_a
LEEWAY = 30


def b_pair() -> tuple[str, str]:
    hp = issue(HP_ASSERTION, hp_claims(), B_KEY, now=NOW)
    return hp, issue(TRC, trc_claims(hp), B_KEY, now=NOW)


def remembered(
    hp: str, trc: str, keys: Any = b_resolver, **options: Any
) -> tuple[VerifiedPairs, RequestContext]:
    context = check_request_pair(
        hp, trc, tls_country=B, b_keys=keys, audience=A_NODE, now=NOW, leeway_s=LEEWAY
    )
    pairs = VerifiedPairs()
    pairs.put(
        hp,
        trc,
        context,
        tls_country=B,
        keys=keys,
        audience=A_NODE,
        checked_at=NOW,
        leeway_s=LEEWAY,
    )
    return pairs, context


def lookup(pairs: VerifiedPairs, hp: str, trc: str, **changes: Any) -> RequestContext | None:
    options: dict[str, Any] = {
        "tls_country": B,
        "keys": b_resolver,
        "audience": A_NODE,
        "now": NOW + timedelta(minutes=5),
        "leeway_s": LEEWAY,
        **changes,
    }
    return pairs.get(hp, trc, **options)


def test_a_pair_verified_once_is_known_by_its_exact_bytes() -> None:
    hp, trc = b_pair()
    pairs, context = remembered(hp, trc)
    assert lookup(pairs, hp, trc) is context
    # Another TRC under the same HP assertion, or the tokens swapped: not known.
    other_trc = issue(TRC, trc_claims(hp, expires_at=NOW + timedelta(minutes=90)), B_KEY, now=NOW)
    assert lookup(pairs, hp, other_trc) is None
    assert lookup(pairs, trc, hp) is None
    assert lookup(pairs, hp + "x", trc) is None


def test_known_only_until_the_first_expiry_plus_the_leeway() -> None:
    hp, trc = b_pair()
    pairs, context = remembered(hp, trc)
    assert context.expires_at == NOW + timedelta(hours=1)  # the HP assertion's
    last = NOW + timedelta(hours=1, seconds=LEEWAY)
    assert lookup(pairs, hp, trc, now=last - timedelta(microseconds=1)) is context
    assert lookup(pairs, hp, trc, now=last) is None  # verify says Expired from here on


def test_a_clock_set_back_before_the_check_is_a_miss() -> None:
    hp, trc = b_pair()
    pairs, _ = remembered(hp, trc)
    assert lookup(pairs, hp, trc, now=NOW - timedelta(seconds=1)) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"audience": "https://another.node.example/fhir"},
        {"tls_country": "DE"},
        {"leeway_s": 60},
    ],
)
def test_another_audience_country_or_leeway_is_a_miss(changes: dict[str, Any]) -> None:
    hp, trc = b_pair()
    pairs, _ = remembered(hp, trc)
    assert lookup(pairs, hp, trc, **changes) is None


def test_keys_that_changed_since_are_a_miss() -> None:
    hp, trc = b_pair()
    pairs, context = remembered(hp, trc)
    later = NOW + timedelta(minutes=5)
    # The peer no longer on the trust list.
    assert lookup(pairs, hp, trc, keys=lambda country: None) is None
    # Its key set without the kid (rotated away).
    rotated = key_set(B, new_key("be-2026-12"))
    assert lookup(pairs, hp, trc, keys=lambda country: rotated) is None
    # The same kid now naming another key.
    swapped = key_set(B, type(B_KEY)(B_KEY.kid, new_key("x").private_key))
    assert lookup(pairs, hp, trc, keys=lambda country: swapped) is None
    # The key withdrawn before now.
    withdrawn = key_set(B, B_KEY, not_after=later - timedelta(seconds=1))
    assert lookup(pairs, hp, trc, keys=lambda country: withdrawn, now=later) is None
    # Another issuer's key set handed over for B.
    foreign: KeySet = key_set("DE", B_KEY)
    assert lookup(pairs, hp, trc, keys=lambda country: foreign) is None
    # Unchanged: still known.
    assert lookup(pairs, hp, trc, now=later) is context


def test_bounded() -> None:
    pairs = VerifiedPairs(max_entries=2)
    tokens = [b_pair() for _ in range(3)]
    for hp, trc in tokens:
        context = check_request_pair(
            hp, trc, tls_country=B, b_keys=b_resolver, audience=A_NODE, now=NOW
        )
        pairs.put(
            hp,
            trc,
            context,
            tls_country=B,
            keys=b_resolver,
            audience=A_NODE,
            checked_at=NOW,
            leeway_s=LEEWAY,
        )
        assert pairs.size <= 2
    assert lookup(pairs, *tokens[-1]) is not None
    off = VerifiedPairs(max_entries=0)
    hp, trc = tokens[0]
    context = check_request_pair(
        hp, trc, tls_country=B, b_keys=b_resolver, audience=A_NODE, now=NOW
    )
    off.put(
        hp,
        trc,
        context,
        tls_country=B,
        keys=b_resolver,
        audience=A_NODE,
        checked_at=NOW,
        leeway_s=LEEWAY,
    )
    assert off.size == 0


# --- through node A ------------------------------------------------------------------------------


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full check of a pair node A runs."""
    calls: list[str] = []
    real = auth.check_request_pair

    def counting(hp: str, trc: str, **options: Any) -> RequestContext:
        calls.append(trc)
        return real(hp, trc, **options)

    monkeypatch.setattr(auth, "check_request_pair", counting)
    return calls


@pytest.fixture()
def http(node_a: RunningNode) -> Iterator[httpx.Client]:
    with node_a.client() as client:
        yield client


def listing(http: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return http.get(
        "/fhir/DocumentReference",
        params={"patient.identifier": f"{node_support.SYSTEM}|PAT100"},
        headers=headers,
    )


def pair_headers(node: RunningNode) -> dict[str, str]:
    hp = node.b.hp_assertion()
    return {"Authorization": f"Bearer {hp}", "NCP-Treatment-Relationship": node.b.trc(hp)}


def test_the_second_request_of_a_pair_is_not_verified_again(
    node_a: RunningNode, http: httpx.Client, counted: list[str]
) -> None:
    headers = pair_headers(node_a)
    first, second = listing(http, headers), listing(http, headers)
    assert first.status_code == second.status_code == 200, second.text
    assert first.json()["total"] == second.json()["total"] > 0
    assert counted == [headers["NCP-Treatment-Relationship"]]
    # Each request is still audited under its own id, with the pair's policies.
    for answer in (first, second):
        [record] = node_a.audit_records(answer.headers["x-request-id"])
        assert record.action == "list-query" and record.patient_id == "PAT100"


def test_a_known_pair_is_refused_once_it_expires(
    node_a: RunningNode, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = pair_headers(node_a)
    assert listing(http, headers).status_code == 200
    later = datetime.now(UTC) + timedelta(hours=3)
    monkeypatch.setattr(node_a.node, "clock", lambda: later)
    answer = listing(http, headers)
    assert answer.status_code == 401, answer.text
    [record] = node_a.audit_records(answer.headers["x-request-id"])
    assert record.action == "refusal" and record.details["rule"] == "Expired"


def test_a_known_pair_is_refused_once_its_peer_is_no_longer_trusted(
    node_a: RunningNode, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = pair_headers(node_a)
    assert listing(http, headers).status_code == 200
    monkeypatch.setattr(node_a.node.trust, "keys_for", lambda country: None)
    answer = listing(http, headers)
    assert answer.status_code == 401, answer.text
    [record] = node_a.audit_records(answer.headers["x-request-id"])
    assert record.action == "refusal" and record.details["rule"] == "KeyNotFound"
