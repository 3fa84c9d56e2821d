"""The gateway's memory of verified tokens (``ncp.gateway.access.BearerAuth``) fails closed:
a remembered token is refused as soon as a fresh verification would refuse it (expired, the
clock set back before it was valid, its key removed, replaced or withdrawn, a study it does not
name), an altered token is never taken for the remembered one, and one-time tokens are never
remembered."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncp.gateway.access import BearerAuth
from ncp.gateway.errors import Forbidden, Unauthorized
from ncp.security.access import AccessVerifier
from ncp.security.claims import VIEWER_LAUNCH
from ncp.security.keys import KeySet, PublicKey
from ncp.security.replay import MemoryReplayGuard
from tests.gateway_support import (
    A_KEY,
    STRANGER_KEY,
    STUDY_1,
    STUDY_2,
    A,
    launch_token,
    token,
)

BASE = "https://gw.at.example/dicomweb"
T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


class Rig:
    """A BearerAuth over a verifier whose clock and keys the test moves, counting the full
    verifications."""

    def __init__(self) -> None:
        self.now = T0
        self.keys: KeySet | None = _keys()
        self.verifier = AccessVerifier(
            lambda issuer: self.keys if issuer == A else None,
            audience=BASE,
            issuer=A,
            clock=lambda: self.now,
        )
        self.full = 0
        check = self.verifier.check

        def counted(*args: object, **kwargs: object) -> object:
            self.full += 1
            return check(*args, **kwargs)  # type: ignore[arg-type]

        self.verifier.check = counted  # type: ignore[method-assign,assignment]
        self.auth = BearerAuth(self.verifier, BASE)

    def grant(self, value: str, study: str | None = STUDY_1) -> object:
        return self.auth.grant([f"Bearer {value}"], study)


def _keys(key: object = None, not_after: datetime | None = None) -> KeySet:
    public = key or A_KEY.private_key.public_key()
    return KeySet(A, {A_KEY.kid: PublicKey(A_KEY.kid, public, not_after)})  # type: ignore[arg-type]


def _token(lifetime: timedelta = timedelta(minutes=5)) -> str:
    return token(BASE, (STUDY_1,), now=T0, lifetime=lifetime)


def test_a_token_is_verified_once_and_then_remembered() -> None:
    rig = Rig()
    value = _token()
    first = rig.grant(value)
    rig.now += timedelta(seconds=30)
    assert rig.grant(value) == first
    assert rig.grant(value, None) == first
    assert rig.full == 1


def test_a_remembered_token_is_refused_once_expired() -> None:
    rig = Rig()
    value = _token()
    rig.grant(value)
    rig.now = T0 + timedelta(minutes=5, seconds=rig.verifier.leeway_s)
    with pytest.raises(Unauthorized) as refused:
        rig.grant(value)
    assert "expired" in refused.value.message
    assert refused.value.headers["WWW-Authenticate"].find('error="invalid_token"') > 0


def test_a_clock_set_back_before_the_token_was_valid_refuses_it() -> None:
    rig = Rig()
    value = _token()
    rig.grant(value)
    rig.now = T0 - timedelta(minutes=2)
    with pytest.raises(Unauthorized) as refused:
        rig.grant(value)
    assert "future" in refused.value.message
    assert rig.full == 2


@pytest.mark.parametrize("change", ["removed", "replaced", "withdrawn", "issuer unknown"])
def test_a_change_of_the_signing_key_refuses_a_remembered_token(change: str) -> None:
    rig = Rig()
    value = _token()
    rig.grant(value)
    if change == "removed":
        rig.keys = KeySet(A, {})
    elif change == "replaced":
        rig.keys = _keys(STRANGER_KEY.private_key.public_key())
    elif change == "withdrawn":
        rig.keys = _keys(not_after=T0 + timedelta(seconds=10))
        rig.now = T0 + timedelta(seconds=11)
    else:
        rig.keys = None
    with pytest.raises(Unauthorized):
        rig.grant(value)
    assert rig.full == 2


def test_the_same_key_loaded_again_keeps_the_token_remembered() -> None:
    rig = Rig()
    value = _token()
    rig.grant(value)
    rig.keys = _keys()  # a JWKS file re-read: new objects, the same key
    rig.grant(value)
    assert rig.full == 1


def test_a_remembered_token_still_covers_only_its_studies() -> None:
    rig = Rig()
    value = _token()
    rig.grant(value)
    with pytest.raises(Forbidden) as refused:
        rig.grant(value, STUDY_2)
    assert 'error="insufficient_scope"' in refused.value.headers["WWW-Authenticate"]
    assert refused.value.jti is not None


def test_one_time_tokens_are_never_remembered() -> None:
    keys = _keys()
    verifier = AccessVerifier(
        keys, BASE, A, MemoryReplayGuard(), kinds=(VIEWER_LAUNCH,), clock=lambda: T0
    )
    auth = BearerAuth(verifier, BASE)
    value = launch_token(BASE, T0)
    auth.grant([f"Bearer {value}"], STUDY_1)
    with pytest.raises(Unauthorized) as refused:
        auth.grant([f"Bearer {value}"], STUDY_1)
    assert "already used" in refused.value.message


_VALUE = _token()
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=150, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(_VALUE) - 1),
    char=st.sampled_from(_ALPHABET),
)
def test_an_altered_token_is_not_taken_for_the_remembered_one(position: int, char: str) -> None:
    rig = Rig()
    rig.grant(_VALUE)
    altered = _VALUE[:position] + char + _VALUE[position + 1 :]
    if altered == _VALUE or _VALUE[position] == ".":
        return
    with pytest.raises(Unauthorized):
        rig.grant(altered)
