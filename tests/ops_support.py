"""A node's folder as an operator deploys it, for the operations tests: keys from a production
PKI (a CA named as a national CA would be, no CA key in the folder), a trust list with one peer,
an archive folder and a node.toml, each written so a test can spoil one part of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ncp.security import pki
from ncp.security.keystore import KeysMeta, jwks_document, kid_for, write_meta

A, B = "AT", "BE"
HOST = "ncp.at.example"
STANDARD = f"https://{HOST}/fhir"


def production_ca(country: str, *, not_after: datetime | None = None) -> pki.Authority:
    """A CA named as a national PKI names its CA (not the test PKI's ``... test CA``)."""
    name = f"NCPeH-{country} Issuing CA"
    if not_after is None:
        return pki.make_ca(country, common_name=name)
    year = timedelta(days=365)
    return pki.make_ca(country, common_name=name, now=not_after - year, lifetime=year)


def production_keys(directory: Path, country: str, names: tuple[str, ...] = ()) -> pki.Authority:
    """A keys folder in the layout of docs/trust.md from a production-like CA: certificates,
    keys, signing key and JWKS, and no ``ca.key`` (a node never holds its CA's key)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / pki.SIGNING_DIR).mkdir(mode=0o700, exist_ok=True)
    ca = production_ca(country)
    server_key, client_key, signing = pki.new_ec_key(), pki.new_ec_key(), pki.new_ec_key()
    server = pki.issue_server_certificate(ca, server_key.public_key(), country, names)
    client = pki.issue_client_certificate(ca, client_key.public_key(), country)
    kid = kid_for(signing.public_key())
    pki.write_file(directory / pki.CA_CERT, pki.cert_pem(ca.certificate))
    pki.write_file(directory / pki.SERVER_CERT, pki.cert_pem(server))
    pki.write_private_key(directory / pki.SERVER_KEY, server_key)
    pki.write_file(directory / pki.CLIENT_CERT, pki.cert_pem(client))
    pki.write_private_key(directory / pki.CLIENT_KEY, client_key)
    pki.write_private_key(directory / pki.SIGNING_DIR / f"{kid}.key", signing)
    pki.write_file(directory / pki.JWKS_JSON, jwks_document([(kid, signing.public_key())]))
    write_meta(directory, KeysMeta(country=country, current=kid, retired=()))
    return ca


def leaf(
    ca: pki.Authority,
    key: ec.EllipticCurvePrivateKey,
    country: str,
    *,
    usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.SERVER_AUTH,),
    digital_signature: bool = True,
    names: tuple[str, ...] = ("localhost",),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A leaf certificate with the usages a test wants (the PKI module issues only right ones)."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, country),
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "leaf"),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=not digital_signature,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(ca.private_key, hashes.SHA256())


def toml_text(mapping: dict[str, Any]) -> str:
    """TOML of sections holding strings, numbers, booleans and lists of strings (one level of
    sub-tables, e.g. ``peers.BE``)."""
    out: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def section(name: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in body.items() if isinstance(v, dict)}
        if name:
            out.append(f"\n[{name}]")
        out.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for key, sub in tables.items():
            section(f"{name}.{key}" if name else key, sub)

    section("", mapping)
    return "\n".join(out).lstrip() + "\n"


@dataclass
class NodeFolder:
    """A deployable node folder; ``settings`` and ``trust`` are what gets written."""

    root: Path
    ca: pki.Authority
    peer_ca: pki.Authority
    settings: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)
    trust_text: str | None = None
    """Written instead of ``trust`` when set (a file that is not even TOML)."""

    @property
    def config(self) -> Path:
        return self.root / "node.toml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def trust_file(self) -> Path:
        return self.root / "trust.toml"

    def write(self) -> Path:
        self.config.write_text(toml_text(self.settings), encoding="utf-8")
        text = self.trust_text if self.trust_text is not None else toml_text(self.trust)
        self.trust_file.write_text(text, encoding="utf-8")
        return self.config


def node_folder(root: Path, *, standard: str = STANDARD) -> NodeFolder:
    """Country A's node as an operator deploys it: every check passes."""
    root.mkdir(parents=True, exist_ok=True)
    host = standard.split("/")[2].split(":")[0]
    ca = production_keys(root / "keys", A, (host,))
    peer_ca = production_ca(B)
    pki.write_file(root / "be-ca.pem", pki.cert_pem(peer_ca.certificate))
    signing = pki.new_ec_key()
    (root / "be-jwks.json").write_bytes(
        jwks_document([(kid_for(signing.public_key()), signing.public_key())])
    )
    (root / "archive").mkdir(exist_ok=True)
    folder = NodeFolder(root, ca, peer_ca)
    folder.settings = {
        "node": {
            "country": A,
            "name": "NCPeH-AT imaging",
            "patient_id_issuer": "1.2.40.0.10.1.4.3.1",
        },
        "urls": {"standard": standard},
        "database": {"url": "sqlite:///node.db"},
        "archive": {"kind": "folder", "path": "archive"},
        "keys": {"dir": "keys"},
        "trust": {"list": "trust.toml"},
    }
    folder.trust = {
        "format": 1,
        "peers": {
            B: {
                "standard": "https://ncp.be.example/fhir",
                "tls_ca": "be-ca.pem",
                "jwks_file": "be-jwks.json",
            }
        },
    }
    folder.write()
    return folder
