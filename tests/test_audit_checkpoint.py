"""Signed checkpoints of the audit chain (``ncp audit checkpoint``, ``verify --checkpoint``):
a chain cut back or rewritten by whoever holds the database is detected, and a checkpoint
signed by another key, or edited, is refused. On SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.orm import Session

from ncp.audit.chain import record_hash, values_of
from ncp.audit.checkpoint import TYP, Checkpoint, CheckpointRefused, folder_keys, read, sign
from ncp.audit.command import register
from ncp.audit.models import AuditChainHead, AuditRecord
from ncp.security import pki
from ncp.security.claims import HP_ASSERTION
from ncp.security.keys import SigningKey
from ncp.security.keystore import KeyStore, kid_for
from ncp.security.tokens import WrongType, verify
from tests.audit_support import fill, mixed_events, sample_event

N = 10


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ncp")
    register(parser.add_subparsers(metavar="COMMAND"))
    args = parser.parse_args(list(argv))
    return int(args.handler(args))


@pytest.fixture(scope="module")
def keys_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One test PKI for the module (making one costs a few certificates)."""
    return pki.init_keys_folder(tmp_path_factory.mktemp("pki") / "keys", "AT").directory


@pytest.fixture
def keys(tmp_path: Path, keys_template: Path) -> Path:
    folder = tmp_path / "keys"
    shutil.copytree(keys_template, folder)
    return folder


@pytest.fixture
def config(tmp_path: Path, db_url: str, engine: Engine, keys: Path) -> Path:
    fill(engine, mixed_events(N))
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[node]
country = "AT"

[database]
url = "{db_url}"

[archive]
kind = "folder"
path = "{tmp_path / "archive"}"

[keys]
dir = "{keys}"
""",
        encoding="utf-8",
    )
    return path


def checkpoint_of(config: Path, out: Path) -> Path:
    assert run(["audit", "checkpoint", "--config", str(config), "--out", str(out)]) == 0
    return out


def verify_with(config: Path, *checkpoints: Path, extra: Sequence[str] = ()) -> int:
    argv = ["audit", "verify", "--config", str(config)]
    for c in checkpoints:
        argv += ["--checkpoint", str(c)]
    return run([*argv, *extra])


# -- raw edits of the chain, as whoever holds the database can make them ---------------------


def cut_back(connection: Connection, keep: int) -> None:
    """Delete the records after ``keep`` and move the head back to it: a valid shorter chain."""
    connection.execute(delete(AuditRecord).where(AuditRecord.seq > keep))
    row = connection.execute(
        select(AuditRecord.hash, AuditRecord.recorded).where(AuditRecord.seq == keep)
    ).one()
    connection.execute(update(AuditChainHead).values(seq=keep, hash=row[0], recorded=row[1]))


def rewrite(connection: Connection, seq: int, name: str, value: object) -> None:
    """Edit record ``seq`` and recompute its hash, every later hash and the head: a valid chain
    that says something else."""
    with Session(bind=connection) as session:
        records = session.scalars(
            select(AuditRecord).where(AuditRecord.seq >= seq).order_by(AuditRecord.seq)
        ).all()
        values = [values_of(r) for r in records]
    prev = None
    for v in values:
        if v["seq"] == seq:
            v[name] = value
        if prev is not None:
            v["prev_hash"] = prev
        v["hash"] = record_hash(v)
        prev = v["hash"]
        connection.execute(
            update(AuditRecord)
            .where(AuditRecord.seq == v["seq"])
            .values({name: v[name], "prev_hash": v["prev_hash"], "hash": v["hash"]})
        )
    connection.execute(update(AuditChainHead).values(hash=prev))


# -- the chain against its checkpoints -------------------------------------------------------


def test_a_checkpoint_of_an_intact_chain_verifies_and_later_records_are_fine(
    config: Path, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    assert f"seq {N} hash " in capsys.readouterr().out
    fill(engine, [sample_event(99)], start=datetime(2025, 1, 1))  # the chain goes on
    assert verify_with(config, cp) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"audit chain intact: {N + 1} records")
    assert "holds the checkpoint of " in out and f"seq {N} hash" in out


def test_a_cut_back_chain_passes_alone_and_fails_against_its_checkpoint(
    config: Path, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    with engine.begin() as connection:
        cut_back(connection, N - 3)
    # The gap the checkpoint closes: alone, the shorter chain is a valid chain.
    assert verify_with(config) == 0
    capsys.readouterr()
    assert verify_with(config, cp) == 1
    out = capsys.readouterr().out
    assert f"first broken record seq {N}: cut: the checkpoint of" in out
    assert f"the chain ends at seq {N - 3}" in out


@pytest.mark.parametrize("seq", [1, 4, N])
def test_a_rewritten_chain_passes_alone_and_fails_against_its_checkpoint(
    config: Path, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str], seq: int
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    with engine.begin() as connection:
        rewrite(connection, seq, "patient_id", "SOMEONE-ELSE")
    assert verify_with(config) == 0
    capsys.readouterr()
    assert verify_with(config, cp) == 1
    out = capsys.readouterr().out
    assert f"seq {N}: rewritten: its hash" in out
    if seq == 1:
        assert "seq 1: rewritten: the chain does not start as the one" in out


def test_a_chain_emptied_and_restarted_fails_against_its_checkpoint(
    config: Path, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    with engine.begin() as connection:
        connection.execute(delete(AuditRecord))
        connection.execute(update(AuditChainHead).values(seq=0, hash="0" * 64, recorded=None))
    fill(engine, [sample_event(1), sample_event(2)])
    assert verify_with(config) == 0
    assert verify_with(config, cp) == 1
    out = capsys.readouterr().out
    assert "rewritten: the chain does not start as the one" in out
    assert f"seq {N}: cut" in out


def test_the_checkpoint_of_an_empty_chain_holds(
    tmp_path: Path, db_url: str, engine: Engine, keys: Path
) -> None:
    path = tmp_path / "empty.toml"
    path.write_text(
        f'[node]\ncountry = "AT"\n[database]\nurl = "{db_url}"\n'
        f'[archive]\nkind = "folder"\npath = "{tmp_path}"\n[keys]\ndir = "{keys}"\n'
    )
    cp = checkpoint_of(path, tmp_path / "cp.jws")
    fill(engine, [sample_event(1)])
    assert verify_with(path, cp) == 0


def test_a_broken_chain_gets_no_checkpoint(
    config: Path, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with engine.begin() as connection:
        connection.execute(update(AuditRecord).where(AuditRecord.seq == 3).values(num_instances=1))
    out = tmp_path / "cp.jws"
    assert run(["audit", "checkpoint", "--config", str(config), "--out", str(out)]) == 1
    assert "BROKEN, no checkpoint written" in capsys.readouterr().out
    assert not out.exists()


def test_checkpoints_go_to_a_folder_or_standard_output(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "vault"
    folder.mkdir()
    checkpoint_of(config, folder)
    (written,) = folder.iterdir()
    assert written.name.startswith(f"audit-checkpoint-AT-{N}-") and written.suffix == ".jws"
    capsys.readouterr()
    assert run(["audit", "checkpoint", "--config", str(config), "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count(".") == 2 and captured.out.endswith("\n")
    assert f"seq {N}" in captured.err
    piped = tmp_path / "piped.jws"
    piped.write_text(captured.out)
    assert verify_with(config, piped, written) == 0


def test_verify_takes_the_keys_from_a_jwks_kept_elsewhere(
    config: Path, keys: Path, tmp_path: Path
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    kept = tmp_path / "kept-jwks.json"
    shutil.copy(keys / "jwks.json", kept)
    assert verify_with(config, cp, extra=["--jwks", str(kept)]) == 0
    other = tmp_path / "other"
    pki.init_keys_folder(other, "AT")
    assert verify_with(config, cp, extra=["--jwks", str(other / "jwks.json")]) == 1


def test_a_checkpoint_survives_a_key_rotation(config: Path, keys: Path, tmp_path: Path) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    KeyStore.load(keys).rotate()
    assert verify_with(config, cp) == 0
    after = checkpoint_of(config, tmp_path / "after.jws")
    assert verify_with(config, cp, after) == 0


# -- checkpoints that are not what they claim -------------------------------------------------


def _parts(token: str) -> list[str]:
    return token.strip().split(".")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _payload(token: str) -> dict[str, object]:
    part = _parts(token)[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def _with_payload(token: str, claims: dict[str, object]) -> str:
    head, _, sig = _parts(token)
    return ".".join([head, _b64(json.dumps(claims).encode()), sig])


def test_an_edited_checkpoint_is_refused(
    config: Path, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws")
    with engine.begin() as connection:
        cut_back(connection, 3)
    token = cp.read_text()
    row = {"seq": 3}
    with Session(engine) as session:
        row["hash"] = session.scalar(select(AuditRecord.hash).where(AuditRecord.seq == 3))
    # The attacker makes the checkpoint agree with the cut chain: the signature no longer does.
    edited = tmp_path / "edited.jws"
    edited.write_text(_with_payload(token, _payload(token) | row))
    capsys.readouterr()
    assert verify_with(config, edited) == 1
    out = capsys.readouterr().out
    assert "audit checkpoint REFUSED: the signature does not verify" in out
    # A flipped character in the signature, and a second spelling of the same base64url.
    head, body, sig = _parts(token)
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    for bad in (f"{head}.{body}.{flipped}", f"{head}.{body}.{sig}=", f"{head}.{body}x.{sig}"):
        assert verify_with(config, _write(tmp_path, bad)) == 1
        assert "REFUSED" in capsys.readouterr().out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"bad-{abs(hash(text))}.jws"
    path.write_text(text)
    return path


def test_a_checkpoint_signed_by_another_key_is_refused(
    config: Path, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = Path(checkpoint_of(config, tmp_path / "cp.jws"))
    claims = _payload(cp.read_text())
    stranger = pki.new_ec_key()
    current = folder_keys(keys)
    (kid,) = current.keys
    checkpoint = Checkpoint(
        "AT",
        datetime.fromtimestamp(int(str(claims["iat"])), UTC),
        int(str(claims["seq"])),
        str(claims["hash"]),
        str(claims["first"]),
        None,
    )
    for signer_kid in (kid_for(stranger.public_key()), kid):  # an unknown kid, and ours
        forged = sign(checkpoint, SigningKey(signer_kid, stranger))
        capsys.readouterr()
        assert verify_with(config, _write(tmp_path, forged)) == 1
        out = capsys.readouterr().out
        assert "REFUSED" in out
        assert ("not one of AT's signing keys" in out) == (signer_kid != kid)


def test_other_signed_objects_are_no_checkpoints_and_checkpoints_no_tokens(
    config: Path, keys: Path, tmp_path: Path
) -> None:
    store = KeyStore.load(keys)
    key = store.current_signing_key()
    now = datetime.now(UTC)
    # An object signed with the node's own key, but of another kind (an HP assertion's typ).
    hp = jwt.api_jws.encode(
        json.dumps({"iss": "AT", "seq": 1}).encode(),
        key.private_key,
        algorithm="ES256",
        headers={"typ": HP_ASSERTION.typ, "kid": key.kid},
    )
    with pytest.raises(CheckpointRefused, match="is not an audit checkpoint"):
        read(hp, store.published_keys(), "AT")
    cp = checkpoint_of(config, tmp_path / "cp.jws").read_text().strip()
    with pytest.raises(WrongType):
        verify(
            HP_ASSERTION,
            cp,
            store.published_keys(),
            audience="https://ncp.at.example/fhir",
            issuer="AT",
            now=now,
        )
    none = ".".join([_b64(b'{"alg":"none","typ":"%s"}' % TYP.encode()), _parts(cp)[1], ""])
    with pytest.raises(CheckpointRefused, match="only ES256"):
        read(none, store.published_keys(), "AT")


def test_a_checkpoint_of_another_countrys_chain_is_refused(
    config: Path, keys: Path, tmp_path: Path
) -> None:
    cp = checkpoint_of(config, tmp_path / "cp.jws").read_text()
    with pytest.raises(CheckpointRefused, match="a checkpoint of the chain of 'AT', not of 'BE'"):
        read(cp, folder_keys(keys), "BE")


def test_checkpoint_errors_of_configuration_are_usage_errors(
    config: Path, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify_with(config, tmp_path / "missing.jws") == 2
    shutil.rmtree(keys)
    out = tmp_path / "cp.jws"
    assert run(["audit", "checkpoint", "--config", str(config), "--out", str(out)]) == 2
    assert "no key to sign the checkpoint with" in capsys.readouterr().err


def test_an_edge_chain_is_checkpointed_with_node_as_keys_and_verified_with_its_jwks(
    tmp_path: Path, db_url: str, engine: Engine, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(engine, [sample_event(1, side="edge", action="image-retrieve")])
    edge = tmp_path / "edge.toml"
    edge.write_text(
        f"""
[edge]
country = "AT"
audience = "https://edge.at.example/dicomweb"
jwks = "{keys / "jwks.json"}"

[archive]
kind = "folder"
path = "{tmp_path}"

[tls]
certificate = "server.pem"
key = "server.key"

[database]
url = "{db_url}"
""",
        encoding="utf-8",
    )
    out = tmp_path / "edge.jws"
    assert run(["audit", "checkpoint", "--config", str(edge), "--out", str(out)]) == 2
    assert "an edge gateway holds no signing key" in capsys.readouterr().err
    argv = ["audit", "checkpoint", "--config", str(edge), "--out", str(out), "--keys", str(keys)]
    assert run(argv) == 0
    assert verify_with(edge, out) == 0
    with engine.begin() as connection:
        connection.execute(delete(AuditRecord))
        connection.execute(update(AuditChainHead).values(seq=0, hash="0" * 64, recorded=None))
    assert verify_with(edge) == 0
    assert verify_with(edge, out) == 1
