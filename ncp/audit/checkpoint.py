"""Signed checkpoints of the audit chain: its head anchored outside the database.

The hash chain (:mod:`ncp.audit.chain`) shows any edited record, but whoever holds the database
can also cut the newest records and move the head back, or rewrite a record, recompute every
later hash and move the head: the chain is then intact, and wrong. A checkpoint is the head at
one moment (the seq and hash of the newest record, and the hash of the first record, which names
the chain) signed with the node's signing key, and kept where the database's holder cannot write
(``ncp audit checkpoint``; docs/audit.md). Verified against a checkpoint, the chain must still
hold the record it names with the hash it signed: otherwise the chain was cut back or rewritten
since (:class:`ncp.audit.chain.Anchor`). What was appended after the newest checkpoint is only
as safe as the chain itself: checkpoint often.

A checkpoint is a compact JWS (RFC 7515) signed with ES256 by the node's current signing key,
header ``typ`` ``audit-checkpoint+jwt`` and ``kid``, so any JOSE tool can check it against the
node's JWKS. No other signed object of the node has this ``typ``: the token verifier refuses a
checkpoint as a token (it knows no such kind) and :func:`read` refuses a token as a checkpoint.
Claims: ``iss`` (the node's country), ``iat``, ``format`` (the chain's canonical form),
``seq``, ``hash``, ``first`` and ``recorded`` (the head record's time, UTC, or null).

Reading is strict for the same reasons as tokens (``ncp.security.tokens``): canonical base64url
only, no JSON member twice, ES256 pinned, the key chosen by ``kid`` among keys the operator
trusts and never carried in the checkpoint. A checkpoint does not expire: the key that signed it
is trusted as long as the operator keeps it (the keys folder's current and retired keys, or a
JWKS kept beside the checkpoints for keys pruned since).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ncp.audit.chain import CHAIN_FORMAT, Anchor, VerifyResult
from ncp.audit.models import GENESIS_HASH
from ncp.errors import NcpError
from ncp.security import pki
from ncp.security.keys import KeySet, PublicKey, SigningKey
from ncp.security.keystore import (
    KeyStoreError,
    load_signing_private_key,
    load_signing_public_key,
    read_meta,
)

TYP = "audit-checkpoint+jwt"
ALGORITHM = "ES256"
"""Pinned, never read from the checkpoint (RFC 8725 3.1), as for tokens."""
MAX_CHARS = 4096
"""Ours are under 700 characters; anything longer is refused unread."""

_B64URL = re.compile(r"[A-Za-z0-9_-]+\Z")
_HASH = re.compile(r"[0-9a-f]{64}\Z")
_FORBIDDEN_HEADERS = ("jwk", "jku", "x5u", "x5c", "crit")


class CheckpointError(NcpError):
    """A checkpoint cannot be written or checked: no key to sign or verify with, or a chain
    that is already broken."""


class CheckpointRefused(NcpError):
    """A checkpoint file is not a checkpoint this node signed, or was altered."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The chain head at one moment, as signed."""

    country: str
    issued: datetime
    """When it was signed (aware, UTC, whole seconds)."""
    seq: int
    hash: str
    first: str
    """The hash of record 1: which chain this is (the genesis hash for an empty chain)."""
    recorded: datetime | None
    """When the head record was written (naive UTC, as the database keeps it)."""
    kid: str = ""

    def anchor(self, source: str = "") -> Anchor:
        where = f" ({source})" if source else ""
        label = f"the checkpoint of {self.issued:%Y-%m-%d %H:%M:%S} UTC{where}"
        return Anchor(self.seq, self.hash, self.first, label)

    def claims(self) -> dict[str, Any]:
        return {
            "iss": self.country,
            "iat": int(self.issued.timestamp()),
            "format": CHAIN_FORMAT,
            "seq": self.seq,
            "hash": self.hash,
            "first": self.first,
            "recorded": self.recorded.strftime("%Y-%m-%dT%H:%M:%S.%f")
            if self.recorded is not None
            else None,
        }


# -- writing --------------------------------------------------------------------------------


def of_result(result: VerifyResult, country: str, now: datetime | None = None) -> Checkpoint:
    """The checkpoint of a verified chain; refuses a broken one (it would anchor the damage)."""
    if not result.ok:
        raise CheckpointError(
            "the audit chain is broken: a checkpoint would anchor the damage; "
            "run `ncp audit verify` and deal with it first"
        )
    seq = result.head_seq or 0
    if seq and (result.head_hash is None or result.first_hash is None):
        raise CheckpointError("the chain head names no hash")  # ok excludes it; for mypy
    issued = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return Checkpoint(
        country=country,
        issued=issued,
        seq=seq,
        hash=result.head_hash if seq and result.head_hash else GENESIS_HASH,
        first=result.first_hash if seq and result.first_hash else GENESIS_HASH,
        recorded=result.head_recorded if seq else None,
    )


def sign(checkpoint: Checkpoint, key: SigningKey) -> str:
    """The compact JWS of ``checkpoint``, signed with ``key`` (ES256)."""
    payload = json.dumps(checkpoint.claims(), separators=(",", ":"), ensure_ascii=False)
    return jwt.api_jws.encode(
        payload.encode("utf-8"),
        key.private_key,
        algorithm=ALGORITHM,
        headers={"typ": TYP, "kid": key.kid},
    )


def signing_key(keys_dir: Path, country: str) -> SigningKey:
    """The current signing key of a keys folder (``ncp keys init``), which must be ``country``'s.

    Only ``keys.toml`` and the signing key are read: a checkpoint needs no TLS identity."""
    try:
        meta = read_meta(keys_dir)
        if meta.country != country:
            raise CheckpointError(
                f"{keys_dir}: the keys of {meta.country}, but the audit chain is {country}'s"
            )
        path = keys_dir / pki.SIGNING_DIR / f"{meta.current}.key"
        return SigningKey(meta.current, load_signing_private_key(path))
    except KeyStoreError as exc:
        raise CheckpointError(str(exc)) from exc


# -- the keys that verify -------------------------------------------------------------------


def folder_keys(keys_dir: Path) -> KeySet:
    """The signing keys of a keys folder that may have signed checkpoints: the current one and
    every retired one still listed (a retired key signs nothing new: its private half is gone)."""
    try:
        meta = read_meta(keys_dir)
        signing = keys_dir / pki.SIGNING_DIR
        current = load_signing_private_key(signing / f"{meta.current}.key").public_key()
        keys = {meta.current: PublicKey(meta.current, current)}
        for old in meta.retired:
            pub, key = signing / f"{old.kid}.pub", signing / f"{old.kid}.key"
            public = (
                load_signing_public_key(pub)
                if pub.exists() or not key.exists()
                else load_signing_private_key(key).public_key()
            )
            keys[old.kid] = PublicKey(old.kid, public)
    except KeyStoreError as exc:
        raise CheckpointError(f"cannot read the keys that verify checkpoints: {exc}") from exc
    return KeySet(meta.country, keys)


# -- reading --------------------------------------------------------------------------------


def read(text: str, keys: KeySet, country: str) -> Checkpoint:
    """The checkpoint in ``text`` (a compact JWS) if ``keys`` verify it and it is ``country``'s
    chain; else :class:`CheckpointRefused` saying why."""
    text = text.strip()
    if len(text) > MAX_CHARS:
        raise CheckpointRefused(f"{len(text)} characters: not a checkpoint (at most {MAX_CHARS})")
    parts = text.split(".")
    if len(parts) != 3:
        raise CheckpointRefused("not a compact JWS (three dot-separated parts)")
    header = _json_object(_b64decode(parts[0], "header"), "header")
    if header.get("alg") != ALGORITHM:
        raise CheckpointRefused(f"alg {_quote(header.get('alg'))}: only ES256 is accepted")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != TYP:
        raise CheckpointRefused(f"typ {_quote(typ)} is not an audit checkpoint ({TYP!r})")
    carried = [name for name in _FORBIDDEN_HEADERS if name in header]
    if carried:
        raise CheckpointRefused(f"header carries {', '.join(carried)}: never accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise CheckpointRefused("header names no kid")
    key = keys.get(kid)
    if key is None:
        known = ", ".join(sorted(keys.keys)) or "none"
        raise CheckpointRefused(
            f"signed by key {_quote(kid)}, which is not one of {keys.issuer}'s signing keys "
            f"trusted here ({known})"
        )
    signature = _b64decode(parts[2], "signature")
    if len(signature) != 64:
        raise CheckpointRefused(f"an ES256 signature is 64 bytes, this one {len(signature)}")
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.public_key.verify(
            der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise CheckpointRefused(
            f"the signature does not verify with key {kid!r}: the checkpoint was altered, or "
            "signed by another key"
        ) from None
    claims = _json_object(_b64decode(parts[1], "payload"), "payload")
    return _checkpoint(claims, country, kid)


def _checkpoint(claims: Mapping[str, Any], country: str, kid: str) -> Checkpoint:
    def bad(name: str, why: str) -> CheckpointRefused:
        return CheckpointRefused(f"claim {name}: {why}")

    if claims.get("format") != CHAIN_FORMAT:
        raise bad("format", f"{_quote(claims.get('format'))}, not {CHAIN_FORMAT!r}")
    iss = claims.get("iss")
    if iss != country:
        raise bad("iss", f"a checkpoint of the chain of {_quote(iss)}, not of {country!r}")
    seq, iat, recorded = claims.get("seq"), claims.get("iat"), claims.get("recorded")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise bad("seq", "must be a whole number, 0 or more")
    if not isinstance(iat, int) or isinstance(iat, bool) or iat < 0:
        raise bad("iat", "must be seconds since 1970")
    for name in ("hash", "first"):
        value = claims.get(name)
        if not isinstance(value, str) or not _HASH.match(value):
            raise bad(name, "must be 64 lower-case hex digits (SHA-256)")
    when: datetime | None = None
    if recorded is not None:
        try:
            when = datetime.fromisoformat(str(recorded))
        except ValueError:
            raise bad("recorded", "not an ISO 8601 time") from None
    return Checkpoint(
        country=country,
        issued=datetime.fromtimestamp(iat, UTC),
        seq=seq,
        hash=str(claims["hash"]),
        first=str(claims["first"]),
        recorded=when,
        kid=kid,
    )


def _b64decode(segment: str, part: str) -> bytes:
    # Canonical spelling only: a second spelling of the same bytes would be an edit the
    # signature does not see (a lenient decoder drops foreign characters and spare bits).
    if not _B64URL.match(segment) or len(segment) % 4 == 1:
        raise CheckpointRefused(f"{part} is not base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise CheckpointRefused(f"{part} is not canonical base64url")
    return data


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("a member twice")
    return members


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointRefused(f"{part} is not UTF-8 JSON with each member once") from None
    if not isinstance(value, dict):
        raise CheckpointRefused(f"{part} is not a JSON object")
    return value


def _quote(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
