"""The HP assertion and TRC pair A checks on every patient-level request, and the access tokens
issued (and renewed) under it, through to the gateway."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ncp.security.access import AccessVerifier
from ncp.security.claims import HP_ASSERTION, IMAGE_ACCESS, TRC, VIEWER_LAUNCH
from ncp.security.pair import (
    CountryMismatch,
    NotBound,
    RequestContext,
    check_request_pair,
    image_access_for,
    viewer_launch_for,
)
from ncp.security.replay import MemoryReplayGuard
from ncp.security.tokens import (
    BadSignature,
    Expired,
    KeyNotFound,
    PatientMismatch,
    WrongAudience,
    WrongIssuer,
    WrongType,
    issue,
)
from tests.support.token_factory import (
    A_KEY,
    A_KEYS,
    A_NODE,
    B_KEY,
    B_KEYS,
    GATEWAY,
    HP_ID,
    NOW,
    OTHER,
    OTHER_KEY,
    OTHER_PATIENT,
    PATIENT,
    STUDY,
    STUDY_2,
    VIEWER,
    A,
    B,
    b_resolver,
    hp_claims,
    new_key,
    trc_claims,
)


def b_pair(**trc_changes: Any) -> tuple[str, str]:
    hp = issue(HP_ASSERTION, hp_claims(), B_KEY, now=NOW)
    return hp, issue(TRC, trc_claims(hp, **trc_changes), B_KEY, now=NOW)


def check(hp: str, trc: str, **options: Any) -> RequestContext:
    defaults: dict[str, Any] = {
        "tls_country": B,
        "b_keys": b_resolver,
        "audience": A_NODE,
        "now": NOW,
    }
    return check_request_pair(hp, trc, **{**defaults, **options})


def test_a_valid_pair_gives_the_request_context() -> None:
    context = check(*b_pair())
    assert context.country == B
    assert context.patient == PATIENT
    assert context.purpose_of_use == "TREAT"
    assert context.subject == HP_ID
    assert context.hp.subject_name == "Dr. Anne Peeters"
    assert context.expires_at == NOW + timedelta(hours=1)  # the HP assertion expires first
    assert all(p.startswith("urn:ietf:params:oauth:jti:") for p in context.audit_policies)


def test_keys_may_be_given_as_the_peers_key_set() -> None:
    assert check(*b_pair(), b_keys=B_KEYS).country == B


def test_caller_compares_the_requested_patient() -> None:
    context = check(*b_pair())
    context.require_patient(PATIENT)
    with pytest.raises(
        PatientMismatch, match=r"is for patient PAT200 .*the request is about PAT201"
    ):
        context.require_patient(OTHER_PATIENT)


def test_assertions_from_another_country_than_the_tls_peer_are_refused() -> None:
    # DE's node signs a perfectly valid pair with its own key, but the TLS peer is BE.
    hp = issue(HP_ASSERTION, hp_claims(issuer=OTHER), OTHER_KEY, now=NOW)
    trc = issue(TRC, trc_claims(hp, issuer=OTHER), OTHER_KEY, now=NOW)
    assert check(hp, trc, tls_country=OTHER).country == OTHER
    with pytest.raises(CountryMismatch, match="issued by 'DE', but the TLS peer is 'BE'"):
        check(hp, trc, tls_country=B)


def test_a_trc_from_another_country_is_refused_even_with_a_good_hp_assertion() -> None:
    hp, _ = b_pair()
    foreign = issue(TRC, trc_claims(hp, issuer=OTHER), OTHER_KEY, now=NOW)
    with pytest.raises(CountryMismatch, match="treatment relationship confirmation issued by"):
        check(hp, foreign)


def test_a_country_mismatch_is_a_wrong_issuer() -> None:
    assert issubclass(CountryMismatch, WrongIssuer)


def test_an_assertion_claiming_the_peers_country_but_signed_by_another_is_refused() -> None:
    forged = issue(HP_ASSERTION, hp_claims(), OTHER_KEY, now=NOW)  # iss BE, DE's key
    _, trc = b_pair()
    with pytest.raises(KeyNotFound, match="no key 'de-2026-11' among the keys of issuer 'BE'"):
        check(forged, trc)


def test_trc_issued_under_another_hp_assertion_is_refused() -> None:
    hp, _ = b_pair()
    other_hp = issue(HP_ASSERTION, hp_claims(), B_KEY, now=NOW)  # same HP, another assertion
    trc = issue(TRC, trc_claims(other_hp), B_KEY, now=NOW)
    with pytest.raises(NotBound, match="issued under another HP assertion"):
        check(hp, trc)


def test_trc_for_another_hp_is_refused() -> None:
    hp, trc = b_pair(subject="BE-HP-0099")
    with pytest.raises(NotBound, match="is for HP 'BE-HP-0099', the HP assertion for"):
        check(hp, trc)


def test_swapped_pair_is_refused() -> None:
    hp, trc = b_pair()
    with pytest.raises(WrongType):
        check(trc, hp)


def test_missing_or_broken_hp_assertion_is_refused() -> None:
    hp, trc = b_pair()
    with pytest.raises(BadSignature):
        check(hp[:-4] + ("AAAA" if not hp.endswith("AAAA") else "BBBB"), trc)


def test_pair_addressed_to_another_node_is_refused() -> None:
    hp, trc = b_pair(audience="https://ncp.de.example/fhir")
    with pytest.raises(WrongAudience, match="treatment relationship confirmation is for"):
        check(hp, trc)


def test_expired_trc_is_refused_even_if_the_hp_assertion_is_valid() -> None:
    hp = issue(HP_ASSERTION, hp_claims(NOW), B_KEY, now=NOW)
    trc = issue(TRC, trc_claims(hp, expires_at=NOW + timedelta(minutes=10)), B_KEY, now=NOW)
    with pytest.raises(Expired, match="treatment relationship confirmation expired"):
        check(hp, trc, now=NOW + timedelta(minutes=11))


def test_emergency_without_informing_the_patient_passes() -> None:
    context = check(*b_pair(purpose_of_use="ETREAT", informed=False))
    assert (context.purpose_of_use, context.trc.informed) == ("ETREAT", False)


def test_peer_whose_keys_are_not_in_the_trust_list_is_refused() -> None:
    fr_key = new_key("fr-1")
    hp = issue(HP_ASSERTION, hp_claims(issuer="FR"), fr_key, now=NOW)
    trc = issue(TRC, trc_claims(hp, issuer="FR"), fr_key, now=NOW)
    with pytest.raises(KeyNotFound, match="no keys are known for issuer 'FR'"):
        check(hp, trc, tls_country="FR")


# --- tokens issued under the pair ----------------------------------------------------------------


def test_end_to_end_b_asks_a_issues_the_gateway_serves() -> None:
    hp, trc = b_pair()
    context = check(hp, trc)
    claims = image_access_for(
        context, issuer=A, audience=GATEWAY, studies=[STUDY, STUDY_2], option="A", now=NOW
    )
    token = issue(IMAGE_ACCESS, claims, A_KEY, now=NOW)
    grant = AccessVerifier(A_KEYS, GATEWAY, A).check(
        token, study_uid=STUDY_2, patient=PATIENT, now=NOW + timedelta(minutes=1)
    )
    assert (grant.subject, grant.requesting_country, grant.purpose_of_use) == (HP_ID, B, "TREAT")
    assert grant.expires_at == NOW + timedelta(minutes=5)


def test_renewal_issues_a_fresh_token_while_the_pair_is_valid() -> None:
    hp, trc = b_pair()
    tokens = []
    # A large study: B renews every 4 minutes with the same pair, for 50 minutes.
    for minute in range(0, 50, 4):
        moment = NOW + timedelta(minutes=minute)
        context = check(hp, trc, now=moment)
        claims = image_access_for(
            context, issuer=A, audience=GATEWAY, studies=[STUDY], option="A", now=moment
        )
        tokens.append(issue(IMAGE_ACCESS, claims, A_KEY, now=moment))
        AccessVerifier(A_KEYS, GATEWAY, A).check(tokens[-1], study_uid=STUDY, now=moment)
    assert len(set(tokens)) == len(tokens)
    with pytest.raises(Expired):  # the HP assertion has run out: no more renewals
        check(hp, trc, now=NOW + timedelta(hours=1, minutes=1))


def test_a_token_never_outlives_the_pair_it_was_issued_under() -> None:
    hp, trc = b_pair()
    near_end = NOW + timedelta(minutes=58)
    context = check(hp, trc, now=near_end)
    claims = image_access_for(
        context, issuer=A, audience=GATEWAY, studies=[STUDY], option="A", now=near_end
    )
    assert claims.expires_at == NOW + timedelta(hours=1)
    with pytest.raises(Expired, match="B must renew them before asking again"):
        image_access_for(
            context, issuer=A, audience=GATEWAY, studies=[STUDY], option="A", now=claims.expires_at
        )


def test_viewer_launch_under_the_pair_speaks_the_hps_language_once() -> None:
    context = check(*b_pair())
    claims = viewer_launch_for(context, issuer=A, audience=VIEWER, studies=[STUDY], now=NOW)
    assert claims.preferred_language == "nl-BE"
    assert claims.expires_at == NOW + timedelta(seconds=60)
    token = issue(VIEWER_LAUNCH, claims, A_KEY, now=NOW)
    viewer = AccessVerifier(A_KEYS, VIEWER, A, MemoryReplayGuard(), kinds=(VIEWER_LAUNCH,))
    assert viewer.check(token, study_uid=STUDY, now=NOW).option == "B"
