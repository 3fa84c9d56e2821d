"""``ncp`` starts lazily: ``ncp --help`` and ``ncp validate`` load neither the web stack
(FastAPI, Starlette, uvicorn, httpx), nor the database (SQLAlchemy), nor DICOM (pydicom, NumPy):
testers run ``ncp validate`` over thousands of files in CI, one process each."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ncp import cli

CORPUS = Path(__file__).parent / "corpus"
HEAVY = ("fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy", "alembic", "pydicom", "numpy")

_PROBE = """
import json, sys
from ncp.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as done:
    code = done.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(HEAVY)))
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def probe(*argv: str) -> tuple[int, list[str], str]:
    """Run ``ncp argv`` in a fresh interpreter: (exit code, heavy packages loaded, stdout)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.replace("HEAVY", repr(json.dumps(HEAVY))), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("PROBE "))
    result = json.loads(line.removeprefix("PROBE "))
    return int(result["code"] or 0), list(result["heavy"]), done.stdout


def test_help_loads_no_heavy_package() -> None:
    code, heavy, out = probe("--help")
    assert code == 0 and "validate" in out and "serve" in out
    assert heavy == []


@pytest.mark.parametrize(
    "name", ["Patient-minimal.json", "Bundle-report-document.json", "Bundle-report-document.xml"]
)
def test_validate_loads_no_heavy_package(name: str) -> None:
    code, heavy, out = probe("validate", str(CORPUS / "valid" / name))
    assert code == 0, out
    assert "1 checked, 1 valid" in out
    assert heavy == []


def test_validate_help_loads_no_heavy_package() -> None:
    code, heavy, out = probe("validate", "--help")
    assert code == 0 and "--workers" in out and "--profile" in out
    assert heavy == []


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help or "" for c in action._choices_actions}


def test_every_command_is_listed_with_its_own_help_without_loading_it() -> None:
    lazy = cli._parser([])
    for name in cli.LAZY_COMMANDS:
        loaded = cli._parser([name])
        assert _help_lines(lazy)[name] == _help_lines(loaded)[name], name
        assert list(_subcommands(lazy)) == list(_subcommands(loaded))
