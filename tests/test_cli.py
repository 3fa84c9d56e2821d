"""The ncp command, in-process through main() and as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from ncp import __version__
from ncp.cli import main
from ncp.fhir.datatypes import utc_of
from ncp.store.db import make_engine, session_factory
from ncp.store.models import Study
from tests.support.dicom_factory import make_instance, write_instance


def node_config(tmp_path: Path, archive: Path) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[node]
country = "AT"
patient_id_issuer = ""

[database]
url = "sqlite:///{tmp_path / "index.db"}"

[archive]
kind = "folder"
path = "{archive}"
""",
        encoding="utf-8",
    )
    return config


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ncp {__version__}"
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_index_then_studies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "archive"
    for i in (1, 2):
        write_instance(
            archive / f"{i}.dcm",
            make_instance(
                study_uid=f"1.2.3.{i}", series_uid=f"1.2.3.{i}.1", sop_uid=f"1.2.3.{i}.1.1"
            ),
        )
    (archive / "readme.txt").write_text("not DICOM")
    config = node_config(tmp_path, archive)

    assert main(["index", "--config", str(config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["added"], summary["listed"]) == (2, 3)
    assert summary["skipped"] == [
        {"locator": "readme.txt", "reason": "not a DICOM Part 10 file (no DICM prefix)"}
    ]

    assert main(["index", "--config", str(config)]) == 0
    assert "0 added, 0 updated, 3 unchanged" in capsys.readouterr().out
    # The studies' starts in UTC, read in Austria's zone, for the list's sort by date.
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    with session_factory(engine)() as session:
        rows = session.execute(select(Study.started, Study.started_utc, Study.utc_zone)).all()
    engine.dispose()
    assert [zone for *_, zone in rows] == ["Europe/Vienna", "Europe/Vienna"]
    for started, started_utc, _ in rows:
        assert started_utc == utc_of(started, ZoneInfo("Europe/Vienna"))

    assert main(["studies", "--config", str(config), "--patient", "PAT-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 studies, newest first:")
    assert main(["studies", "--config", str(config), "--patient", "pat-1"]) == 1


def test_missing_archive_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path, tmp_path / "absent")
    assert main(["index", "--config", str(config)]) == 1
    assert "archive folder does not exist" in capsys.readouterr().err


def test_installed_command_runs() -> None:
    # Beside the interpreter under test: a PATH lookup may find another installation.
    exe = Path(sys.executable).with_name("ncp")
    assert exe.is_file(), "the ncp console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"ncp {__version__}")
    done = subprocess.run(
        [sys.executable, "-m", "ncp", "config", "/nonexistent.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "no such config file" in done.stderr


def test_demo_generates_indexes_and_reruns_idempotently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--data", str(tmp_path / "demo"), "--patients", "2", "--setup-only"]
    assert main([*args, "--big-patient-studies", "4"]) == 0
    first = capsys.readouterr().out
    assert "generating example data for country AT" in first
    assert "0 skipped" in first
    assert "4 studies; the ten newest:" in first
    assert (tmp_path / "demo" / "country-a" / "node.toml").exists()

    assert main([*args, "--big-patient-studies", "4"]) == 0
    second = capsys.readouterr().out
    assert "generating" not in second
    assert "0 added, 0 updated" in second
