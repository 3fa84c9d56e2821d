"""``ncp pull`` and ``ncp jobs`` in-process (``ncp.cli.main``), B's node from its config with
the real peer client, against a real node A."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ncp.cli import main
from ncp.consumer.jobs import JobView, Requester, Status
from ncp.consumer.progress import follow
from ncp.security.claims import PatientRef
from tests.support import node as node_support
from tests.support.peer_stub import write_b_config

node_a = node_support.node_a
STUDIES = node_support.studies_of("PAT100")
PATIENT = f"{node_support.SYSTEM}|PAT100"


@pytest.fixture
def config(tmp_path: Path, node_a: node_support.RunningNode) -> Iterator[Path]:
    yield write_b_config(tmp_path / "b", node_a)


def _pull(config: Path, *extra: str) -> list[str]:
    return ["pull", "--config", str(config), "--peer", "AT", "--patient", PATIENT, *extra]


def test_pull_stores_the_studies_and_prints_one_json_summary(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_pull(config, "--study", STUDIES[0], "--study", STUDIES[1], "--json"))
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert code == 0, out
    assert summary["status"] == "stored" and summary["hp"]["source"] == "cli"
    assert summary["progress"]["instances_done"] == 3 and summary["elapsed_s"] > 0
    assert [h["status"] for h in summary["history"]][-1] == "stored"
    stored = sorted((config.parent / "retrieved").glob("*/*/*.dcm"))
    assert len(stored) == 3

    assert main(["jobs", "list", "--config", str(config), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["jobs"]
    assert [j["id"] for j in listed] == [summary["id"]]
    assert main(["jobs", "show", "--config", str(config), summary["id"]]) == 0
    shown = capsys.readouterr().out
    assert "stored" in shown and "verifying" in shown


def test_pull_all_takes_the_listed_studies_under_the_filters(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_pull(config, "--all", "--modality", "MR", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["study_uid"] for s in summary["studies"]] == [STUDIES[1]]  # the MR study


def test_a_declined_pull_exits_1_with_as_reason(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = node_support.studies_of("PAT101")[0]
    assert main(_pull(config, "--study", other, "--json")) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "declined"
    assert summary["reason"].startswith(f"A lists no study {other} for this patient")


def test_jobs_cancel_a_queued_job(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_pull(config, "--study", STUDIES[0], "--no-wait", "--json")) == 0
    queued = json.loads(capsys.readouterr().out)
    assert queued["status"] == "queued"
    assert main(["jobs", "cancel", "--config", str(config), queued["id"]]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert main(["jobs", "cancel", "--config", str(config), queued["id"]]) == 1


def test_pull_needs_an_hp_identity_and_a_well_formed_patient(
    tmp_path: Path,
    node_a: node_support.RunningNode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_b_config(tmp_path / "b", node_a)
    text = config.read_text()
    config.write_text(text[: text.index("[retrieval.cli_hp]")])
    assert main(_pull(config, "--study", STUDIES[0])) == 2
    assert "cli_hp" in capsys.readouterr().err
    bad = ["pull", "--config", str(config), "--peer", "AT", "--patient", "PAT100"]
    assert main([*bad, "--study", STUDIES[0]]) == 2
    assert "SYSTEM|VALUE" in capsys.readouterr().err


def test_the_live_bar_follows_a_job_to_its_end() -> None:
    base = JobView(
        id="j",
        status=Status.DOWNLOADING,
        reason=None,
        request_id="r",
        priority="normal",
        option="A",
        peer="AT",
        patient=PatientRef("urn:oid:1.2", "P"),
        hp=Requester("h", "H"),
        instances_total=4,
        instances_done=0,
        instances_rejected=0,
        bytes_total=4000,
        bytes_done=0,
        attempts=0,
        next_attempt_at=None,
        cancel_requested=False,
        created_at=None,  # type: ignore[arg-type]
        updated_at=None,  # type: ignore[arg-type]
        finished_at=None,
        context_expires_at=None,
    )
    states = iter(
        [
            base,
            dataclasses.replace(base, instances_done=2, bytes_done=2000),
            dataclasses.replace(base, status=Status.STORED, instances_done=4, bytes_done=4000),
        ]
    )
    seen: list[JobView] = []

    def read() -> JobView:
        seen.append(next(states))
        return seen[-1]

    out = io.StringIO()
    final = follow(read, lambda j: j.status == Status.STORED, live=True, out=out, every_s=0)
    assert final.status == Status.STORED and len(seen) == 3
    assert "stored" in out.getvalue() and "4/4 instances" in out.getvalue()
    lines = io.StringIO()
    states = iter([base, dataclasses.replace(base, status=Status.STORED, instances_done=4)])
    follow(lambda: next(states), lambda j: j.status == Status.STORED, live=False, out=lines)
    assert lines.getvalue().splitlines() == [
        "downloading 0/4 instances",
        "stored 4/4 instances",
    ]
