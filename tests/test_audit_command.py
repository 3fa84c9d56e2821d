"""``ncp audit verify|export|report``: exit codes and output, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ncp.audit.command import register
from tests.audit_support import (
    PATIENT_ID,
    delete_record,
    fill,
    sample_event,
    set_field,
    sparse_event,
)


def run(argv: Sequence[str]) -> int:
    """``ncp audit ...`` as ``ncp.cli.main`` runs it: parse, then call the handler."""
    parser = argparse.ArgumentParser(prog="ncp")
    register(parser.add_subparsers(metavar="COMMAND"))
    args = parser.parse_args(list(argv))
    return int(args.handler(args))


def _config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[node]
country = "AT"

[database]
url = "{url}"

[archive]
kind = "folder"
path = "{tmp_path / "archive"}"
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def config(tmp_path: Path, db_url: str, engine: Engine) -> Path:
    fill(engine, [sample_event(1), sparse_event(2), sample_event(3), sample_event(4)])
    fill(engine, [sparse_event(5, action="viewer-launch", side="viewer")])
    return _config(tmp_path, db_url)


def test_verify_intact_exits_0(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("audit chain intact: 5 records; head seq 5 hash ")


def test_verify_names_an_edited_record_and_exits_1(
    config: Path, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    with engine.begin() as connection:
        set_field(connection, 3, "num_instances", 1)
    assert run(["audit", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "first broken record seq 3 (recorded 2024-05-06 07:08:09.125456 UTC" in out
    assert "action list-query): edited" in out
    assert PATIENT_ID not in out


def test_verify_names_a_deleted_tail_and_exits_1(
    config: Path, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    with engine.begin() as connection:
        delete_record(connection, 5)
        delete_record(connection, 2)
    assert run(["audit", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "first broken record seq 2: deleted: record(s) 2 missing before seq 3" in out
    assert "also seq 5: truncated: records 5 are missing at the end" in out


def test_commands_without_audit_tables_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'fresh.db'}")
    for action in ("verify", "export", "report"):
        assert run(["audit", action, "--config", str(config)]) == 2
        assert "no audit tables" in capsys.readouterr().err


def test_export_ndjson_to_stdout(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "export", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    resources = [json.loads(line) for line in lines]
    assert [r["id"] for r in resources] == [
        "audit-at-1",
        "audit-be-2",
        "audit-at-3",
        "audit-at-4",
        "audit-be-5",
    ]
    assert all(r["resourceType"] == "AuditEvent" for r in resources)


def test_export_since(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    since = "2024-05-06T09:08:09.126+02:00"  # the third record's time, given in CEST
    assert run(["audit", "export", "--config", str(config), "--since", since]) == 0
    ids = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert ids == ["audit-at-4", "audit-be-5"]


def test_export_bundle_to_a_folder(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    argv = ["audit", "export", "--config", str(config), "--out", str(out), "--format", "bundle"]
    assert run(argv) == 0
    assert "exported 5 AuditEvents" in capsys.readouterr().out
    bundle = json.loads((out / "audit-bundle.json").read_text(encoding="utf-8"))
    assert bundle["type"] == "collection" and len(bundle["entry"]) == 5


def test_export_ndjson_to_a_folder(config: Path, tmp_path: Path) -> None:
    assert run(["audit", "export", "--config", str(config), "--out", str(tmp_path / "x")]) == 0
    assert len((tmp_path / "x" / "AuditEvent.ndjson").read_text().splitlines()) == 5


def test_a_bad_time_is_a_usage_error(config: Path) -> None:
    with pytest.raises(SystemExit) as done:
        run(["audit", "export", "--config", str(config), "--since", "yesterday"])
    assert done.value.code == 2


def test_report_text_and_csv(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "report", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "list-query" in text and "viewer-launch" in text
    assert text.splitlines()[-1].split()[:2] == ["all", "5"]

    assert run(["audit", "report", "--config", str(config), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_action = {r["action"]: r for r in rows}
    assert by_action["list-query"]["records"] == "3"
    assert by_action["list-query"]["peer_country"] == "BE"
    assert by_action["hp-login"]["p50_ms"] == ""


def test_the_ncp_command_runs_audit_once_registered(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ncp import cli

    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "audit" not in commands.choices:
        pytest.skip("ncp.cli does not register `audit` yet (one line for the lead)")
    assert cli.main(["audit", "verify", "--config", str(config)]) == 0
    assert "intact" in capsys.readouterr().out


def _edge_config(tmp_path: Path, url: str) -> Path:
    """An edge gateway's config (``ncp edge --config``), as examples/edge/edge.toml has it."""
    config = tmp_path / "edge.toml"
    config.write_text(
        f"""
[edge]
country = "AT"
audience = "https://edge.at.example/dicomweb"
jwks = "keys/jwks.json"

[archive]
kind = "folder"
path = "{tmp_path / "archive"}"

[tls]
certificate = "keys/server.pem"
key = "keys/server.key"

[database]
url = "{url}"
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def edge_config(tmp_path: Path, db_url: str, engine: Engine) -> Path:
    fill(engine, [sample_event(1, side="gateway", action="image-retrieve"), sample_event(2)])
    return _edge_config(tmp_path, db_url)


def test_verify_export_and_report_read_an_edge_gateways_config(
    edge_config: Path, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["audit", "verify", "--config", str(edge_config)]) == 0
    assert capsys.readouterr().out.startswith("audit chain intact: 2 records")
    assert run(["audit", "export", "--config", str(edge_config)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert run(["audit", "report", "--config", str(edge_config), "--csv"]) == 0
    assert "image-retrieve" in capsys.readouterr().out
    with engine.begin() as connection:
        set_field(connection, 1, "num_instances", 1)
    assert run(["audit", "verify", "--config", str(edge_config)]) == 1


def test_an_edge_config_with_an_unknown_key_is_still_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _edge_config(tmp_path, f"sqlite:///{tmp_path / 'e.db'}")
    config.write_text(config.read_text() + "\n[edge_extra]\nx = 1\n")
    from ncp import cli

    assert cli.main(["audit", "verify", "--config", str(config)]) == 2
    assert "edge_extra" in capsys.readouterr().err
