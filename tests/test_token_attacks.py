"""The attack suite: each attack on an assertion or token is refused with its own error type and
a message that says what was wrong. Hypothesis then generates claim sets, headers and changes to
tokens: only well-formed, in-time, correctly signed tokens of the right kind pass."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ncp.security.access import AccessVerifier
from ncp.security.claims import (
    HP_ASSERTION,
    IMAGE_ACCESS,
    KINDS,
    TRC,
    VIEWER_LAUNCH,
    TokenKind,
)
from ncp.security.keys import KeySet, PublicKey
from ncp.security.replay import MemoryReplayGuard
from ncp.security.tokens import (
    MAX_TOKEN_CHARS,
    AlgorithmNotAllowed,
    BadSignature,
    Expired,
    InvalidClaim,
    KeyNotFound,
    Malformed,
    NotYetValid,
    PatientMismatch,
    Replayed,
    StudyNotCovered,
    TokenError,
    TooLarge,
    WrongAudience,
    WrongIssuer,
    WrongType,
    issue,
    verify,
)
from tests.support.token_factory import (
    A_KEY,
    A_KEYS,
    B_KEY,
    GATEWAY,
    HP_TOKEN,
    NOW,
    OTHER_PATIENT,
    OTHER_STUDY,
    PATIENT,
    STUDY,
    VIEWER,
    A,
    b64,
    check,
    encode_json,
    es256,
    header_for,
    hp_claims,
    image_claims,
    launch_claims,
    new_key,
    parts,
    sample,
    sign_raw,
    trc_claims,
    unb64,
)

IMAGE_TYP = "image-access+jwt"


def image_token(**changes: Any) -> str:
    return issue(IMAGE_ACCESS, image_claims(**changes), A_KEY, now=NOW)


def gateway(**options: Any) -> AccessVerifier:
    return AccessVerifier(A_KEYS, GATEWAY, A, clock=lambda: NOW, **options)


def verify_image(token: str, **options: Any) -> Any:
    defaults: dict[str, Any] = {"audience": GATEWAY, "issuer": A, "now": NOW}
    return verify(IMAGE_ACCESS, token, A_KEYS, **{**defaults, **options})


def hand_built(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(encode_json(header))}.{b64(encode_json(payload))}.{b64(signature)}"


# --- time, audience, issuer, key -----------------------------------------------------------------


def test_expired_token_is_refused() -> None:
    token = image_token()
    with pytest.raises(Expired, match="image access token expired at 2026-11-22T10:05:00Z"):
        verify_image(token, now=NOW + timedelta(minutes=6))


def test_expired_assertion_is_refused() -> None:
    with pytest.raises(Expired, match="HP identity assertion expired"):
        check(HP_ASSERTION, HP_TOKEN, now=NOW + timedelta(hours=1, minutes=1))


def test_not_yet_valid_token_is_refused() -> None:
    token = image_token(not_before=NOW + timedelta(minutes=2))
    with pytest.raises(NotYetValid, match="valid from 2026-11-22T10:02:00Z only"):
        verify_image(token)


def test_token_issued_in_the_future_is_refused() -> None:
    later = NOW + timedelta(minutes=2)
    token = issue(IMAGE_ACCESS, image_claims(later), A_KEY, now=later)
    with pytest.raises(NotYetValid, match=r"in the future .*issuer's clock is wrong"):
        verify_image(token)


def test_wrong_audience_is_refused() -> None:
    token = image_token(audience="https://gw.other.example/dicomweb")
    with pytest.raises(
        WrongAudience, match=re.escape("is for 'https://gw.other.example/dicomweb', not")
    ):
        verify_image(token)


@pytest.mark.parametrize(
    "audience",
    [
        GATEWAY[:-1],  # a prefix of the right one
        GATEWAY + "-test",  # the right one with a suffix
        GATEWAY + "/",
        GATEWAY.upper(),
        "gw.at.example",  # a substring
    ],
    ids=["prefix", "suffix", "trailing-slash", "case", "substring"],
)
def test_audience_close_to_the_right_one_is_refused(audience: str) -> None:
    with pytest.raises(WrongAudience, match="image access token is for"):
        verify_image(image_token(audience=audience))


def test_wrong_issuer_is_refused() -> None:
    # Signed by A's key, but claiming to be from another country's node.
    token = sign_raw(
        header_for(IMAGE_TYP, A_KEY), {**image_claims().to_payload(), "iss": "DE"}, A_KEY
    )
    with pytest.raises(WrongIssuer, match="issued by 'DE', not by 'AT'"):
        verify_image(token)


def test_assertion_from_another_issuer_is_refused() -> None:
    with pytest.raises(WrongIssuer, match="HP identity assertion issued by 'BE', not by 'DE'"):
        verify(HP_ASSERTION, HP_TOKEN, A_KEYS, audience=GATEWAY, issuer="DE", now=NOW)


def test_unknown_kid_is_refused() -> None:
    token = issue(IMAGE_ACCESS, image_claims(), new_key("at-forged"), now=NOW)
    with pytest.raises(KeyNotFound, match="no key 'at-forged' among the keys of issuer 'AT'"):
        verify_image(token)


def test_known_kid_with_another_key_is_a_bad_signature() -> None:
    impostor = replace(new_key("x"), kid=A_KEY.kid)
    with pytest.raises(BadSignature, match="does not verify with key 'at-2026-11'"):
        verify_image(issue(IMAGE_ACCESS, image_claims(), impostor, now=NOW))


# --- tampering -----------------------------------------------------------------------------------


def test_tampered_payload_is_refused() -> None:
    head, body, signature = image_token().split(".")
    payload = json.loads(unb64(body))
    payload["ncp_studies"].append(OTHER_STUDY)
    with pytest.raises(BadSignature, match="altered or signed with another key"):
        verify_image(f"{head}.{b64(encode_json(payload))}.{signature}")


def test_tampered_header_is_refused() -> None:
    head, body, signature = image_token().split(".")
    header = {**json.loads(unb64(head)), "x-extra": 1}
    with pytest.raises(BadSignature):
        verify_image(f"{b64(encode_json(header))}.{body}.{signature}")


def test_tampered_assertion_is_refused() -> None:
    head, body, signature = HP_TOKEN.split(".")
    payload = json.loads(unb64(body))
    payload["extensions"]["ihe_iua"]["subject_role"][0]["code"] = "2221"
    with pytest.raises(BadSignature):
        check(HP_ASSERTION, f"{head}.{b64(encode_json(payload))}.{signature}")


def test_signature_of_the_wrong_length_is_refused() -> None:
    head, body, signature = image_token().split(".")
    with pytest.raises(BadSignature, match=r"64 bytes .* this one is 63"):
        verify_image(f"{head}.{body}.{b64(unb64(signature)[:63])}")


# --- algorithms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = hand_built(
        {"alg": alg, "typ": IMAGE_TYP, "kid": A_KEY.kid}, image_claims().to_payload()
    )
    assert token.endswith(".")
    with pytest.raises(AlgorithmNotAllowed, match="unsigned tokens are never accepted"):
        verify_image(token)


def _hs256_with(secret: bytes) -> str:
    header = {"alg": "HS256", "typ": IMAGE_TYP, "kid": A_KEY.kid}
    signing_input = f"{b64(encode_json(header))}.{b64(encode_json(image_claims().to_payload()))}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def test_hs256_signed_with_the_public_key_pem_is_refused() -> None:
    pem = A_KEY.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(AlgorithmNotAllowed, match="'HS256' is not allowed: only ES256"):
        verify_image(_hs256_with(pem))


def test_hs256_signed_with_the_public_jwk_is_refused() -> None:
    numbers = A_KEY.private_key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }
    with pytest.raises(AlgorithmNotAllowed, match="HS256"):
        verify_image(_hs256_with(json.dumps(jwk).encode()))


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES384", "ES512", "EdDSA", "es256", "ES256 "])
def test_other_algorithms_are_refused(alg: str) -> None:
    # Correctly ES256-signed over a header that names another algorithm.
    token = sign_raw(
        {**header_for(IMAGE_TYP, A_KEY), "alg": alg}, image_claims().to_payload(), A_KEY
    )
    with pytest.raises(AlgorithmNotAllowed, match=f"alg '{alg}' is not allowed"):
        verify_image(token)


def test_missing_alg_is_refused() -> None:
    token = sign_raw({"typ": IMAGE_TYP, "kid": A_KEY.kid}, image_claims().to_payload(), A_KEY)
    with pytest.raises(AlgorithmNotAllowed, match="alg None"):
        verify_image(token)


@pytest.mark.parametrize("name", ["jwk", "jku", "x5u", "x5c"])
def test_key_carried_in_the_header_is_refused(name: str) -> None:
    token = sign_raw(
        header_for(IMAGE_TYP, A_KEY, **{name: "x"}), image_claims().to_payload(), A_KEY
    )
    with pytest.raises(Malformed, match="keys in a token are never used"):
        verify_image(token)


def test_crit_header_is_refused() -> None:
    token = sign_raw(header_for(IMAGE_TYP, A_KEY, crit=["exp"]), image_claims().to_payload(), A_KEY)
    with pytest.raises(Malformed, match="crit"):
        verify_image(token)


def test_missing_kid_is_refused() -> None:
    token = sign_raw({"alg": "ES256", "typ": IMAGE_TYP}, image_claims().to_payload(), A_KEY)
    with pytest.raises(Malformed, match="no kid"):
        verify_image(token)


# --- one kind as another (RFC 8725 3.11, 3.12) ---------------------------------------------------

PAIRS = [(x, y) for x, y in itertools.permutations(KINDS, 2)]


def _pair_id(pair: tuple[TokenKind[Any], TokenKind[Any]]) -> str:
    return f"{pair[0].typ}-as-{pair[1].typ}"


@pytest.mark.parametrize("pair", PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_a_kind_presented_as_another_kind_is_refused(
    pair: tuple[TokenKind[Any], TokenKind[Any]],
) -> None:
    presented, expected = pair
    claims, key, *_ = sample(presented)
    token = issue(presented, claims, key, now=NOW)
    with pytest.raises(WrongType, match=re.escape(f"(typ '{presented.typ}') is not")):
        check(expected, token)


@pytest.mark.parametrize("pair", PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_claims_of_one_kind_under_another_kinds_typ_are_refused(
    pair: tuple[TokenKind[Any], TokenKind[Any]],
) -> None:
    # Even with typ relabelled (and signed by the right issuer), the claim rules of the kinds
    # exclude each other: each lacks a claim the other requires or carries one it refuses.
    presented, expected = pair
    claims, *_ = sample(presented)
    _, key, _, expected_audience, issuer = sample(expected)
    payload = {**claims.to_payload(), "aud": expected_audience, "iss": issuer}
    token = sign_raw(header_for(expected.typ, key), payload, key)
    with pytest.raises(InvalidClaim, match=expected.label):
        check(expected, token)


def test_gateway_refuses_a_viewer_launch_token() -> None:
    token = issue(VIEWER_LAUNCH, launch_claims(audience=GATEWAY), A_KEY, now=NOW)
    with pytest.raises(WrongType, match="viewer launch token is not accepted here"):
        gateway().check(token, study_uid=STUDY)


# --- what a token covers -------------------------------------------------------------------------


def test_token_for_one_study_used_on_another_is_refused() -> None:
    with pytest.raises(StudyNotCovered, match=f"does not cover study '{OTHER_STUDY}'"):
        gateway().check(image_token(), study_uid=OTHER_STUDY)


def test_token_for_one_patient_used_on_another_patients_study_is_refused() -> None:
    # The study asked for is named in the token, but the gateway's index says it is another
    # patient's: a token is never a key to someone else's images.
    with pytest.raises(PatientMismatch, match=r"is for patient PAT200 .*not for PAT201"):
        gateway().check(image_token(), study_uid=STUDY, patient=OTHER_PATIENT)


def test_one_time_token_replayed_is_refused() -> None:
    viewer = AccessVerifier(
        A_KEYS, VIEWER, A, MemoryReplayGuard(), kinds=(VIEWER_LAUNCH,), clock=lambda: NOW
    )
    token = issue(VIEWER_LAUNCH, launch_claims(), A_KEY, now=NOW)
    viewer.check(token, study_uid=STUDY, patient=PATIENT)
    with pytest.raises(Replayed, match="already used once; it is one-time") as raised:
        viewer.check(token, study_uid=STUDY, patient=PATIENT)
    assert raised.value.jti is not None


# --- form ----------------------------------------------------------------------------------------


def test_oversized_token_is_refused_unread() -> None:
    # Not even base64: refused for its size before anything is decoded.
    with pytest.raises(TooLarge, match=f"refused unread: at most {MAX_TOKEN_CHARS}"):
        verify_image("!" * (MAX_TOKEN_CHARS + 1))


def test_oversized_signed_token_is_refused() -> None:
    payload = {**image_claims().to_payload(), "padding": "x" * MAX_TOKEN_CHARS}
    with pytest.raises(TooLarge):
        verify_image(sign_raw(header_for(IMAGE_TYP, A_KEY), payload, A_KEY))


def test_duplicated_claim_name_is_refused() -> None:
    body = encode_json(image_claims().to_payload())[:-1] + b',"sub":"someone-else"}'
    token = sign_raw(header_for(IMAGE_TYP, A_KEY), body, A_KEY)
    with pytest.raises(Malformed, match="payload has member 'sub' twice"):
        verify_image(token)


def test_duplicated_header_name_is_refused() -> None:
    head = encode_json(header_for(IMAGE_TYP, A_KEY))[:-1] + b',"alg":"none"}'
    token = sign_raw(head, image_claims().to_payload(), A_KEY)
    with pytest.raises(Malformed, match="header has member 'alg' twice"):
        verify_image(token)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "3 dot-separated parts, this has 1"),
        ("a.b", "this has 2"),
        ("a.b.c.d.e", "encrypted JWE"),
        ("e30.e30.e30.", "this has 4"),
        ("eyJhbGciOiJFUzI1NiJ9!.e30.AAAA", "header is not base64url"),
        ("eyJhbGciOiJFUzI1NiJ9=.e30.AAAA", "header is not base64url"),
        ("eyJhbGciOiJFUzI1NiJ9 .e30.AAAA", "header is not base64url"),
        ("eyJhb.e30.AAAA", "header is not base64url"),
        ("eyJ.e30.AAAA", "header is not canonical base64url"),
        (f"{b64(b'not json')}.e30.AAAA", "header is not UTF-8 JSON"),
        (f"{b64(b'[1, 2]')}.e30.AAAA", "header is not a JSON object"),
        (f"{b64(bytes([0xFF, 0xFE]))}.e30.AAAA", "header is not UTF-8 JSON"),
        (f"{b64(b'{}')}.e30.AAAA", "alg None is not allowed"),
    ],
)
def test_garbage_is_refused_as_malformed(token: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        verify_image(token)


def test_non_canonical_base64_is_refused() -> None:
    head, body, signature = image_token().split(".")
    # 'e30' is '{}'; 'e31' decodes to the same bytes with non-zero spare bits.
    assert unb64("e31") == unb64("e30")
    token = sign_raw(header_for(IMAGE_TYP, A_KEY), b"{}", A_KEY)
    h, _, s = token.split(".")
    with pytest.raises(Malformed, match="payload is not canonical base64url"):
        verify_image(f"{h}.e31.{s}")
    assert head and body and signature


def test_non_json_payload_is_refused() -> None:
    token = sign_raw(header_for(IMAGE_TYP, A_KEY), b"iss=AT", A_KEY)
    with pytest.raises(Malformed, match="payload is not UTF-8 JSON"):
        verify_image(token)


def test_nan_in_payload_is_refused() -> None:
    body = encode_json(image_claims().to_payload())[:-1] + b',"x":NaN}'
    with pytest.raises(Malformed, match="payload is not UTF-8 JSON"):
        verify_image(sign_raw(header_for(IMAGE_TYP, A_KEY), body, A_KEY))


def test_deeply_nested_json_is_refused_not_crashed() -> None:
    body = b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    with pytest.raises(Malformed):
        verify_image(sign_raw(header_for(IMAGE_TYP, A_KEY), body, A_KEY))


def test_missing_jti_is_refused() -> None:
    payload = image_claims().to_payload()
    del payload["jti"]
    with pytest.raises(InvalidClaim, match="claim jti: required claim is missing"):
        verify_image(sign_raw(header_for(IMAGE_TYP, A_KEY), payload, A_KEY))


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "iat", "exp"])
def test_missing_registered_claim_is_refused(claim: str) -> None:
    payload = image_claims().to_payload()
    del payload[claim]
    with pytest.raises(TokenError, match=claim):
        verify_image(sign_raw(header_for(IMAGE_TYP, A_KEY), payload, A_KEY))


@pytest.mark.parametrize("value", ["1795341900", True, None, [1], 1e20, -1])
def test_exp_that_is_not_a_plausible_numeric_date_is_refused(value: Any) -> None:
    payload = {**image_claims().to_payload(), "exp": value}
    with pytest.raises(InvalidClaim, match="claim exp"):
        verify_image(sign_raw(header_for(IMAGE_TYP, A_KEY), payload, A_KEY))


def _image_payload_with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    payload = image_claims().to_payload()
    target = payload
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = value
    return payload


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("extensions",), [], "claim extensions: must be a JSON object"),
        (("extensions", "ihe_iua"), "x", "claim extensions.ihe_iua: must be a JSON object"),
        (("extensions", "ihe_iua", "subject_name"), "Dr. X", "subject_name: is not used in"),
        (("extensions", "ihe_iua", "purpose_of_use"), "TREAT", "must be a FHIR Coding"),
        (("extensions", "ihe_iua", "purpose_of_use"), [], "exactly one Coding"),
        (
            ("extensions", "ihe_iua", "purpose_of_use"),
            [{"system": "urn:other", "code": "TREAT"}],
            "purpose_of_use.system: must be http://terminology.hl7.org/CodeSystem/v3-ActReason",
        ),
        (
            ("extensions", "ihe_iua", "purpose_of_use"),
            [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": "TREAT",
                    "display": 1,
                }
            ],
            "purpose_of_use.display: must be a string",
        ),
        (("ncp_option",), 1, "claim ncp_option: must be a string"),
        (("ncp_studies",), {"0": STUDY}, "must be a list of Study Instance UIDs"),
        (("ncp_studies",), [STUDY, 7], "7 is not a DICOM UID"),
        (("ncp_patient",), {"system": "urn:x"}, "ncp_patient.value: must be a non-empty string"),
        (("ncp_unknown",), 1, "ncp_unknown: is not a known claim"),
        (("jti",), "j" * 129, "claim jti: is longer than 128 characters"),
        (("iat",), 1.5, "claim exp: lifetime"),
    ],
)
def test_signed_claims_breaking_a_rule_are_refused_by_name(
    path: tuple[str, ...], value: Any, message: str
) -> None:
    token = sign_raw(header_for(IMAGE_TYP, A_KEY), _image_payload_with(path, value), A_KEY)
    with pytest.raises(InvalidClaim, match=re.escape(message)):
        verify_image(token)


def test_trc_informed_must_be_a_boolean() -> None:
    payload = {**trc_claims(HP_TOKEN).to_payload(), "ncp_informed": "yes"}
    with pytest.raises(InvalidClaim, match="ncp_informed: must be true or false"):
        check(TRC, sign_raw(header_for("trc+jwt", B_KEY), payload, B_KEY))


def test_unencoded_payload_header_is_refused() -> None:
    token = sign_raw(header_for(IMAGE_TYP, A_KEY, b64=False), image_claims().to_payload(), A_KEY)
    with pytest.raises(Malformed, match="b64 false"):
        verify_image(token)


def test_unknown_typ_names_no_kind() -> None:
    token = sign_raw(header_for("at+jwt", A_KEY), image_claims().to_payload(), A_KEY)
    with pytest.raises(WrongType, match="names no kind of token"):
        gateway().check(token, study_uid=STUDY)


def test_a_key_that_is_not_p256_verifies_nothing() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    keys = KeySet(A, {A_KEY.kid: PublicKey(A_KEY.kid, p384)})
    with pytest.raises(AlgorithmNotAllowed, match="is not an EC P-256 key"):
        verify(IMAGE_ACCESS, image_token(), keys, audience=GATEWAY, issuer=A, now=NOW)


def test_a_token_that_is_not_a_string_is_malformed() -> None:
    with pytest.raises(Malformed, match="a token is a string"):
        verify_image(b"abc")  # type: ignore[arg-type]


def test_claim_of_another_kind_is_refused_by_name() -> None:
    payload = {**hp_claims().to_payload(), "ncp_studies": [STUDY]}
    token = sign_raw(header_for("hp-assertion+jwt", B_KEY), payload, B_KEY)
    with pytest.raises(InvalidClaim, match="ncp_studies: is a claim of image access token"):
        check(HP_ASSERTION, token)


def test_trc_without_its_binding_is_refused() -> None:
    payload = trc_claims(HP_TOKEN).to_payload()
    del payload["ncp_hp_assertion_hash"]
    with pytest.raises(InvalidClaim, match="ncp_hp_assertion_hash: required claim is missing"):
        check(TRC, sign_raw(header_for("trc+jwt", B_KEY), payload, B_KEY))


# --- hypothesis: generated claim sets and mutations ----------------------------------------------

uids = st.lists(st.integers(0, 999_999), min_size=2, max_size=7).map(
    lambda components: ".".join(map(str, components))
)
# Printable, no spaces at all, Latin and beyond ASCII: names and identifiers as B writes them.
idents = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x24F, exclude_categories=("Zs", "Cc")),
    min_size=1,
    max_size=24,
)


@st.composite
def valid_image_claims(draw: st.DrawFn) -> Any:
    # Issued up to 200 s before NOW and still valid at NOW.
    age = draw(st.integers(0, 200))
    issued = NOW - timedelta(seconds=age)
    return image_claims(
        issued,
        subject=draw(idents),
        expires_at=issued + timedelta(seconds=draw(st.integers(age + 1, 300))),
        studies=tuple(draw(st.lists(uids, min_size=1, max_size=8, unique=True))),
        option=draw(st.sampled_from("ABC")),
        priority=draw(st.sampled_from(["routine", "urgent", "asap", "stat"])),
        purpose_of_use=draw(st.sampled_from(["TREAT", "ETREAT"])),
        patient=replace(PATIENT, value=draw(idents)),
    )


def _delete(name: str) -> Any:
    def change(payload: dict[str, Any]) -> None:
        del payload[name]

    return change


def _set(name: str, value: Any) -> Any:
    def change(payload: dict[str, Any]) -> None:
        payload[name] = value

    return change


def _shift(*names: str, by: int, to: str | None = None) -> Any:
    def change(payload: dict[str, Any]) -> None:
        for name in names:
            payload[name] = payload[to or name] + by

    return change


def _set_iua_purpose(code: str) -> Any:
    def change(payload: dict[str, Any]) -> None:
        payload["extensions"]["ihe_iua"]["purpose_of_use"][0]["code"] = code

    return change


# Each change to a valid claim set, with the error it must cause.
PAYLOAD_CHANGES: list[tuple[str, Any, type[TokenError]]] = [
    *[
        (f"drop {name}", _delete(name), InvalidClaim)
        for name in (
            "sub",
            "iat",
            "exp",
            "jti",
            "ncp_patient",
            "ncp_studies",
            "ncp_option",
            "ncp_priority",
            "ncp_requesting_country",
            "extensions",
        )
    ],
    ("drop iss", _delete("iss"), WrongIssuer),
    ("drop aud", _delete("aud"), WrongAudience),
    ("aud other", _set("aud", GATEWAY + "x"), WrongAudience),
    ("iss other", _set("iss", "DE"), WrongIssuer),
    ("iss not a string", _set("iss", 7), WrongIssuer),
    ("exp long past", _set("exp", int(NOW.timestamp()) - 600), InvalidClaim),
    ("exp as string", _set("exp", "soon"), InvalidClaim),
    ("iat after exp", _shift("iat", to="exp", by=1), InvalidClaim),
    ("window an hour ahead", _shift("iat", "exp", by=3600), NotYetValid),
    ("window an hour ago", _shift("iat", "exp", by=-3600), Expired),
    ("option D", _set("ncp_option", "D"), InvalidClaim),
    ("studies empty", _set("ncp_studies", []), InvalidClaim),
    ("study not a uid", _set("ncp_studies", ["1.2.x"]), InvalidClaim),
    ("studies as string", _set("ncp_studies", STUDY), InvalidClaim),
    ("patient as string", _set("ncp_patient", "PAT200"), InvalidClaim),
    ("purpose other", _set_iua_purpose("HRESCH"), InvalidClaim),
    ("foreign claim", _set("ncp_hp_assertion_hash", "x"), InvalidClaim),
    ("jti empty", _set("jti", ""), InvalidClaim),
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(claims=valid_image_claims(), change=st.sampled_from([None, *PAYLOAD_CHANGES]))
def test_generated_claim_sets_pass_only_when_well_formed(claims: Any, change: Any) -> None:
    payload = claims.to_payload()
    if change is not None:
        _, apply, _ = change
        apply(payload)
    token = sign_raw(header_for(IMAGE_TYP, A_KEY), payload, A_KEY)
    if change is None:
        assert verify_image(token) == claims
    else:
        with pytest.raises(change[2]):
            verify_image(token)


@settings(max_examples=80, deadline=None)
@given(
    claims=valid_image_claims(),
    alg=st.sampled_from(["ES256", "none", "HS256", "RS256", "ES384", "es256"]),
    typ=st.sampled_from([IMAGE_TYP, *[k.typ for k in KINDS if k is not IMAGE_ACCESS], "JWT"]),
    kid=st.sampled_from([A_KEY.kid, "at-unknown"]),
)
def test_generated_headers_pass_only_with_es256_the_kinds_typ_and_a_known_kid(
    claims: Any, alg: str, typ: str, kid: str
) -> None:
    token = sign_raw({"alg": alg, "typ": typ, "kid": kid}, claims.to_payload(), A_KEY)
    if alg == "ES256" and typ == IMAGE_TYP and kid == A_KEY.kid:
        assert verify_image(token) == claims
    else:
        expected = (
            AlgorithmNotAllowed
            if alg != "ES256"
            else WrongType
            if typ != IMAGE_TYP
            else KeyNotFound
        )
        with pytest.raises(expected):
            verify_image(token)


@settings(max_examples=100, deadline=None)
@given(
    claims=valid_image_claims(),
    offset=st.integers(-400, 800),
    leeway=st.integers(0, 60),
)
def test_generated_times_pass_exactly_within_the_window(
    claims: Any, offset: int, leeway: int
) -> None:
    token = issue(IMAGE_ACCESS, claims, A_KEY, now=claims.issued_at)
    now = NOW + timedelta(seconds=offset)
    in_window = (
        claims.issued_at.timestamp() <= now.timestamp() + leeway
        and now.timestamp() < claims.expires_at.timestamp() + leeway
    )
    if in_window:
        assert verify_image(token, now=now, leeway_s=leeway) == claims
    else:
        with pytest.raises((Expired, NotYetValid)):
            verify_image(token, now=now, leeway_s=leeway)


SIGNED = [
    image_token(),
    image_token(studies=(STUDY,), priority="stat", option="C"),
    issue(VIEWER_LAUNCH, launch_claims(audience=GATEWAY), A_KEY, now=NOW),
]
B64URL_AND_MORE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "


@settings(max_examples=300, deadline=None)
@given(
    token=st.sampled_from(SIGNED[:2]),
    position=st.integers(0, len(SIGNED[1]) - 1),
    replacement=st.sampled_from(B64URL_AND_MORE),
)
def test_any_change_to_a_signed_token_is_refused(
    token: str, position: int, replacement: str
) -> None:
    assert verify_image(token)
    assume(position < len(token) and token[position] != replacement)
    changed = token[:position] + replacement + token[position + 1 :]
    with pytest.raises(TokenError):
        verify_image(changed)


@settings(max_examples=100, deadline=None)
@given(token=st.sampled_from(SIGNED), cut=st.integers(1, 200))
def test_truncated_or_extended_tokens_are_refused(token: str, cut: int) -> None:
    for changed in (token[:-cut], token + "A" * cut, token[cut:]):
        with pytest.raises(TokenError):
            verify_image(changed)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=300)
    | st.lists(st.text(B64URL_AND_MORE[:64], max_size=60), min_size=3, max_size=3).map(".".join)
)
def test_arbitrary_input_is_refused_with_a_token_error_only(text: str) -> None:
    with pytest.raises(TokenError):
        verify_image(text)


@settings(max_examples=100, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "crit", "jwk"]), st.text(max_size=8)
    )
    | st.just(header_for(IMAGE_TYP, A_KEY)),
    payload=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    ),
)
def test_signed_junk_claims_are_refused_with_a_token_error_only(header: Any, payload: Any) -> None:
    token = sign_raw(header, json.dumps(payload).encode(), A_KEY)
    with pytest.raises(TokenError):
        verify_image(token)


def test_es256_helper_matches_issue() -> None:
    # The hand-built tokens above are signed the way issue() signs: same input, same key.
    token = image_token()
    head, body, _ = token.split(".")
    rebuilt = f"{head}.{body}.{es256(f'{head}.{body}'.encode(), A_KEY)}"
    assert verify_image(rebuilt) == verify_image(token)
    assert parts(rebuilt)[1] == parts(token)[1]
