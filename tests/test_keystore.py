"""The keys folder loader: one loader for test PKI and operator files, typed errors naming the
file, signing-key rotation and the published JWKS."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from ncp.security import pki
from ncp.security.keys import KeySet
from ncp.security.keystore import (
    InvalidJwk,
    KeyMismatch,
    KeyStore,
    MissingKeyFile,
    UnreadableKeyFile,
    UnsuitableKey,
    b64url,
    key_set_from_jwks,
    kid_for,
    public_jwk,
    public_key_from_jwk,
)
from tests.security_support import make_node

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- loading -------------------------------------------------------------------------------------


def _operator_folder(root: Path) -> Path:
    """A keys folder as an operator would assemble it from a production PKI: a root and an
    issuing CA, the server chain in one file, keys in the traditional OpenSSL format, an RSA
    client key, a kid of the operator's choosing, no ca.key, no jwks.json, no ca.pem."""
    directory = root / "operator"
    (directory / "signing").mkdir(parents=True)
    now = datetime.now(UTC)
    root_ca = pki.make_ca("AT", common_name="Root CA")
    issuing_key = pki.new_ec_key()
    issuing_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA")]))
        .issuer_name(root_ca.certificate.subject)
        .public_key(issuing_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_ca.private_key, hashes.SHA256())
    )
    issuing = pki.Authority(issuing_cert, issuing_key)
    server_key = pki.new_ec_key()
    server = pki.issue_server_certificate(issuing, server_key.public_key(), "AT", ["ncp.at"])
    client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client = pki.issue_client_certificate(issuing, pki.new_ec_key().public_key(), "AT")
    # Re-issue the client certificate for the RSA key (issue_* takes EC keys in its signature).
    client = (
        x509.CertificateBuilder()
        .subject_name(client.subject)
        .issuer_name(client.issuer)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(client.not_valid_before_utc)
        .not_valid_after(client.not_valid_after_utc)
        .add_extension(
            client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value, False
        )
        .sign(issuing_key, hashes.SHA256())
    )
    traditional = serialization.PrivateFormat.TraditionalOpenSSL
    none = serialization.NoEncryption()
    (directory / "server.pem").write_bytes(pki.cert_pem(server, issuing_cert))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(serialization.Encoding.PEM, traditional, none)
    )
    (directory / "client.pem").write_bytes(pki.cert_pem(client, issuing_cert))
    (directory / "client.key").write_bytes(
        client_key.private_bytes(serialization.Encoding.PEM, traditional, none)
    )
    signing = pki.new_ec_key()
    (directory / "signing" / "at-2026-11.key").write_bytes(
        signing.private_bytes(serialization.Encoding.PEM, traditional, none)
    )
    for path in directory.rglob("*.key"):
        path.chmod(0o600)
    (directory / "keys.toml").write_text(
        '# written by hand\ncountry = "AT"\ncurrent = "at-2026-11"  # rotated yearly\n'
    )
    return directory


def test_loader_reads_test_pki_and_operator_folders_the_same_way(tmp_path: Path) -> None:
    generated = KeyStore.load(make_node(tmp_path, "AT").directory, country="AT")
    operator = KeyStore.load(_operator_folder(tmp_path), country="AT")
    for store in (generated, operator):
        assert store.country == "AT"
        signing = store.current_signing_key()
        assert isinstance(signing.private_key.curve, ec.SECP256R1)
        published = store.published_keys()
        assert isinstance(published, KeySet) and published.issuer == "AT"
        assert list(published.keys) == [signing.kid]
        assert [k["kid"] for k in store.jwks()["keys"]] == [signing.kid]
        assert store.server.cert_path.name == "server.pem"
        assert store.client.certificate.subject.rfc4514_string().endswith("C=AT")
    assert operator.current_signing_key().kid == "at-2026-11"
    assert len(operator.server.chain) == 2 and operator.ca_certificates == ()
    assert len(generated.ca_certificates) == 1


def test_generated_jwks_file_is_what_the_store_publishes(tmp_path: Path) -> None:
    store = KeyStore.load(make_node(tmp_path, "AT").directory)
    assert json.loads((store.directory / "jwks.json").read_text()) == store.jwks()


def test_a_private_key_that_does_not_match_its_certificate_is_refused(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    shutil.copy(directory / "client.key", directory / "server.key")
    with pytest.raises(KeyMismatch) as caught:
        KeyStore.load(directory)
    assert caught.value.path == directory / "server.key"
    assert "does not match the certificate in" in str(caught.value)
    assert str(directory / "server.pem") in str(caught.value)


def test_one_key_for_server_and_client_is_refused(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    node = make_node(tmp_path / "other", "AT")
    key = pki.new_ec_key()
    server = pki.issue_server_certificate(node.ca, key.public_key(), "AT")
    client = pki.issue_client_certificate(node.ca, key.public_key(), "AT")
    pki.write_file(directory / "server.pem", pki.cert_pem(server))
    pki.write_file(directory / "client.pem", pki.cert_pem(client))
    pki.write_private_key(directory / "server.key", key)
    pki.write_private_key(directory / "client.key", key)
    with pytest.raises(UnsuitableKey, match="use separate keys"):
        KeyStore.load(directory)


def test_a_signing_key_that_is_not_p256_is_refused_naming_the_file(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    store = KeyStore.load(directory)
    path = directory / "signing" / f"{store.current_signing_key().kid}.key"
    path.write_bytes(pki.private_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(UnsuitableKey) as caught:
        KeyStore.load(directory)
    assert caught.value.path == path
    assert "secp384r1, must be P-256" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        ("client.pem", MissingKeyFile, "no such file"),
        ("keys.toml", MissingKeyFile, "run `ncp keys init`"),
    ],
)
def test_missing_files_are_named(
    tmp_path: Path, name: str, error: type[Exception], words: str
) -> None:
    directory = make_node(tmp_path, "AT").directory
    (directory / name).unlink()
    with pytest.raises(error, match=words) as caught:
        KeyStore.load(directory)
    assert str(directory / name) in str(caught.value)


def test_unreadable_pem_and_bad_keys_toml_are_named(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    (directory / "server.key").write_text("not a key")
    with pytest.raises(UnreadableKeyFile, match=r"server\.key: not a PEM private key"):
        KeyStore.load(directory)
    directory = make_node(tmp_path / "2", "AT").directory
    (directory / "keys.toml").write_text('country = "AT"\ncurrent = "../../etc/passwd"\n')
    with pytest.raises(UnreadableKeyFile, match=r"keys\.toml: current: must be a kid"):
        KeyStore.load(directory)


def test_client_certificate_of_another_country_is_refused(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    with pytest.raises(KeyMismatch, match="country 'AT', but the node is 'BE'"):
        KeyStore.load(directory, country="BE")
    toml = (directory / "keys.toml").read_text().replace('"AT"', '"BE"')
    (directory / "keys.toml").write_text(toml)
    with pytest.raises(KeyMismatch, match=r"client\.pem: subject C='AT'"):
        KeyStore.load(directory)


def test_expired_server_certificate_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path, "AT")
    key = pki.new_ec_key()
    now = datetime.now(UTC)
    cert = pki.issue_server_certificate(
        node.ca,
        key.public_key(),
        "AT",
        not_before=now - timedelta(days=9),
        not_after=now - timedelta(days=1),
    )
    pki.write_file(node.directory / "server.pem", pki.cert_pem(cert))
    pki.write_private_key(node.directory / "server.key", key)
    with pytest.raises(UnsuitableKey, match=r"server\.pem: expired on"):
        KeyStore.load(node.directory)


def test_a_client_certificate_in_the_server_role_is_refused(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    shutil.copy(directory / "client.pem", directory / "server.pem")
    shutil.copy(directory / "client.key", directory / "server.key")
    with pytest.raises(UnsuitableKey, match="does not allow TLS server auth"):
        KeyStore.load(directory)


# --- rotation ------------------------------------------------------------------------------------


def test_rotation_keeps_the_old_key_published_until_its_tokens_expired(tmp_path: Path) -> None:
    directory = make_node(tmp_path, "AT").directory
    start = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(start)
    store = KeyStore.load(directory, clock=clock)
    old = store.current_signing_key()

    new_kid = store.rotate(timedelta(seconds=300), clock_skew=timedelta(seconds=60))

    assert new_kid != old.kid and store.current_signing_key().kid == new_kid
    published = store.published_keys()
    assert set(published.keys) == {old.kid, new_kid}
    assert published.keys[old.kid].not_after == start + timedelta(seconds=360)
    assert published.keys[new_kid].not_after is None
    # The old private key is gone: it can never sign again. Its public key stays.
    assert not (directory / "signing" / f"{old.kid}.key").exists()
    assert (directory / "signing" / f"{old.kid}.pub").exists()
    on_disk = json.loads((directory / "jwks.json").read_text())
    assert {k["kid"] for k in on_disk["keys"]} == {old.kid, new_kid}
    # Another process reading the folder sees the same.
    again = KeyStore.load(directory, clock=clock)
    assert again.current_signing_key().kid == new_kid
    assert set(again.published_keys().keys) == {old.kid, new_kid}

    # Published up to its not_after, gone after; prune then withdraws it from the folder.
    assert old.kid in store.published_keys(start + timedelta(seconds=359)).keys
    assert old.kid not in store.published_keys(start + timedelta(seconds=360)).keys
    assert store.prune(start + timedelta(seconds=100)) == []
    assert store.prune(start + timedelta(seconds=361)) == [old.kid]
    assert not (directory / "signing" / f"{old.kid}.pub").exists()
    assert [k["kid"] for k in json.loads((directory / "jwks.json").read_text())["keys"]] == [
        new_kid
    ]
    assert "retired" not in (directory / "keys.toml").read_text().split("current")[1]


def test_two_rotations_publish_three_keys_and_reload_notices_another_process(
    tmp_path: Path,
) -> None:
    directory = make_node(tmp_path, "AT").directory
    running = KeyStore.load(directory)
    cli = KeyStore.load(directory)
    first = cli.rotate(300)
    second = cli.rotate(300)
    assert len(cli.published_keys().keys) == 3
    assert running.reload_if_changed() is True
    assert running.current_signing_key().kid == second != first
    assert running.reload_if_changed() is False


# --- JWK -----------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=1, max_value=P256_ORDER - 1))
def test_jwk_round_trips_to_the_same_public_key(scalar: int) -> None:
    public = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    kid = kid_for(public)
    jwk = json.loads(json.dumps(public_jwk(kid, public)))
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["use"] == "sig"
    assert jwk["alg"] == "ES256" and jwk["kid"] == kid
    assert len(jwk["x"]) == len(jwk["y"]) == 43  # 32 octets, unpadded base64url
    read_kid, read = public_key_from_jwk(jwk)
    assert read_kid == kid and read.public_numbers() == public.public_numbers()
    assert kid_for(read) == kid
    key_set = key_set_from_jwks("AT", {"keys": [jwk]})
    assert key_set.get(kid) is not None


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_a_jwk_whose_point_is_not_on_p256_is_refused(x: bytes, y: bytes) -> None:
    jwk = {"kty": "EC", "crv": "P-256", "kid": "k", "x": b64url(x), "y": b64url(y)}
    try:
        _, key = public_key_from_jwk(jwk)
    except InvalidJwk as exc:
        assert "not a point on P-256" in str(exc)
    else:  # a random point is on the curve with negligible probability; then it must round-trip
        assert key.public_numbers().x == int.from_bytes(x, "big")


def _good_jwk() -> dict[str, str]:
    public = pki.new_ec_key().public_key()
    return public_jwk("k1", public)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"d": "AAAA"}, "holds a private key"),
        ({"crv": "P-384"}, "only EC P-256"),
        ({"kty": "RSA"}, "only EC P-256"),
        ({"alg": "HS256"}, "only ES256"),
        ({"use": "enc"}, "must be 'sig'"),
        ({"kid": "../x"}, "kid '../x'"),
        ({"x": "AAAA"}, "32 octets"),
        ({"x": "a+b/"}, "not base64url"),
    ],
)
def test_malformed_jwks_are_refused_with_the_reason(change: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidJwk, match=words):
        public_key_from_jwk({**_good_jwk(), **change})


def test_a_jwks_with_a_duplicate_kid_is_refused_and_encryption_keys_skipped() -> None:
    jwk = _good_jwk()
    with pytest.raises(InvalidJwk, match=r"keys\[1\]: kid 'k1' appears twice"):
        key_set_from_jwks("AT", {"keys": [jwk, jwk]})
    skipped = key_set_from_jwks("AT", {"keys": [jwk, {"kty": "RSA", "use": "enc"}]})
    assert list(skipped.keys) == ["k1"]
