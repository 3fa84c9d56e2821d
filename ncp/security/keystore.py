"""The loader of a node's keys folder, signing-key rotation and the node's public JWKS.

One loader for both kinds of folder: the test PKI written by ``ncp keys init`` and the files an
operator provides from a production PKI. The layout is in :mod:`ncp.security.pki` and
``docs/trust.md``. The loader checks everything it can before the node serves a single request,
and every error names the file it is about:

- each private key matches its certificate (a swapped key fails here, not in a peer's handshake);
- the server certificate allows serverAuth, the client certificate clientAuth, both in validity;
- the client certificate's subject C is the node's country (peers identify us by it);
- signing keys are EC P-256 (ES256 is the only algorithm tokens and assertions use);
- the TLS server key, the TLS client key and the signing key are three different keys.

Rotation (``ncp keys rotate``) makes a new current signing key. The previous one can no longer
sign (its private key is deleted) but its public key stays published until every token it signed
has expired: ``not_after = now + max token lifetime + clock skew``. :meth:`KeyStore.prune` then
drops it from the folder and the JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ncp.errors import NcpError
from ncp.security import pki
from ncp.security.keys import KeySet, PublicKey, SigningKey

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# A kid names a file in signing/: letters, digits, '-', '_' and '.', never a path.
_KID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")

# Verifiers accept a token up to this long after its exp (their clock may lag ours), so a
# retired key stays published this much longer than the longest token it signed.
DEFAULT_CLOCK_SKEW = timedelta(seconds=60)
DEFAULT_MAX_TOKEN_LIFETIME = timedelta(seconds=300)


# --- errors --------------------------------------------------------------------------------------


class KeyStoreError(NcpError):
    """A keys folder cannot be used; ``path`` is the file (or folder) at fault."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MissingKeyFile(KeyStoreError):
    """A file the keys folder must hold is not there."""


class UnreadableKeyFile(KeyStoreError):
    """A file is there but is not the PEM, TOML or JSON it must be."""


class KeyMismatch(KeyStoreError):
    """A private key does not belong to its certificate, or keys.toml disagrees with a file."""


class UnsuitableKey(KeyStoreError):
    """A key or certificate is readable but not fit for its role (curve, usage, validity, reuse)."""


class InvalidJwk(NcpError):
    """A JWK or JWKS is malformed or not an EC P-256 signature key."""


# --- JWK (RFC 7517, 7518 section 6.2, RFC 7638) --------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise InvalidJwk("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _coordinates(key: ec.EllipticCurvePublicKey) -> tuple[str, str]:
    numbers = key.public_numbers()
    # RFC 7518 6.2.1.2: each coordinate is the full 32 octets for P-256, leading zeros kept.
    return b64url(numbers.x.to_bytes(32, "big")), b64url(numbers.y.to_bytes(32, "big"))


def kid_for(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of a P-256 key: a kid anyone can recompute."""
    x, y = _coordinates(key)
    canonical = json.dumps(
        {"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def public_jwk(kid: str, key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of a signing key, restricted to ES256 signatures."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise InvalidJwk(f"key {kid!r}: on {key.curve.name}, only P-256 is published")
    x, y = _coordinates(key)
    return {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"}


def jwks_document(keys: Iterable[tuple[str, ec.EllipticCurvePublicKey]]) -> bytes:
    return (
        json.dumps({"keys": [public_jwk(kid, key) for kid, key in keys]}, indent=2) + "\n"
    ).encode("utf-8")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> tuple[str, ec.EllipticCurvePublicKey]:
    """Read one public JWK; only EC P-256 keys for ES256 signatures are accepted.

    A JWK with a private part (``d``) is refused: publishing one is a leak, not a configuration.
    """
    if not isinstance(jwk, Mapping):
        raise InvalidJwk("a JWK must be a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not _KID.match(kid):
        raise InvalidJwk(f"kid {kid!r}: missing or not 1-128 of [A-Za-z0-9._-]")
    where = f"key {kid!r}"
    if "d" in jwk:
        raise InvalidJwk(f"{where}: holds a private key ('d'); publish only the public part")
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise InvalidJwk(
            f"{where}: kty {jwk.get('kty')!r} crv {jwk.get('crv')!r}, only EC P-256 is accepted"
        )
    if jwk.get("alg", "ES256") != "ES256":
        raise InvalidJwk(f"{where}: alg {jwk.get('alg')!r}, only ES256 is accepted")
    if jwk.get("use", "sig") != "sig":
        raise InvalidJwk(f"{where}: use {jwk.get('use')!r}, a signing key must be 'sig'")
    try:
        x, y = b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
    except KeyError as exc:
        raise InvalidJwk(f"{where}: missing {exc.args[0]!r}") from exc
    except InvalidJwk as exc:
        raise InvalidJwk(f"{where}: x/y {exc}") from exc
    if len(x) != 32 or len(y) != 32:
        raise InvalidJwk(f"{where}: x and y must be 32 octets each for P-256")
    try:
        # cryptography checks that the point is on the curve: an invalid-curve point fails here.
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError as exc:
        raise InvalidJwk(f"{where}: not a point on P-256") from exc
    return kid, key


def key_set_from_jwks(
    issuer: str,
    jwks: Mapping[str, Any],
    not_after: Mapping[str, datetime] | None = None,
) -> KeySet:
    """A :class:`KeySet` from a JWKS document. Keys marked ``use: enc`` are skipped (not ours to
    verify with); any other key that is not a valid ES256 key makes the whole set invalid."""
    keys_field = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys_field, list):
        raise InvalidJwk("a JWKS must be an object with a 'keys' array")
    keys: dict[str, PublicKey] = {}
    for index, jwk in enumerate(keys_field):
        if isinstance(jwk, Mapping) and jwk.get("use") == "enc":
            continue
        try:
            kid, key = public_key_from_jwk(jwk)
        except InvalidJwk as exc:
            raise InvalidJwk(f"keys[{index}]: {exc}") from exc
        if kid in keys:
            raise InvalidJwk(f"keys[{index}]: kid {kid!r} appears twice")
        keys[kid] = PublicKey(kid, key, (not_after or {}).get(kid))
    return KeySet(issuer, keys)


# --- keys.toml -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetiredKey:
    kid: str
    not_after: datetime


@dataclass(frozen=True, slots=True)
class KeysMeta:
    """``keys.toml``: which signing key is current, which retired ones are still published."""

    country: str
    current: str
    retired: tuple[RetiredKey, ...]


def _toml_datetime(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_meta(directory: Path, meta: KeysMeta) -> None:
    lines = [
        "# Keys folder of an ncp node (see docs/trust.md). `ncp keys rotate` rewrites this file.",
        "format = 1",
        f"country = {json.dumps(meta.country)}",
        "# The kid of the key that signs now: signing/<current>.key",
        f"current = {json.dumps(meta.current)}",
    ]
    for old in meta.retired:
        lines += [
            "",
            "# Retired: signs nothing, published (signing/<kid>.pub) until not_after.",
            "[[retired]]",
            f"kid = {json.dumps(old.kid)}",
            f"not_after = {_toml_datetime(old.not_after)}",
        ]
    pki.write_file(directory / pki.KEYS_TOML, ("\n".join(lines) + "\n").encode("utf-8"))


def read_meta(directory: Path) -> KeysMeta:
    path = directory / pki.KEYS_TOML
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MissingKeyFile(path, "no such file (run `ncp keys init` or write it)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableKeyFile(path, f"cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UnreadableKeyFile(path, f"not valid TOML: {exc}") from exc

    def bad(key: str, why: str) -> KeyStoreError:
        return UnreadableKeyFile(path, f"{key}: {why}")

    unknown = set(data) - {"format", "country", "current", "retired"}
    if unknown:
        raise bad(sorted(unknown)[0], "unknown key")
    if data.get("format", 1) != 1:
        raise bad("format", f"{data['format']!r} is not a format this version reads (1)")
    country = data.get("country")
    if not isinstance(country, str) or not re.fullmatch(r"[A-Z]{2}", country):
        raise bad("country", "must be an ISO 3166-1 alpha-2 code in capitals, e.g. 'AT'")
    current = data.get("current")
    if not isinstance(current, str) or not _KID.match(current):
        raise bad("current", "must be a kid of 1-128 characters [A-Za-z0-9._-]")
    retired: list[RetiredKey] = []
    entries = data.get("retired", [])
    if not isinstance(entries, list):
        raise bad("retired", "must be an array of tables ([[retired]])")
    for index, entry in enumerate(entries):
        where = f"retired[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"kid", "not_after"}:
            raise bad(where, "must have exactly 'kid' and 'not_after'")
        kid, not_after = entry["kid"], entry["not_after"]
        if not isinstance(kid, str) or not _KID.match(kid) or kid == current:
            raise bad(f"{where}.kid", "must be a kid other than the current one")
        if not isinstance(not_after, datetime) or not_after.tzinfo is None:
            raise bad(f"{where}.not_after", "must be a TOML date-time with offset, e.g. ...Z")
        retired.append(RetiredKey(kid, not_after))
    return KeysMeta(country, current, tuple(retired))


# --- reading PEM files ---------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingKeyFile(path, "no such file") from exc
    except OSError as exc:
        raise UnreadableKeyFile(path, f"cannot read: {exc.strerror or exc}") from exc


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates of a PEM file, in file order (a leaf first, then its intermediates)."""
    data = _read_bytes(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise UnreadableKeyFile(path, f"not a PEM certificate file: {exc}") from exc
    return certs


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    data = _read_bytes(path)
    if path.stat().st_mode & 0o077:
        # Secrets mounted by container platforms are often 0644: say so, do not refuse.
        log.warning("%s: private key is readable by group or others; chmod 600", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise UnreadableKeyFile(path, "encrypted private keys are not supported") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnreadableKeyFile(path, f"not a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise UnsuitableKey(path, f"{type(key).__name__}: only EC and RSA keys are supported")
    return key


def _require_p256(key: object, path: Path) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        raise UnsuitableKey(path, f"signing key is {type(key).__name__}, must be EC P-256")
    if not isinstance(key.curve, ec.SECP256R1):
        raise UnsuitableKey(path, f"signing key is on {key.curve.name}, must be P-256 (ES256)")


def load_signing_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = load_private_key(path)
    _require_p256(key, path)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def load_signing_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    data = _read_bytes(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnreadableKeyFile(path, f"not a PEM public key: {exc}") from exc
    _require_p256(key, path)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- TLS identities ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """A certificate chain and its private key, as files (what ``ssl`` wants) and parsed."""

    cert_path: Path
    key_path: Path
    chain: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


def subject_country(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def _load_identity(
    directory: Path,
    cert_name: str,
    key_name: str,
    usage: x509.ObjectIdentifier,
    role: str,
    now: datetime,
) -> tuple[TlsIdentity, bytes]:
    cert_path, key_path = directory / cert_name, directory / key_name
    chain = load_certificates(cert_path)
    key = load_private_key(key_path)
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise KeyMismatch(key_path, f"private key does not match the certificate in {cert_path}")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None  # no EKU: any purpose (RFC 5280 4.2.1.12)
    if eku is not None and usage not in eku:
        raise UnsuitableKey(cert_path, f"extended key usage does not allow TLS {role} auth")
    if now < leaf.not_valid_before_utc:
        raise UnsuitableKey(
            cert_path, f"not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
        )
    if now > leaf.not_valid_after_utc:
        raise UnsuitableKey(cert_path, f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    return TlsIdentity(cert_path, key_path, tuple(chain)), _spki(leaf.public_key())


# --- the keystore --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    meta: KeysMeta
    current: SigningKey
    retired: Mapping[str, PublicKey]
    server: TlsIdentity
    client: TlsIdentity
    ca: tuple[x509.Certificate, ...]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_timedelta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


class KeyStore:
    """A node's keys folder, loaded and checked. Build it with :meth:`load`."""

    def __init__(self, directory: Path, state: _State, clock: Clock) -> None:
        self.directory = directory
        self._state = state
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(directory)

    @classmethod
    def load(
        cls, directory: Path, *, country: str | None = None, clock: Clock = _utcnow
    ) -> KeyStore:
        """Read and check ``directory``; ``country`` if given must match ``keys.toml``."""
        return cls(directory, _read_state(directory, country, clock()), clock)

    def reload(self) -> None:
        """Read the folder again (after ``ncp keys rotate`` ran in another process)."""
        with self._lock:
            self._state = _read_state(self.directory, self._state.meta.country, self._clock())
            self._stamp = _stamp(self.directory)

    def reload_if_changed(self) -> bool:
        """Reload when ``keys.toml`` changed since the last load (cheap: one ``stat``)."""
        if _stamp(self.directory) == self._stamp:
            return False
        self.reload()
        return True

    # What other code uses.

    @property
    def country(self) -> str:
        return self._state.meta.country

    @property
    def server(self) -> TlsIdentity:
        return self._state.server

    @property
    def client(self) -> TlsIdentity:
        return self._state.client

    @property
    def ca_certificates(self) -> tuple[x509.Certificate, ...]:
        """This node's CA certificate(s) from ``ca.pem``, empty if the operator left it out."""
        return self._state.ca

    def current_signing_key(self) -> SigningKey:
        return self._state.current

    def published_keys(self, now: datetime | None = None) -> KeySet:
        """The current key and every retired key whose ``not_after`` has not passed."""
        now = now or self._clock()
        state = self._state
        keys = {
            state.current.kid: PublicKey(state.current.kid, state.current.private_key.public_key())
        }
        for kid, key in state.retired.items():
            if key.not_after is not None and key.not_after > now:
                keys[kid] = key
        return KeySet(state.meta.country, keys)

    def jwks(self, now: datetime | None = None) -> dict[str, Any]:
        """The node's public JWKS (RFC 7517) as served at its JWKS URL."""
        keys = self.published_keys(now).keys.values()
        return {"keys": [public_jwk(k.kid, k.public_key) for k in keys]}

    # Changing the folder.

    def rotate(
        self,
        max_token_lifetime: timedelta | float = DEFAULT_MAX_TOKEN_LIFETIME,
        *,
        clock_skew: timedelta | float = DEFAULT_CLOCK_SKEW,
    ) -> str:
        """Make a new current signing key and return its kid.

        The previous key's private half is deleted (it must never sign again) and its public
        half stays published until ``now + max_token_lifetime + clock_skew``.
        """
        with self._lock:
            now = self._clock()
            state = self._state
            old = state.current
            new_key = pki.new_ec_key()
            kid = kid_for(new_key.public_key())
            signing = self.directory / pki.SIGNING_DIR
            pki.write_private_key(signing / f"{kid}.key", new_key)
            pki.write_file(signing / f"{old.kid}.pub", pki.public_pem(old.private_key.public_key()))
            until = now + _as_timedelta(max_token_lifetime) + _as_timedelta(clock_skew)
            kept = tuple(r for r in state.meta.retired if r.not_after > now)
            meta = replace(state.meta, current=kid, retired=(*kept, RetiredKey(old.kid, until)))
            # keys.toml is the commit point: before it the old key still signs, after it the new.
            write_meta(self.directory, meta)
            self._state = _read_state(self.directory, meta.country, now)
            self._stamp = _stamp(self.directory)
            self._write_jwks(now)
            (signing / f"{old.kid}.key").unlink(missing_ok=True)
            self._remove_files(r.kid for r in state.meta.retired if r.not_after <= now)
            log.info(
                "signing key rotated: %s is current, %s published until %s", kid, old.kid, until
            )
            return kid

    def prune(self, now: datetime | None = None) -> list[str]:
        """Withdraw retired keys whose ``not_after`` has passed; return their kids."""
        with self._lock:
            now = now or self._clock()
            meta = self._state.meta
            gone = [r.kid for r in meta.retired if r.not_after <= now]
            if not gone:
                return []
            meta = replace(meta, retired=tuple(r for r in meta.retired if r.not_after > now))
            write_meta(self.directory, meta)
            self._state = _read_state(self.directory, meta.country, now)
            self._stamp = _stamp(self.directory)
            self._write_jwks(now)
            self._remove_files(gone)
            return gone

    def _write_jwks(self, now: datetime) -> None:
        keys = self.published_keys(now).keys.values()
        data = jwks_document((k.kid, k.public_key) for k in keys)
        pki.write_file(self.directory / pki.JWKS_JSON, data)

    def _remove_files(self, kids: Iterable[str]) -> None:
        for kid in kids:
            for suffix in (".pub", ".key"):
                (self.directory / pki.SIGNING_DIR / f"{kid}{suffix}").unlink(missing_ok=True)


def _stamp(directory: Path) -> int | None:
    try:
        return (directory / pki.KEYS_TOML).stat().st_mtime_ns
    except OSError:
        return None


def _read_state(directory: Path, country: str | None, now: datetime) -> _State:
    if not directory.is_dir():
        raise MissingKeyFile(directory, "no such keys folder")
    meta = read_meta(directory)
    if country is not None and meta.country != country:
        raise KeyMismatch(
            directory / pki.KEYS_TOML, f"country {meta.country!r}, but the node is {country!r}"
        )
    server, server_spki = _load_identity(
        directory, pki.SERVER_CERT, pki.SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH, "server", now
    )
    client, client_spki = _load_identity(
        directory, pki.CLIENT_CERT, pki.CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH, "client", now
    )
    if subject_country(client.certificate) != meta.country:
        raise KeyMismatch(
            client.cert_path,
            f"subject C={subject_country(client.certificate)!r}, but keys.toml says "
            f"{meta.country!r}; peers identify this node by the C of its client certificate",
        )
    signing_path = directory / pki.SIGNING_DIR / f"{meta.current}.key"
    signing_key = load_signing_private_key(signing_path)
    signing_spki = _spki(signing_key.public_key())

    # eHDSI practice: one key per role, so a key leaked from one role cannot act in another.
    if server_spki == client_spki:
        raise UnsuitableKey(client.key_path, f"same key as {server.key_path}; use separate keys")
    if signing_spki in (server_spki, client_spki):
        raise UnsuitableKey(signing_path, "same key as a TLS key; signing needs its own key")

    retired: dict[str, PublicKey] = {}
    for old in meta.retired:
        pub_path = directory / pki.SIGNING_DIR / f"{old.kid}.pub"
        key_path = directory / pki.SIGNING_DIR / f"{old.kid}.key"
        if pub_path.exists() or not key_path.exists():
            public = load_signing_public_key(pub_path)
        else:
            public = load_signing_private_key(key_path).public_key()
        retired[old.kid] = PublicKey(old.kid, public, old.not_after)

    ca: Sequence[x509.Certificate] = ()
    if (directory / pki.CA_CERT).exists():
        ca = load_certificates(directory / pki.CA_CERT)
    return _State(meta, SigningKey(meta.current, signing_key), retired, server, client, tuple(ca))
