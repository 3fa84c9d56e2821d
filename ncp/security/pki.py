"""A test PKI for one country's node, made with ``cryptography``.

``ncp keys init`` writes a node's keys folder with this module. Production nodes get their
certificates from their own (or the central eHDSI) PKI and put them in the same files; the loader
(:mod:`ncp.security.keystore`) reads both the same way, and this module is never needed there.

Layout of a keys folder (``keys.dir`` in the node's settings)::

    keys.toml            metadata: country, current signing kid, retired kids with their not_after
    ca.pem               the country's CA certificate (what peers put in their trust list)
    ca.key               TEST PKI ONLY: the CA's private key; a production node never holds it
    server.pem           TLS server certificate (leaf first, then any intermediates)
    server.key           its private key
    client.pem           TLS client certificate for calls to peers (leaf first)
    client.key           its private key
    signing/<kid>.key    the current ES256 signing key (EC P-256, PKCS#8 PEM)
    signing/<kid>.pub    public keys of retired signing keys, published until their not_after
    jwks.json            the node's public JWKS (RFC 7517), rewritten on every rotation

Three separate key pairs, as in eHDSI practice: a TLS server key, a TLS client key and a signing
key, so a key leaked from one role cannot act in another. Private keys are written with mode 0600
inside a folder with mode 0700.

All keys are EC P-256: short handshakes, ES256 signatures, and the curve every eHDSI and WebPKI
stack supports.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ncp.errors import NcpError

# File names of a keys folder; the loader uses the same constants.
KEYS_TOML = "keys.toml"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"
SIGNING_DIR = "signing"
JWKS_JSON = "jwks.json"

TEST_CA_SUFFIX = " test CA"
"""The mark of the test PKI: its CA's common name is ``NCPeH-<country> test CA``, so every
certificate it issues names it as issuer. ``ncp check-config`` and ``ncp serve`` refuse such
certificates outside the demo (:func:`is_test_issued`)."""

# A clock running a few minutes behind ours must still accept a certificate made just now.
BACKDATE = timedelta(minutes=5)
CA_LIFETIME = timedelta(days=5 * 365)
LEAF_LIFETIME = timedelta(days=365)


class PkiError(NcpError):
    """Keys could not be generated or written; the message names the folder or file."""


@dataclass(frozen=True, slots=True)
class Authority:
    """A country's CA: its certificate and private key (test PKI only)."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(country: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, country),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"NCPeH-{country}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _serial() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits leave the top bit clear.
    return secrets.randbits(159) | 1


def make_ca(
    country: str,
    *,
    now: datetime | None = None,
    lifetime: timedelta = CA_LIFETIME,
    key: ec.EllipticCurvePrivateKey | None = None,
    common_name: str | None = None,
) -> Authority:
    """A self-signed CA for one country: CA:TRUE with path length 0, so it issues leaves only."""
    now = now or datetime.now(UTC)
    key = key or new_ec_key()
    name = _name(country, common_name or f"NCPeH-{country}{TEST_CA_SUFFIX}")
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = values[0].value if values else ""
    return value if isinstance(value, str) else ""


def is_test_issued(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is the test PKI's CA or was issued by it (its issuer carries
    :data:`TEST_CA_SUFFIX`): test material, never a production node's."""
    return _common_name(cert.issuer).endswith(TEST_CA_SUFFIX)


def _leaf(
    ca: Authority,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    not_before: datetime,
    not_after: datetime,
    san: x509.SubjectAlternativeName | None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDHE-ECDSA needs digitalSignature only; nothing is enciphered with the key.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca.private_key, hashes.SHA256())


def _window(
    now: datetime | None, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    now = now or datetime.now(UTC)
    return (not_before or now - BACKDATE, not_after or now + LEAF_LIFETIME)


def issue_server_certificate(
    ca: Authority,
    public_key: ec.EllipticCurvePublicKey,
    country: str,
    names: Sequence[str] = (),
    *,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """TLS server certificate (EKU serverAuth) for ``localhost``, ``127.0.0.1`` and ``names``.

    A name that parses as an IP address goes into the SAN as an address, the others as DNS names.
    """
    dns: list[str] = ["localhost"]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.ip_address("127.0.0.1")]
    for name in names:
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if name not in dns:
                dns.append(name)
        else:
            if address not in ips:
                ips.append(address)
    san = x509.SubjectAlternativeName(
        [*(x509.DNSName(d) for d in dns), *(x509.IPAddress(i) for i in ips)]
    )
    first = next((n for n in names if n not in {"localhost", "127.0.0.1"}), "localhost")
    start, end = _window(now, not_before, not_after)
    return _leaf(
        ca, _name(country, first), public_key, ExtendedKeyUsageOID.SERVER_AUTH, start, end, san
    )


def issue_client_certificate(
    ca: Authority,
    public_key: ec.EllipticCurvePublicKey,
    country: str,
    *,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    common_name: str | None = None,
) -> x509.Certificate:
    """TLS client certificate (EKU clientAuth) with subject ``C=<country>, O=NCPeH-<country>``.

    Peers identify the calling country by the subject C of this certificate, checked against the
    trust list entry whose CA issued it.
    """
    start, end = _window(now, not_before, not_after)
    subject = _name(country, common_name or f"NCPeH-{country} node")
    return _leaf(ca, subject, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, start, end, None)


# --- writing files -------------------------------------------------------------------------------


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; private files get mode 0600 from the start.

    The mode is set when the temporary file is created, never after, so a private key is not
    readable by others even for an instant.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_file(path, private_pem(key), private=True)


@dataclass(frozen=True, slots=True)
class NodePki:
    """What :func:`init_keys_folder` made (the folder itself is the source of truth)."""

    directory: Path
    country: str
    ca: Authority
    kid: str


def init_keys_folder(
    directory: Path,
    country: str,
    names: Sequence[str] = (),
    *,
    now: datetime | None = None,
) -> NodePki:
    """Create a test PKI for ``country`` in ``directory`` (``ncp keys init``).

    Refuses a folder that already holds a ``keys.toml``: keys are never silently replaced.
    """
    # Imported here: the keystore imports this module's file names.
    from ncp.security.keystore import KeysMeta, jwks_document, kid_for, write_meta

    if len(country) != 2 or not country.isalpha() or not country.isupper():
        raise PkiError(f"country {country!r}: must be an ISO 3166-1 alpha-2 code, e.g. 'AT'")
    if (directory / KEYS_TOML).exists():
        raise PkiError(f"{directory}: already holds keys ({KEYS_TOML}); refusing to overwrite")
    now = now or datetime.now(UTC)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / SIGNING_DIR).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{directory}: cannot create: {exc.strerror or exc}") from exc

    ca = make_ca(country, now=now)
    server_key, client_key, signing_key = new_ec_key(), new_ec_key(), new_ec_key()
    server = issue_server_certificate(ca, server_key.public_key(), country, names, now=now)
    client = issue_client_certificate(ca, client_key.public_key(), country, now=now)
    kid = kid_for(signing_key.public_key())

    write_file(directory / CA_CERT, cert_pem(ca.certificate))
    write_private_key(directory / CA_KEY, ca.private_key)
    write_file(directory / SERVER_CERT, cert_pem(server))
    write_private_key(directory / SERVER_KEY, server_key)
    write_file(directory / CLIENT_CERT, cert_pem(client))
    write_private_key(directory / CLIENT_KEY, client_key)
    write_private_key(directory / SIGNING_DIR / f"{kid}.key", signing_key)
    meta = KeysMeta(country=country, current=kid, retired=())
    write_file(directory / JWKS_JSON, jwks_document([(kid, signing_key.public_key())]))
    # keys.toml last: a folder without it is an unfinished init, and init may run again.
    write_meta(directory, meta)
    return NodePki(directory, country, ca, kid)
