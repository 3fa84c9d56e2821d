"""The test PKI of ``ncp keys init``: what it writes, and that the certificates verify."""

from __future__ import annotations

import argparse
import ipaddress
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ncp.security import pki
from ncp.security.command import register
from ncp.security.keystore import KeyStore, kid_for, load_certificates, load_private_key
from tests.security_support import make_node


def _cert(directory: Path, name: str) -> x509.Certificate:
    return load_certificates(directory / name)[0]


def test_keys_init_writes_the_documented_layout_with_private_files_0600(tmp_path: Path) -> None:
    node = make_node(tmp_path, "AT")
    kid = KeyStore.load(node.directory).current_signing_key().kid
    expected = {
        "keys.toml", "ca.pem", "ca.key", "server.pem", "server.key", "client.pem",
        "client.key", "jwks.json", f"signing/{kid}.key", "signing",
    }  # fmt: skip
    assert {str(p.relative_to(node.directory)) for p in node.directory.rglob("*")} == expected
    assert stat.S_IMODE(node.directory.stat().st_mode) == 0o700
    for private in ("ca.key", "server.key", "client.key", f"signing/{kid}.key"):
        assert stat.S_IMODE((node.directory / private).stat().st_mode) == 0o600, private


def test_ca_is_a_path_length_zero_ca_for_signing_certificates(tmp_path: Path) -> None:
    ca = _cert(make_node(tmp_path, "AT").directory, "ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca.verify_directly_issued_by(ca)
    assert ca.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "AT"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_server_certificate_verifies_for_its_names_with_server_auth(tmp_path: Path) -> None:
    node = make_node(tmp_path, "BE", names=("ncp-be.example", "10.0.0.7"))
    ca, leaf = _cert(node.directory, "ca.pem"), _cert(node.directory, "server.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ncp-be.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.7"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    # An independent RFC 5280 path validation (cryptography's WebPKI verifier).
    store = verification.Store([ca])
    for name in (x509.DNSName("localhost"), x509.DNSName("ncp-be.example")):
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(name)
        assert verifier.verify(leaf, [])[-1] == ca
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    verification.PolicyBuilder().store(store).build_server_verifier(ip).verify(leaf, [])


def test_client_certificate_names_the_country_and_verifies_for_client_auth(tmp_path: Path) -> None:
    node = make_node(tmp_path, "BE")
    ca, leaf = _cert(node.directory, "ca.pem"), _cert(node.directory, "client.pem")
    assert leaf.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "BE"
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "NCPeH-BE"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # WebPKI wants a SAN in every leaf; a node's client certificate is named by its subject.
    ee = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca]))
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
        )
        .build_client_verifier()
    )
    assert verifier.verify(leaf, []).chain[-1] == ca
    now = datetime.now(UTC)
    assert leaf.not_valid_before_utc < now < leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc < ca.not_valid_after_utc


def test_server_client_signing_and_ca_keys_are_four_different_p256_keys(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    store = KeyStore.load(directory)
    keys = [
        load_private_key(directory / name) for name in ("ca.key", "server.key", "client.key")
    ] + [store.current_signing_key().private_key]
    numbers = set()
    for key in keys:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        numbers.add(key.private_numbers().private_value)
    assert len(numbers) == 4
    signing = store.current_signing_key()
    assert signing.kid == kid_for(signing.private_key.public_key())


def test_keys_init_never_overwrites_a_keys_folder(tmp_path: Path) -> None:
    make_node(tmp_path, "AT")
    with pytest.raises(pki.PkiError, match=r"already holds keys \(keys.toml\)"):
        pki.init_keys_folder(tmp_path / "at", "AT")


def test_keys_init_refuses_a_country_that_is_not_an_iso_code(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="ISO 3166-1"):
        pki.init_keys_folder(tmp_path / "x", "Austria")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ncp")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_command_keys_init_rotate_and_prune_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert _run(["keys", "init", "--country", "AT", "--out", str(out), "--names", "ncp-at"]) == 0
    assert "test PKI for AT" in capsys.readouterr().out
    assert _run(["keys", "init", "--country", "AT", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _run(["keys", "init", "--country", "at", "--out", str(tmp_path / "y")]) == 2
    assert _run(["keys", "rotate", "--dir", str(out), "--max-token-lifetime", "120"]) == 0
    assert "2 keys published" in capsys.readouterr().out
    assert _run(["keys", "rotate", "--dir", str(out), "--max-token-lifetime", "0"]) == 2
    assert _run(["keys", "rotate", "--dir", str(tmp_path / "missing")]) == 1
    assert "no such keys folder" in capsys.readouterr().err
    assert _run(["keys", "prune", "--dir", str(out)]) == 0
    assert "nothing to withdraw" in capsys.readouterr().out
