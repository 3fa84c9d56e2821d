"""The one access verifier gateways and the viewer use, and the replay guard behind one-time
viewer launch tokens."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from ncp.security.access import AccessGrant, AccessVerifier
from ncp.security.claims import HP_ASSERTION, IMAGE_ACCESS, TRC, VIEWER_LAUNCH
from ncp.security.replay import MemoryReplayGuard, ReplayGuardFull
from ncp.security.tokens import (
    Expired,
    KeyNotFound,
    PatientMismatch,
    Replayed,
    StudyNotCovered,
    WrongAudience,
    WrongType,
    issue,
)
from tests.support.token_factory import (
    A_KEY,
    A_KEYS,
    GATEWAY,
    NOW,
    OTHER_PATIENT,
    OTHER_STUDY,
    PATIENT,
    STUDY,
    STUDY_2,
    VIEWER,
    A,
    image_claims,
    key_set,
    launch_claims,
    new_key,
)


def gateway(**options: Any) -> AccessVerifier:
    return AccessVerifier(A_KEYS, GATEWAY, A, clock=lambda: NOW, **options)


def viewer(guard: MemoryReplayGuard | None = None) -> AccessVerifier:
    return AccessVerifier(
        A_KEYS,
        VIEWER,
        A,
        MemoryReplayGuard() if guard is None else guard,
        kinds=(VIEWER_LAUNCH,),
        clock=lambda: NOW,
    )


def image_token(**changes: Any) -> str:
    return issue(IMAGE_ACCESS, image_claims(**changes), A_KEY, now=NOW)


def launch_token(**changes: Any) -> str:
    return issue(VIEWER_LAUNCH, launch_claims(**changes), A_KEY, now=NOW)


def test_grant_names_everything_the_gateway_serves_and_audits() -> None:
    claims = image_claims()
    grant = gateway().check(
        issue(IMAGE_ACCESS, claims, A_KEY, now=NOW), study_uid=STUDY, patient=PATIENT
    )
    assert grant == AccessGrant(
        kind=IMAGE_ACCESS,
        patient=PATIENT,
        studies=frozenset({STUDY, STUDY_2}),
        option="A",
        priority="urgent",
        purpose_of_use="TREAT",
        subject="BE-HP-0042",
        requesting_country="BE",
        issuer=A,
        jti=claims.jti,
        expires_at=NOW + timedelta(minutes=5),
    )
    assert grant.audit_policy == f"urn:ietf:params:oauth:jti:{claims.jti}"
    assert grant.covers(STUDY_2) and not grant.covers(OTHER_STUDY)


def test_image_token_serves_many_requests_while_valid() -> None:
    token = image_token()
    check = gateway().check
    for moment in (NOW, NOW + timedelta(minutes=2), NOW + timedelta(minutes=5, seconds=29)):
        for study in (STUDY, STUDY_2, STUDY):
            check(token, study_uid=study, now=moment)
    with pytest.raises(Expired):
        check(token, study_uid=STUDY, now=NOW + timedelta(minutes=6))


def test_search_without_a_study_gets_the_grant_to_filter_by() -> None:
    grant = gateway().check(image_token(), study_uid=None)
    assert grant.studies == {STUDY, STUDY_2}


def test_study_not_named_is_refused_and_says_which() -> None:
    with pytest.raises(StudyNotCovered) as raised:
        gateway().check(image_token(studies=(STUDY,)), study_uid=STUDY_2)
    assert str(raised.value).startswith(
        f"image access token does not cover study '{STUDY_2}'; it names 1 other study"
    )
    assert raised.value.jti is not None


def test_something_that_is_not_a_uid_is_not_covered() -> None:
    with pytest.raises(StudyNotCovered, match=r"not a Study Instance UID"):
        gateway().check(image_token(), study_uid="../../etc")


def test_patient_of_the_study_must_be_the_tokens() -> None:
    with pytest.raises(PatientMismatch):
        gateway().check(image_token(), study_uid=STUDY, patient=OTHER_PATIENT)


def test_option_c_token_is_for_the_edge_gateway_only() -> None:
    edge = "https://edge.at.example/dicomweb"
    token = image_token(audience=edge, option="C")
    assert AccessVerifier(A_KEYS, edge, A).check(token, study_uid=STUDY, now=NOW).option == "C"
    with pytest.raises(WrongAudience):
        gateway().check(token, study_uid=STUDY)


def test_viewer_launch_is_one_time_and_carries_the_language() -> None:
    check = viewer().check
    token = launch_token()
    grant = check(token, study_uid=STUDY, patient=PATIENT)
    assert (grant.option, grant.kind) == ("B", VIEWER_LAUNCH)
    with pytest.raises(Replayed):
        check(token, study_uid=STUDY, patient=PATIENT)


def test_launch_refused_for_another_study_is_not_used_up() -> None:
    check = viewer().check
    token = launch_token()
    with pytest.raises(StudyNotCovered):
        check(token, study_uid=OTHER_STUDY)
    with pytest.raises(PatientMismatch):
        check(token, study_uid=STUDY, patient=OTHER_PATIENT)
    assert check(token, study_uid=STUDY).kind is VIEWER_LAUNCH


def test_replicas_sharing_one_guard_accept_a_launch_once() -> None:
    shared = MemoryReplayGuard()
    token = launch_token()
    viewer(shared).check(token, study_uid=STUDY)
    with pytest.raises(Replayed):
        viewer(shared).check(token, study_uid=STUDY)


def test_viewer_refuses_image_tokens_and_gateway_refuses_launch_tokens() -> None:
    with pytest.raises(WrongType, match="an image access token is not accepted here"):
        viewer().check(image_token(audience=VIEWER), study_uid=STUDY)
    with pytest.raises(WrongType, match="only an image access token"):
        gateway().check(launch_token(audience=GATEWAY), study_uid=STUDY)


def test_a_verifier_accepting_both_kinds_dispatches_on_typ() -> None:
    both = AccessVerifier(
        A_KEYS, GATEWAY, A, MemoryReplayGuard(), kinds=(IMAGE_ACCESS, VIEWER_LAUNCH)
    )
    assert both.check(image_token(), study_uid=STUDY, now=NOW).kind is IMAGE_ACCESS
    launch = launch_token(audience=GATEWAY)
    assert both.check(launch, study_uid=STUDY, now=NOW).kind is VIEWER_LAUNCH
    with pytest.raises(Replayed):
        both.check(launch, study_uid=STUDY, now=NOW)


def test_configured_lifetime_applies_to_image_tokens() -> None:
    token = issue(
        IMAGE_ACCESS,
        image_claims(expires_at=NOW + timedelta(minutes=12)),
        A_KEY,
        now=NOW,
        max_lifetime=timedelta(minutes=15),
    )
    assert gateway(max_lifetime=timedelta(minutes=15)).check(token, study_uid=STUDY)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kinds": (VIEWER_LAUNCH,)}, "needs a ReplayGuard"),
        ({"kinds": (HP_ASSERTION,)}, "grants no access to studies"),
        ({"kinds": (TRC,)}, "grants no access to studies"),
        ({"kinds": ()}, "at least one kind"),
        ({"max_lifetime": timedelta(minutes=20)}, "at most 15 min"),
    ],
)
def test_verifier_refuses_unsafe_settings(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccessVerifier(A_KEYS, GATEWAY, A, **options)


def test_keys_rotate_under_a_running_verifier_through_its_resolver() -> None:
    new = new_key("at-2026-12")
    keys = {"set": A_KEYS}
    verifier = AccessVerifier(lambda issuer: keys["set"], GATEWAY, A, clock=lambda: NOW)
    token = issue(IMAGE_ACCESS, image_claims(), new, now=NOW)
    with pytest.raises(KeyNotFound):
        verifier.check(token, study_uid=STUDY)
    keys["set"] = key_set(A, A_KEY, new)  # the issuer's key set, fetched again
    assert verifier.check(token, study_uid=STUDY).issuer == A


# --- the replay guard ----------------------------------------------------------------------------


def test_guard_answers_false_then_true() -> None:
    guard = MemoryReplayGuard()
    until = NOW + timedelta(seconds=90)
    assert guard.seen_before("j1", until, now=NOW) is False
    assert guard.seen_before("j1", until, now=NOW + timedelta(seconds=10)) is True
    assert guard.seen_before("j2", until, now=NOW) is False


def test_guard_forgets_ids_only_after_they_expire() -> None:
    guard = MemoryReplayGuard()
    guard.seen_before("j1", NOW + timedelta(seconds=90), now=NOW)
    guard.seen_before("j2", NOW + timedelta(seconds=30), now=NOW)
    assert not guard.seen_before("j3", NOW + timedelta(seconds=90), now=NOW + timedelta(seconds=60))
    assert guard.size == 2  # j2 went, j1 and j3 stay
    assert guard.seen_before("j1", NOW + timedelta(seconds=90), now=NOW + timedelta(seconds=89))


def test_guard_refuses_rather_than_forgets_when_full() -> None:
    guard = MemoryReplayGuard(max_entries=2)
    until = NOW + timedelta(seconds=90)
    guard.seen_before("j1", until, now=NOW)
    guard.seen_before("j2", until, now=NOW)
    with pytest.raises(ReplayGuardFull, match="refusing rather than forgetting"):
        guard.seen_before("j3", until, now=NOW)
    assert guard.seen_before("j1", until, now=NOW) is True
    assert guard.seen_before("j3", until, now=NOW + timedelta(seconds=91)) is False


def test_guard_lets_exactly_one_of_concurrent_uses_through() -> None:
    guard = MemoryReplayGuard()
    results: list[bool] = []
    start = threading.Barrier(8)

    def use() -> None:
        start.wait()
        results.append(guard.seen_before("same", NOW + timedelta(seconds=60), now=NOW))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] + [True] * 7
