"""Keys folders, extra certificates and trust lists for the PKI, keystore, trust and mTLS tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from ncp.security import pki
from ncp.security.keystore import load_certificates


@dataclass(frozen=True)
class Node:
    """A keys folder made by ``ncp keys init`` and its CA, to issue more certificates with."""

    directory: Path
    country: str
    ca: pki.Authority

    def path(self, name: str) -> Path:
        return self.directory / name


def make_node(root: Path, country: str, names: tuple[str, ...] = ()) -> Node:
    made = pki.init_keys_folder(root / country.lower(), country, names)
    return Node(made.directory, country, made.ca)


def write_client(
    directory: Path,
    name: str,
    ca: pki.Authority,
    country: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """A client certificate and key pair written as ``<name>.pem`` / ``<name>.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = pki.new_ec_key()
    cert = pki.issue_client_certificate(
        ca, key.public_key(), country, not_before=not_before, not_after=not_after
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pki.write_file(cert_path, pki.cert_pem(cert))
    pki.write_private_key(key_path, key)
    return cert_path, key_path


def expired_window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(days=30), now - timedelta(days=1)


def cert_of(path: Path) -> x509.Certificate:
    return load_certificates(path)[0]


def trust_toml(
    entries: dict[str, dict[str, str | list[str]]], shared_ca: list[str] | None = None
) -> str:
    """A trust list file from plain values (strings and lists of strings)."""
    lines = ["format = 1"]
    if shared_ca:
        lines.append("shared_ca = [" + ", ".join(f'"{p}"' for p in shared_ca) + "]")
    for country, entry in entries.items():
        lines.append(f"\n[peers.{country}]")
        for key, value in entry.items():
            if isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
            else:
                lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"
