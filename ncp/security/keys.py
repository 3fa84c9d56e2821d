"""Signing keys of a node and the public keys it trusts, as the token code uses them.

Kept small on purpose: loading keys from files, rotating them and publishing JWKS live beside this
(``ncp.security.keystore``), and the trust list adds peers' keys. Everything that signs or
verifies takes these types, so tests can make keys in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ec import (
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """This node's EC P-256 key for ES256 signatures, named by its ``kid``."""

    kid: str
    private_key: EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A key that may verify signatures, with the window in which it may (None: open)."""

    kid: str
    public_key: EllipticCurvePublicKey
    not_after: datetime | None = None
    """A withdrawn key stays published until every token it signed has expired, then goes."""


@dataclass(frozen=True, slots=True)
class KeySet:
    """The public keys of one issuer (a country's node), by ``kid``."""

    issuer: str
    keys: Mapping[str, PublicKey] = field(default_factory=dict)

    def get(self, kid: str) -> PublicKey | None:
        return self.keys.get(kid)
