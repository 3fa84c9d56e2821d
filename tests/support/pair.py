"""A running A/B pair for end-to-end tests and benchmarks: country A's node over TLS (standard
channel with mutual TLS, option A gateway, option C edge gateway, option B viewer), and country
B's node with its portal over HTTPS and its retrieval worker as a process.

``running_pair(root)`` builds, once:

- **A** (``tests.support.node.running_node``): the small test dataset (PAT100...; PAT101 and
  PAT102 share family name and birth date: an ambiguous identification) plus one generated
  patient with ``studies`` studies and their reports (``ncp.examples``), several of them in two or
  more versions, loaded into A's report store as A's national systems would send them. Into A's
  data go, on purpose, a Study Description and a report finding that carry ``<script>`` (what B
  must show as text), and one report answers an order of priority ``stat`` (flagged urgent).
- **B**: its config on disk (``b/node.toml``: portal enabled, ``[consumer] peers = ["AT"]``, a
  folder store, the trust list naming A's standard channel, gateway, CA and keys), the node in
  this process with a clock the tests can move (:class:`OffsetClock`), the portal served over
  HTTPS with B's server certificate (``tests.support.portal.serve_portal``), and
  ``python -m ncp jobs work --config b/node.toml`` as a child process (the worker B's operators
  run), its output in ``b/worker.log``.

HP accounts are made with :meth:`Pair.add_hp` (their TOTP secrets returned). Everything stops
when the context ends (the worker by its process group, the servers by their threads).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom

from ncp.config import load_settings
from ncp.examples.generate import generate_examples
from ncp.fhir.identifiers import report_resource_id
from ncp.node import Node
from ncp.provider.reports import load_folder
from ncp.validation.engine import Validator
from tests.security_support import trust_toml
from tests.support.node import ISSUER, A, RunningNode, running_node
from tests.support.portal import ServedPortal, add_hp, serve_portal

ROOT = Path(__file__).resolve().parents[2]
INJECTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
"""What A's data carries in one Study Description and one report finding."""
IDENTIFIER_SYSTEM = f"urn:oid:{ISSUER}"


class OffsetClock:
    """B's clock: real time plus an offset the tests move (a confirmation or a portal session
    running out), and set back."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)

    def reset(self) -> None:
        self.offset = timedelta()


@dataclass(frozen=True)
class GeneratedPatient:
    """The generated patient with many studies, as the HP identifies them."""

    patient_id: str
    family: str
    given: str
    birth_date: date
    studies: list[dict[str, Any]]
    """Each study of the generation's manifest (UID, description, modalities, report...)."""

    @property
    def display(self) -> str:
        return f"{self.given} {self.family}"


@dataclass
class Pair:
    a: RunningNode
    b: Node
    portal: ServedPortal
    clock: OffsetClock
    root: Path
    config: Path
    patient: GeneratedPatient
    injected_study: str
    """The study whose Study Description carries :data:`INJECTED`."""
    injected_report: str
    """A's id of the report whose findings carry :data:`INJECTED`."""
    versioned_report: str
    """A's id of a report with two versions (preliminary, then final)."""
    versioned_study: str
    urgent_report: str
    """A's id of a report whose order was ``stat``."""
    urgent_study: str
    worker: subprocess.Popen[bytes] | None = None
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.portal.url

    def add_hp(self, username: str, *, name: str, language: str = "en") -> str:
        secret = add_hp(self.b, username, name=name, language=language)
        assert secret is not None
        self.secrets[username] = secret
        return secret

    def small_studies(self, count: int, *, exclude: tuple[str, ...] = ()) -> list[str]:
        """UIDs of the patient's smallest studies (quick pulls)."""
        ordered = sorted(self.patient.studies, key=lambda s: s["bytes"])
        return [s["studyInstanceUid"] for s in ordered if s["studyInstanceUid"] not in exclude][
            :count
        ]


def _generate(root: Path, studies: int, seed: int) -> tuple[Path, dict[str, Any]]:
    out = root / "generated"
    generate_examples(out, patients=1, seed=seed, big_patient_studies=studies)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return out, manifest


def _inject_description(dicom: Path, patient_id: str, study_uid: str) -> None:
    for path in sorted((dicom / patient_id / study_uid).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyDescription = INJECTED[:64]  # LO: 64 characters at most
        ds.save_as(path, enforce_file_format=True)


def _report_files(reports: Path) -> dict[str, list[Path]]:
    """Report files by the report's business identifier value, versions in order."""
    found: dict[str, list[Path]] = {}
    for path in sorted(reports.rglob("*.json")):
        stem = path.stem.rsplit("-v", 1)[0]
        found.setdefault(stem, []).append(path)
    for paths in found.values():
        paths.sort(key=lambda p: int(p.stem.rsplit("-v", 1)[1]))
    return found


def _bundle(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _report_id(bundle: dict[str, Any]) -> str:
    ident = bundle["entry"][0]["resource"]["identifier"]
    return report_resource_id(ident["system"], ident["value"])


def _study_of(bundle: dict[str, Any]) -> str:
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "ImagingStudy":
            for ident in resource["identifier"]:
                if ident.get("system") == "urn:dicom:uid":
                    return str(ident["value"]).removeprefix("urn:oid:")
    raise AssertionError("a report bundle without its study")


def _inject_finding(path: Path) -> None:
    """Put :data:`INJECTED` into the findings of a report (escaped in its XHTML, as a national
    system that copied a radiologist's text would send it: valid, and text to B)."""
    bundle = _bundle(path)
    composition = bundle["entry"][0]["resource"]
    for section in composition["section"]:
        if section["code"]["coding"][0]["code"] == "59776-5":
            escaped = INJECTED.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            section["text"]["div"] = (
                f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{escaped} Small nodule.</p></div>'
            )
    path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")


def _set_priority(path: Path, priority: str) -> None:
    """The order of a report as urgent (its ServiceRequest's priority)."""
    bundle = _bundle(path)
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "ServiceRequest":
            entry["resource"]["priority"] = priority
    path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")


def write_b_config(root: Path, a: RunningNode, **portal: Any) -> Path:
    """B's node (BE) on disk, as an operator writes it (see the module doc)."""
    root.mkdir(parents=True, exist_ok=True)
    a_keys = a.node.settings.keys.dir
    entry: dict[str, str] = {
        "standard": a.url,
        "imaging": a.imaging_url or "",
        "tls_ca": str(a_keys / "ca.pem"),
        "jwks_file": str(a_keys / "jwks.json"),
    }
    (root / "trust.toml").write_text(trust_toml({A: entry}))
    (root / "archive").mkdir(exist_ok=True)
    settings: dict[str, dict[str, Any]] = {
        "node": {
            "country": "BE",
            "name": "NCPeH-BE imaging (test)",
            "patient_id_issuer": "2.16.56.1.1.1",
        },
        "urls": {"standard": "https://ncp.be.test/fhir"},
        "database": {"url": f"sqlite:///{root / 'node-b.db'}"},
        "archive": {"kind": "folder", "path": str(root / "archive")},
        "keys": {"dir": str(a.b.keys_dir)},
        "trust": {"list": str(root / "trust.toml")},
        "tokens": {"leeway_s": 30},
        # Pairs live 30 minutes and the portal's idle timeout is an hour, so a test can let a
        # confirmation run out (moving B's clock) before the session does.
        "consumer": {
            "peers": [A],
            "backoff_s": 0.05,
            "timeout_s": 30,
            "assertion_lifetime_s": 1800,
        },
        "portal": {
            "enabled": True,
            "url": "https://localhost:8447",
            "idle_timeout_s": 3600,
            "identifier_systems": {A: IDENTIFIER_SYSTEM},
            **portal,
        },
        "retrieval": {
            "poll_s": 0.1,
            "retry_backoff_s": 0.2,
            "request_timeout_s": 30.0,
            "staging": str(root / "staging"),
        },
        "viewer": {"render_threads": 2},
    }
    lines: list[str] = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        tables = []
        for key, value in values.items():
            if isinstance(value, dict):
                tables.append((key, value))
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        for key, table in tables:
            lines.append(f"[{section}.{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    lines += ["[retrieval.store]", 'kind = "folder"', f"path = {json.dumps(str(root / 'store'))}"]
    path = root / "node.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``ncp jobs work`` as B's operators run it; returns once its lanes run."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ncp", "jobs", "work", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while b"ncp jobs work:" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_worker(proc)
            raise RuntimeError(f"B's worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(30)


@contextmanager
def running_pair(
    root: Path, *, studies: int = 300, seed: int = 11, worker: bool = True
) -> Iterator[Pair]:
    """A and B running (see the module doc) until the context ends."""
    root.mkdir(parents=True, exist_ok=True)
    generated, manifest = _generate(root, studies, seed)
    person = manifest["patients"][0]
    chosen = sorted(person["studies"], key=lambda s: s["started"])
    injected_study = chosen[len(chosen) // 2]["studyInstanceUid"]
    files = _report_files(generated / "reports")
    versioned = next(
        paths
        for paths in files.values()
        if len(paths) == 2 and _bundle(paths[0])["entry"][0]["resource"]["status"] == "preliminary"
    )
    single = next(
        paths[0]
        for paths in files.values()
        if len(paths) == 1 and _study_of(_bundle(paths[0])) != injected_study
    )
    _inject_finding(single)
    urgent = next(
        paths[-1]
        for paths in files.values()
        if paths[0] != single and _study_of(_bundle(paths[0])) != injected_study
        and _bundle(paths[-1])["entry"][0]["resource"]["status"] == "final"
    )
    _set_priority(urgent, "stat")

    def add_generated(archive: Path) -> None:
        _inject_description(generated / "dicom", person["id"], injected_study)
        shutil.move(str(generated / "dicom" / person["id"]), str(archive / person["id"]))

    with running_node(root / "a", viewer=True, edge=True, archive_extra=add_generated) as a:
        summary = load_folder(
            a.node.sessions,
            generated / "reports",
            validator=Validator.default(),
            now=lambda: datetime.now(UTC),
        )
        assert not summary.failed, summary.failed
        config = write_b_config(root / "b", a)
        clock = OffsetClock()
        b = Node.from_settings(load_settings(config), clock=clock)
        proc = start_worker(config, root / "b" / "worker.log") if worker else None
        try:
            with serve_portal(b) as portal:
                yield Pair(
                    a=a,
                    b=b,
                    portal=portal,
                    clock=clock,
                    root=root,
                    config=config,
                    patient=GeneratedPatient(
                        patient_id=person["id"],
                        family=person["family"],
                        given=person["given"],
                        birth_date=date.fromisoformat(person["birthDate"]),
                        studies=person["studies"],
                    ),
                    injected_study=injected_study,
                    injected_report=_report_id(_bundle(single)),
                    versioned_report=_report_id(_bundle(versioned[0])),
                    versioned_study=_study_of(_bundle(versioned[0])),
                    urgent_report=_report_id(_bundle(urgent)),
                    urgent_study=_study_of(_bundle(urgent)),
                    worker=proc,
                )
        finally:
            if proc is not None:
                stop_worker(proc)
            b.close()


__all__ = [
    "INJECTED",
    "GeneratedPatient",
    "OffsetClock",
    "Pair",
    "running_pair",
    "start_worker",
    "stop_worker",
    "write_b_config",
]
