"""Issuing and verifying the four kinds of signed object: round trips, the claim rules of each
kind, time and lifetime limits, key resolution and key rotation. Attacks: test_token_attacks.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ncp.security.claims import (
    HP_ASSERTION,
    IMAGE_ACCESS,
    KINDS,
    MAX_STUDIES,
    MAX_TEXT,
    PURPOSE_OF_USE_SYSTEM,
    TRC,
    VIEWER_LAUNCH,
    ClaimProblem,
    Coding,
    PatientRef,
    TokenKind,
    kind_for_typ,
)
from ncp.security.keys import KeySet, SigningKey
from ncp.security.tokens import (
    MAX_TOKEN_CHARS,
    Expired,
    InvalidClaim,
    KeyNotFound,
    KeyWithdrawn,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    issue,
    token_hash,
    token_kind,
    verify,
)
from tests.support.token_factory import (
    A_KEY,
    A_KEYS,
    A_NODE,
    B_KEY,
    B_KEYS,
    GATEWAY,
    HP_TOKEN,
    NOW,
    OTHER,
    OTHER_KEYS,
    VIEWER,
    A,
    B,
    b_resolver,
    check,
    header_for,
    hp_claims,
    image_claims,
    key_set,
    launch_claims,
    new_key,
    parts,
    sample,
    sign_raw,
    trc_claims,
)

# --- round trips and form ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.typ)
def test_each_kind_round_trips_to_equal_claims(kind: TokenKind[Any]) -> None:
    claims, key, *_ = sample(kind)
    assert check(kind, issue(kind, claims, key, now=NOW)) == claims


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.typ)
def test_header_is_alg_kid_and_the_kinds_typ(kind: TokenKind[Any]) -> None:
    claims, key, *_ = sample(kind)
    header, _, _ = parts(issue(kind, claims, key, now=NOW))
    assert header == {"alg": "ES256", "kid": key.kid, "typ": kind.typ}


def test_typ_values_are_distinct_and_explicit() -> None:
    typs = [kind.typ for kind in KINDS]
    assert typs == ["hp-assertion+jwt", "trc+jwt", "image-access+jwt", "viewer-launch+jwt"]
    assert all(kind_for_typ(t) is k for t, k in zip(typs, KINDS, strict=True))


def test_hp_assertion_wraps_iua_claims_in_extensions() -> None:
    _, payload, _ = parts(HP_TOKEN)
    iua = payload["extensions"]["ihe_iua"]
    assert iua["subject_name"] == "Dr. Anne Peeters"
    assert iua["subject_organization_id"] == "urn:oid:2.16.56.1.1.1.1"
    assert iua["subject_role"] == [
        {
            "system": "urn:oid:2.16.840.1.113883.2.9.6.2.7",
            "code": "221",
            "display": "Medical doctors",
        }
    ]
    assert payload["iss"] == B and payload["locale"] == "nl-BE"
    assert payload["exp"] - payload["iat"] == 3600


def test_image_token_payload_names_patient_studies_option_priority_purpose() -> None:
    _, payload, _ = parts(issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW))
    assert payload["ncp_patient"] == {"system": "urn:oid:1.2.40.0.10.1.4.3.1", "value": "PAT200"}
    assert payload["ncp_studies"] == ["1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"]
    assert (payload["ncp_option"], payload["ncp_priority"]) == ("A", "urgent")
    assert payload["extensions"]["ihe_iua"]["purpose_of_use"] == [
        {"system": PURPOSE_OF_USE_SYSTEM, "code": "TREAT"}
    ]
    assert payload["ncp_requesting_country"] == B and payload["sub"] == "BE-HP-0042"


def test_trc_is_bound_to_the_hp_assertion_by_its_hash() -> None:
    trc = check(TRC, issue(TRC, trc_claims(HP_TOKEN), B_KEY, now=NOW))
    assert trc.hp_assertion_hash == token_hash(HP_TOKEN)
    assert len(token_hash(HP_TOKEN)) == 43  # SHA-256, base64url without padding


def test_a_standard_jwt_library_reads_our_tokens() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    decoded = jwt.decode(
        token,
        A_KEY.private_key.public_key(),
        algorithms=["ES256"],
        audience=GATEWAY,
        issuer=A,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert decoded["ncp_studies"][0] == "1.2.826.0.1.3680043.10.1.1"


def test_token_kind_reads_the_typ_header() -> None:
    assert token_kind(HP_TOKEN) is HP_ASSERTION


@pytest.mark.parametrize("typ", ["application/hp-assertion+jwt", "HP-Assertion+JWT"])
def test_typ_is_compared_as_rfc_7515_says(typ: str) -> None:
    token = sign_raw(header_for(typ, B_KEY), hp_claims().to_payload(), B_KEY)
    assert check(HP_ASSERTION, token).subject == "BE-HP-0042"


def test_audience_as_a_list_of_one_is_that_audience() -> None:
    payload = {**hp_claims().to_payload(), "aud": [A_NODE]}
    token = sign_raw(header_for("hp-assertion+jwt", B_KEY), payload, B_KEY)
    assert check(HP_ASSERTION, token).audience == A_NODE


def test_audience_list_of_several_recipients_is_refused() -> None:
    payload = {**hp_claims().to_payload(), "aud": [A_NODE, "https://other.example"]}
    token = sign_raw(header_for("hp-assertion+jwt", B_KEY), payload, B_KEY)
    with pytest.raises(WrongAudience, match="names 2 audiences"):
        check(HP_ASSERTION, token)


def test_purpose_and_role_read_as_a_single_coding_too() -> None:
    payload = hp_claims().to_payload()
    payload["extensions"]["ihe_iua"]["subject_role"] = {"system": "urn:x", "code": "221"}
    token = sign_raw(header_for("hp-assertion+jwt", B_KEY), payload, B_KEY)
    assert check(HP_ASSERTION, token).subject_role == Coding("urn:x", "221")


def test_several_purposes_are_refused_as_ambiguous() -> None:
    payload = trc_claims(HP_TOKEN).to_payload()
    coding = {"system": PURPOSE_OF_USE_SYSTEM, "code": "TREAT"}
    payload["extensions"]["ihe_iua"]["purpose_of_use"] = [coding, coding]
    token = sign_raw(header_for("trc+jwt", B_KEY), payload, B_KEY)
    with pytest.raises(InvalidClaim, match="exactly one Coding"):
        check(TRC, token)


def test_not_before_is_kept_when_given() -> None:
    claims = image_claims(not_before=NOW + timedelta(seconds=10))
    token = issue(IMAGE_ACCESS, claims, A_KEY, now=NOW)
    assert parts(token)[1]["nbf"] == parts(token)[1]["iat"] + 10
    assert check(IMAGE_ACCESS, token, now=NOW + timedelta(seconds=20)) == claims


# --- time ----------------------------------------------------------------------------------------


def test_expiry_is_exp_plus_leeway_to_the_second() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    exp = NOW + timedelta(minutes=5)
    check(IMAGE_ACCESS, token, now=exp + timedelta(seconds=29))
    with pytest.raises(Expired, match=r"expired at 2026-11-22T10:05:00Z .*leeway 30 s"):
        check(IMAGE_ACCESS, token, now=exp + timedelta(seconds=30))
    with pytest.raises(Expired):
        check(IMAGE_ACCESS, token, now=exp, leeway_s=0)


def test_not_before_is_honoured_with_the_leeway() -> None:
    claims = image_claims(not_before=NOW + timedelta(seconds=100))
    token = issue(IMAGE_ACCESS, claims, A_KEY, now=NOW)
    check(IMAGE_ACCESS, token, now=NOW + timedelta(seconds=70))
    with pytest.raises(NotYetValid, match="valid from 2026-11-22T10:01:40Z"):
        check(IMAGE_ACCESS, token, now=NOW + timedelta(seconds=69))


def test_leeway_and_now_are_checked() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    with pytest.raises(ValueError, match="leeway_s"):
        check(IMAGE_ACCESS, token, leeway_s=600)
    with pytest.raises(ValueError, match="aware"):
        check(IMAGE_ACCESS, token, now=datetime(2026, 11, 22, 10, 0))


def test_image_token_longer_than_the_limit_is_refused_unless_configured() -> None:
    claims = image_claims(expires_at=NOW + timedelta(minutes=10))
    token = issue(IMAGE_ACCESS, claims, A_KEY, now=NOW, max_lifetime=timedelta(minutes=15))
    with pytest.raises(InvalidClaim, match="lives 10 min, longer than the 5 min allowed"):
        check(IMAGE_ACCESS, token)
    assert check(IMAGE_ACCESS, token, max_lifetime=timedelta(minutes=15)) == claims


def test_image_token_limit_cannot_be_configured_past_15_minutes() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    with pytest.raises(ValueError, match="at most 15 min"):
        check(IMAGE_ACCESS, token, max_lifetime=timedelta(minutes=20))


def test_one_time_kind_cannot_be_verified_without_a_replay_guard() -> None:
    token = issue(VIEWER_LAUNCH, launch_claims(), A_KEY, now=NOW)
    with pytest.raises(ValueError, match="one-time"):
        verify(VIEWER_LAUNCH, token, A_KEYS, audience=VIEWER, issuer=A, now=NOW)


# --- issuing is strict ---------------------------------------------------------------------------


def test_issue_refuses_claims_of_another_kind() -> None:
    with pytest.raises(TypeError, match="needs ImageAccess claims"):
        issue(IMAGE_ACCESS, launch_claims(), A_KEY, now=NOW)


def test_issue_refuses_what_a_verifier_would_refuse() -> None:
    long = image_claims(expires_at=NOW + timedelta(minutes=10))
    with pytest.raises(ClaimProblem, match="at most 5 min"):
        issue(IMAGE_ACCESS, long, A_KEY, now=NOW)
    with pytest.raises(ClaimProblem, match="already passed"):
        issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW + timedelta(minutes=6))
    with pytest.raises(ClaimProblem, match="after the time of issue"):
        issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW - timedelta(minutes=1))


def test_issue_refuses_a_key_that_is_not_p256() -> None:
    p384 = SigningKey("p384", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError, match="not an EC P-256 key"):
        issue(IMAGE_ACCESS, image_claims(), p384, now=NOW)


@pytest.mark.parametrize(
    ("build", "claim"),
    [
        (lambda: image_claims(purpose_of_use="RESEARCH"), "purpose_of_use"),
        (lambda: image_claims(option="D"), "ncp_option"),
        (lambda: image_claims(priority="whenever"), "ncp_priority"),
        (lambda: image_claims(studies=()), "ncp_studies"),
        (lambda: image_claims(studies=("1.2..3",)), "ncp_studies"),
        (lambda: image_claims(studies=("1.2.3", "1.2.3")), "ncp_studies"),
        (lambda: image_claims(studies=["1.2.3"]), "ncp_studies"),
        (lambda: image_claims(studies=tuple(f"1.2.{i}" for i in range(51))), "ncp_studies"),
        (lambda: image_claims(requesting_country="be"), "ncp_requesting_country"),
        (lambda: image_claims(issuer="https://ncp.at.example"), "iss"),
        (lambda: image_claims(subject=" "), "sub"),
        (lambda: image_claims(audience="x" * (MAX_TEXT + 1)), "aud"),
        (lambda: image_claims(patient=PatientRef("", "PAT200")), "ncp_patient.system"),
        (lambda: image_claims(expires_at=NOW), "exp"),
        (lambda: image_claims(expires_at=NOW + timedelta(minutes=16)), "exp"),
        (lambda: image_claims(issued_at=datetime(2026, 11, 22, 10, 0)), "iat"),
        (lambda: image_claims(not_before=NOW + timedelta(minutes=6)), "nbf"),
        (lambda: image_claims(jti=""), "jti"),
        (lambda: launch_claims(expires_at=NOW + timedelta(seconds=61)), "exp"),
        (lambda: launch_claims(preferred_language="not a tag"), "locale"),
        (lambda: hp_claims(expires_at=NOW + timedelta(hours=2, seconds=1)), "exp"),
        (lambda: hp_claims(subject_role=Coding("", "221")), "subject_role.system"),
        (lambda: trc_claims(HP_TOKEN, informed=False), "ncp_informed"),
        (lambda: trc_claims(HP_TOKEN, purpose_of_use="TREATMENT"), "purpose_of_use"),
        (lambda: trc_claims(HP_TOKEN, expires_at=NOW + timedelta(hours=3)), "exp"),
    ],
)
def test_a_claim_set_breaking_a_rule_cannot_be_built(build: Any, claim: str) -> None:
    with pytest.raises(ClaimProblem) as raised:
        build()
    assert raised.value.claim.endswith(claim)
    assert claim in str(raised.value)


def test_emergency_may_go_ahead_before_the_patient_is_informed() -> None:
    claims = trc_claims(HP_TOKEN, purpose_of_use="ETREAT", informed=False)
    assert check(TRC, issue(TRC, claims, B_KEY, now=NOW)).informed is False


def test_the_largest_token_allowed_stays_under_the_size_limit() -> None:
    text = "x" * MAX_TEXT
    uids = tuple(f"1.2.{i:03d}." + "9" * 56 for i in range(MAX_STUDIES))
    assert all(len(u) == 64 for u in uids)
    claims = image_claims(
        audience=text,
        subject=text,
        jti="j" * 128,
        patient=PatientRef(text, text),
        studies=uids,
        priority="routine",
    )
    token = issue(IMAGE_ACCESS, claims, SigningKey("k" * 256, A_KEY.private_key), now=NOW)
    assert len(token) < MAX_TOKEN_CHARS, len(token)


# --- issuers and keys ----------------------------------------------------------------------------


def test_keys_can_come_from_a_resolver_by_issuer() -> None:
    claims = verify(HP_ASSERTION, HP_TOKEN, b_resolver, audience=A_NODE, issuer=[B, OTHER], now=NOW)
    assert claims.country == B


def test_resolver_without_keys_for_the_issuer_gives_key_not_found() -> None:
    with pytest.raises(KeyNotFound, match="no keys are known for issuer 'BE'"):
        verify(HP_ASSERTION, HP_TOKEN, lambda _: None, audience=A_NODE, issuer=B, now=NOW)


def test_keys_of_another_issuer_never_verify() -> None:
    with pytest.raises(WrongIssuer, match="cannot be verified with the keys of 'DE'"):
        verify(HP_ASSERTION, HP_TOKEN, OTHER_KEYS, audience=A_NODE, issuer=B, now=NOW)


def test_unknown_kid_names_kid_and_issuer_so_the_caller_can_refresh_once() -> None:
    new = new_key("be-2026-12")
    token = issue(HP_ASSERTION, hp_claims(), new, now=NOW)
    published = {"keys": B_KEYS}

    def resolver(issuer: str) -> KeySet:
        return published["keys"]

    with pytest.raises(KeyNotFound) as raised:
        verify(HP_ASSERTION, token, resolver, audience=A_NODE, issuer=B, now=NOW)
    assert (raised.value.kid, raised.value.issuer) == ("be-2026-12", B)
    assert "refresh its key set once" in str(raised.value)
    published["keys"] = key_set(B, B_KEY, new)  # the JWKS, fetched again
    assert verify(HP_ASSERTION, token, resolver, audience=A_NODE, issuer=B, now=NOW).issuer == B


# --- key rotation --------------------------------------------------------------------------------


def test_tokens_signed_before_a_rotation_keep_working_until_they_expire() -> None:
    old, new = A_KEY, new_key("at-2026-12")
    before = issue(IMAGE_ACCESS, image_claims(), old, now=NOW)
    rotated_at = NOW + timedelta(minutes=1)
    # The old key stays published until every token it signed has expired (max lifetime 15 min).
    keys = KeySet(
        A,
        {
            **key_set(A, new).keys,
            **key_set(A, old, not_after=rotated_at + timedelta(minutes=15)).keys,
        },
    )
    after = issue(IMAGE_ACCESS, image_claims(rotated_at), new, now=rotated_at)
    for moment in (rotated_at, NOW + timedelta(minutes=5, seconds=29)):
        verify(IMAGE_ACCESS, before, keys, audience=GATEWAY, issuer=A, now=moment)
    verify(IMAGE_ACCESS, after, keys, audience=GATEWAY, issuer=A, now=rotated_at)
    with pytest.raises(Expired):
        verify(
            IMAGE_ACCESS, before, keys, audience=GATEWAY, issuer=A, now=NOW + timedelta(minutes=6)
        )


def test_after_the_old_key_is_withdrawn_its_tokens_are_refused() -> None:
    old, new = A_KEY, new_key("at-2026-12")
    before = issue(IMAGE_ACCESS, image_claims(), old, now=NOW)
    with pytest.raises(KeyNotFound, match="no key 'at-2026-11'"):
        verify(IMAGE_ACCESS, before, key_set(A, new), audience=GATEWAY, issuer=A, now=NOW)


def test_a_key_past_its_not_after_verifies_nothing() -> None:
    before = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    keys = key_set(A, A_KEY, not_after=NOW + timedelta(minutes=1))
    verify(IMAGE_ACCESS, before, keys, audience=GATEWAY, issuer=A, now=NOW + timedelta(minutes=1))
    with pytest.raises(KeyWithdrawn, match="withdrawn at 2026-11-22T10:01:00Z"):
        verify(
            IMAGE_ACCESS, before, keys, audience=GATEWAY, issuer=A, now=NOW + timedelta(minutes=2)
        )


# --- errors for audit ----------------------------------------------------------------------------


def test_errors_after_the_signature_carry_the_jti_for_audit() -> None:
    claims = image_claims()
    token = issue(IMAGE_ACCESS, claims, A_KEY, now=NOW)
    with pytest.raises(Expired) as raised:
        check(IMAGE_ACCESS, token, now=NOW + timedelta(hours=1))
    assert raised.value.jti == claims.jti
    assert raised.value.audit_policy == f"urn:ietf:params:oauth:jti:{claims.jti}"
    assert str(raised.value).endswith(f"[jti {claims.jti}]")


def test_errors_before_the_signature_quote_no_jti() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    with pytest.raises(WrongIssuer) as raised:
        verify(IMAGE_ACCESS, token, A_KEYS, audience=GATEWAY, issuer=B, now=NOW)
    assert raised.value.jti is None and raised.value.audit_policy is None


def test_claims_audit_policy_is_the_balp_form() -> None:
    claims = dataclasses.replace(image_claims(), jti="abc")
    assert claims.audit_policy == "urn:ietf:params:oauth:jti:abc"


def test_now_in_another_zone_is_the_same_instant() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), A_KEY, now=NOW)
    vienna = NOW.astimezone(datetime.now(UTC).astimezone().tzinfo)
    assert check(IMAGE_ACCESS, token, now=vienna).patient.value == "PAT200"
