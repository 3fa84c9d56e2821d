"""``ncp validate``: exit codes, the three output formats, folders, stdin, XML input."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome
from lxml import etree

from ncp.fhir.io import to_xml
from ncp.validation.command import SOURCE_EXTENSION, register, run_validate

CORPUS = Path(__file__).parent / "corpus"
VALID = CORPUS / "valid" / "Bundle-report-document.json"
VALID_XML = CORPUS / "valid" / "Bundle-report-document.xml"
INVALID = CORPUS / "invalid" / "Patient-gender-not-in-valueset.json"
BUNDLE_PROFILE = "https://ncp.example/fhir/StructureDefinition/ncp-imaging-report-bundle"


def run(
    *paths: str | Path, fmt: str = "text", profile: str | None = None, stdin: bytes = b""
) -> tuple[int, str]:
    out = io.StringIO()
    code = run_validate(
        [str(p) for p in paths],
        fmt=fmt,  # type: ignore[arg-type]
        profiles=[profile] if profile else [],
        stdin=io.BytesIO(stdin),
        stdout=out,
    )
    return code, out.getvalue()


def test_valid_inputs_exit_0_even_with_warnings() -> None:
    code, text = run(VALID, VALID_XML)
    assert code == 0
    assert " warning invariant " in text  # dom-6 is reported, yet the input is valid
    assert text.splitlines()[-1].startswith("2 checked, 2 valid, 0 invalid: 0 errors")


def test_an_invalid_input_exits_1_and_says_where() -> None:
    code, text = run(VALID, INVALID)
    assert code == 1
    assert f"{INVALID}: error code-invalid @Patient.gender: " in text
    assert "2 checked, 1 valid, 1 invalid: 1 errors" in text.splitlines()[-1]


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path / "missing.json")[0] == 2
    assert "no such file" in capsys.readouterr().err
    assert run(VALID, profile="https://example.org/StructureDefinition/nope")[0] == 2
    assert "unknown profile" in capsys.readouterr().err
    assert run()[0] == 2


def test_unreadable_input_is_invalid_not_a_crash(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Patient",')
    bomb = tmp_path / "bomb.xml"
    bomb.write_bytes(b'<!DOCTYPE x [<!ENTITY a "a">]><Patient xmlns="http://hl7.org/fhir"/>')
    code, text = run(bad, bomb)
    assert code == 1
    assert f"{bad}: fatal structure @-: malformed JSON" in text
    assert f"{bomb}: fatal security @-: " in text


def test_folders_are_searched_recursively_for_json_and_xml(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(VALID, tmp_path / "a" / "one.json")
    shutil.copy(VALID_XML, tmp_path / "a" / "b" / "two.xml")
    (tmp_path / "a" / "notes.txt").write_text("not FHIR")
    code, text = run(tmp_path)
    assert code == 0
    assert text.splitlines()[-1].startswith("2 checked, 2 valid")


def test_stdin_json_and_xml() -> None:
    patient = {"resourceType": "Patient", "gender": "female"}
    assert run("-", stdin=json.dumps(patient).encode())[0] == 0
    assert run("-", stdin=to_xml(patient))[0] == 0
    code, text = run("-", stdin=b'{"resourceType": "Patient", "gender": "x"}')
    assert code == 1 and text.startswith("-: error code-invalid @Patient.gender")


def test_json_format_is_one_operation_outcome_per_input() -> None:
    code, text = run(INVALID, fmt="json")
    assert code == 1
    single = json.loads(text)
    OperationOutcome.model_validate(single)
    assert single["extension"] == [{"url": SOURCE_EXTENSION, "valueString": str(INVALID)}]
    assert any(
        i["severity"] == "error" and i["expression"] == ["Patient.gender"] for i in single["issue"]
    )
    code, text = run(VALID, INVALID, fmt="json")
    outcomes = json.loads(text)
    assert isinstance(outcomes, list) and len(outcomes) == 2
    for outcome in outcomes:
        OperationOutcome.model_validate(outcome)
    assert [o["extension"][0]["valueString"] for o in outcomes] == [str(VALID), str(INVALID)]
    assert not any(i["severity"] == "error" for i in outcomes[0]["issue"])


def test_json_format_of_a_clean_resource_still_has_an_issue() -> None:
    patient = {
        "resourceType": "Patient",
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">P</div>'},
        "gender": "female",
    }
    code, text = run("-", fmt="json", stdin=json.dumps(patient).encode())
    assert code == 0
    outcome = json.loads(text)
    OperationOutcome.model_validate(outcome)
    assert [(i["severity"], i["diagnostics"]) for i in outcome["issue"]] == [
        ("information", "no issues")
    ]


def test_junit_format_has_a_test_case_per_input_and_failures_for_errors() -> None:
    code, text = run(VALID, INVALID, VALID_XML, fmt="junit")
    assert code == 1
    root = etree.fromstring(text.encode())
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [str(VALID), str(INVALID), str(VALID_XML)]
    assert [c.find("failure") is not None for c in cases] == [False, True, False]
    failure = cases[1].find("failure")
    assert failure is not None and "Patient.gender" in (failure.text or "")
    assert cases[0].get("classname") == "fhir.Bundle"


def test_profile_option_applies_to_resources_of_its_type(validator_has_profiles: bool) -> None:
    if not validator_has_profiles:
        pytest.skip("the project's report bundle profile is not there")
    code, text = run(VALID, profile=BUNDLE_PROFILE)
    assert code in (0, 1)  # what the profile finds depends on the builder's conformance
    assert text.splitlines()[-1].startswith("1 checked")


@pytest.fixture
def validator_has_profiles() -> bool:
    from ncp.validation.engine import Validator

    return Validator.default().profile_type(BUNDLE_PROFILE) is not None


def test_register_adds_the_sub_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ncp")
    register(parser.add_subparsers())
    args = parser.parse_args(["validate", str(VALID), "--format", "junit"])
    assert args.paths == [str(VALID)] and args.format == "junit" and args.profile == []
    assert args.handler(args) == 0
    assert "<testsuites" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["validate", str(VALID), "--format", "yaml"])


def test_runs_as_a_process_through_register() -> None:
    # The lead wires register() into ncp/cli.py; until then run it through a tiny parser.
    script = (
        "import argparse, sys\n"
        "from ncp.validation.command import register\n"
        "p = argparse.ArgumentParser(prog='ncp'); register(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "validate", "-", "--format", "json"],
        input=INVALID.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1
    OperationOutcome.model_validate(json.loads(done.stdout))


PATIENT_PROFILE = "https://ncp.example/fhir/StructureDefinition/ncp-patient"
ORGANIZATION_PROFILE = "https://ncp.example/fhir/StructureDefinition/ncp-organization"


def test_profile_given_several_times_checks_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ncp.cli import main

    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p"}},
            {"resource": {"resourceType": "Organization", "id": "o", "name": "X"}},
        ],
    }
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))

    def failing_types(*profiles: str) -> set[str]:
        argv = ["validate", str(path), "--format", "json"]
        for url in profiles:
            argv += ["--profile", url]
        assert main(argv) == 1
        issues = json.loads(capsys.readouterr().out)["issue"]
        return {
            i["expression"][0].split(".ofType(")[1].split(")")[0]
            for i in issues
            if i["severity"] == "error"
        }

    assert failing_types(PATIENT_PROFILE) == {"Patient"}
    assert failing_types(ORGANIZATION_PROFILE) == {"Organization"}
    assert failing_types(PATIENT_PROFILE, ORGANIZATION_PROFILE) == {"Patient", "Organization"}
    assert failing_types(ORGANIZATION_PROFILE, PATIENT_PROFILE) == {"Patient", "Organization"}


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole corpus, valid and invalid, twice over, in nested folders."""
    root = tmp_path_factory.mktemp("many")
    for copy in ("a", "b/c"):
        for kind in ("valid", "invalid"):
            shutil.copytree(CORPUS / kind, root / copy / kind)
    return root


@pytest.mark.parametrize("fmt", ["text", "json", "junit"])
def test_workers_give_the_same_report_in_input_order(
    corpus_folder: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ncp.cli import main

    outputs = []
    for workers in ("1", "3"):
        code = main(["validate", str(corpus_folder), "--format", fmt, "--workers", workers])
        outputs.append((code, capsys.readouterr().out))
    assert outputs[0][0] == outputs[1][0] == 1
    assert outputs[0][1] == outputs[1][1]
    assert outputs[0][1].count("Patient-bad-birthdate") >= 2


def test_workers_from_the_installed_command_with_stdin_among_folders(corpus_folder: Path) -> None:
    ncp = Path(sys.executable).with_name("ncp")
    args = [str(corpus_folder / "a" / "valid"), "-", str(corpus_folder / "a" / "invalid")]
    done = [
        subprocess.run(
            [str(ncp), "validate", *args, "--workers", workers, "--format", "json"],
            input=INVALID.read_bytes(),
            capture_output=True,
            check=False,
            timeout=300,
        )
        for workers in ("1", "2")
    ]
    assert done[0].returncode == done[1].returncode == 1, done[1].stderr
    assert done[0].stdout == done[1].stdout
    sources = [o["extension"][0]["valueString"] for o in json.loads(done[1].stdout)]
    valid = sorted(str(p) for p in (corpus_folder / "a" / "valid").rglob("*.*"))
    assert sources[: len(valid) + 1] == [*valid, "-"]


def test_workers_must_be_one_or_more(capsys: pytest.CaptureFixture[str]) -> None:
    from ncp.cli import main

    assert main(["validate", str(VALID), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def _die(*_: object) -> None:
    os._exit(3)


def test_a_worker_that_dies_is_a_failure_not_a_hang(
    corpus_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import multiprocessing

    from ncp.cli import main
    from ncp.validation import command

    monkeypatch.setattr(command, "_validate_file", _die)
    monkeypatch.setattr(command, "_pool_context", lambda: multiprocessing.get_context("fork"))
    assert main(["validate", str(corpus_folder), "--workers", "2"]) == 1
    assert "a worker process died" in capsys.readouterr().err
