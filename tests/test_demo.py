"""``ncp demo``: the pair run for real in a subprocess, the use case walked through country B as
far as B's pieces go (the portal's login, then B's peer client by ``ncp ask`` and ``ncp pull``
against A: identify, list, report, pulls by options A and C, option B's launch redeemed at A's
viewer), stopped with Ctrl-C leaving no process behind; and its failure paths (a child that
dies, a port that is taken), ``--setup-only`` and ``--totp``."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import pyotp
import pytest
from sqlalchemy import select

from ncp.cli import main
from ncp.config import load_edge_settings, load_settings
from ncp.demo import READY_LINE
from ncp.ops.checks import check_file
from ncp.ops.demo_guard import demo_account_names
from ncp.security.keystore import load_certificates
from ncp.security.trust import TrustList
from ncp.store.db import make_engine, session_factory
from ncp.store.portal import HpAccount
from ncp.store.retrieval import RetrievalEvent

SMALL = ["--patients", "1", "--seed", "3", "--big-patient-studies", "4"]
START_TIMEOUT = 180.0


def _reader(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _demo(args: list[str], *, code: str | None = None) -> tuple[subprocess.Popen[str], Any]:
    """The demo as a child process with its stdout read line by line on a thread."""
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "ncp", *args]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue[str | None], wanted: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith(wanted):
            return seen
    raise AssertionError(f"no {wanted!r} line; the demo printed:\n" + "\n".join(seen))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still in the process table: gone only if a zombie nobody reaped yet.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


_DYING_NODE = """
import os, sys, time
from pathlib import Path
from ncp.demo import run_demo
pidfile = Path(sys.argv[2]) / "edge.pid"

def command(kind, config):
    if kind == "serve":
        return [sys.executable, "-c",
                "import sys, time; time.sleep(1); "
                "print('stand-in node: cannot open the archive', file=sys.stderr); sys.exit(3)"]
    return [sys.executable, "-c",
            "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)",
            str(pidfile)]

sys.exit(run_demo(Path(sys.argv[1]), patients=1, seed=3, big_patient_studies=4, base_port=0,
                  command=command))
"""


def test_a_child_that_dies_stops_the_others_and_fails_with_its_stderr(tmp_path: Path) -> None:
    proc, _lines = _demo([str(tmp_path / "demo"), str(tmp_path)], code=_DYING_NODE)
    try:
        assert proc.wait(START_TIMEOUT) == 1
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "node-a exited with code 3" in stderr
        assert "stand-in node: cannot open the archive" in stderr
        edge_pid = int((tmp_path / "edge.pid").read_text())
        assert _gone(edge_pid)
        assert not (tmp_path / "demo" / "demo.json").exists()
    finally:
        _stop(proc)


def test_a_taken_fixed_port_is_a_usage_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        code = main(["demo", "--data", str(tmp_path / "demo"), "--base-port", str(port)])
    assert code == 2
    assert f"port {port} on 127.0.0.1 is taken" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_setup_only_prepares_configs_keys_trust_and_index_idempotently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "demo"
    assert main(["demo", "--data", str(data), "--setup-only", *SMALL]) == 0
    first = capsys.readouterr().out
    assert "generating example data for country AT" in first
    assert "0 skipped" in first
    assert "0 refused" in first
    # Reports and their versions are told apart, and the two counts say why they differ.
    made = re.search(r"(\d+) reports in (\d+) versions \(", first)
    loaded = re.search(r"(\d+) report versions stored \(of (\d+) reports\)", first)
    assert made is not None and loaded is not None, first
    assert (made[1], made[2]) == (loaded[2], loaded[1])
    assert "corrected or amended" in first

    node = load_settings(data / "country-a" / "node.toml")
    edge = load_edge_settings(data / "edge" / "edge.toml")
    assert node.urls.standard.startswith("https://localhost:")
    assert edge.edge.audience == node.urls.edge
    assert edge.archive == node.archive  # the edge serves the same archive as A
    assert edge.edge.jwks == node.keys.dir / "jwks.json"
    # A trusts the test peer: B's client certificate identifies BE on A's trust list.
    trust = TrustList.load(node.trust.list)
    b_client = load_certificates(data / "country-b" / "keys" / "client.pem")[0]
    assert trust.match_certificate(b_client).country == "BE"
    # The edge's own certificate comes from A's CA, not A's node keys.
    edge_cert = load_certificates(edge.tls.certificate)[0]
    a_ca = load_certificates(node.keys.dir / "ca.pem")[0]
    assert edge_cert.issuer == a_ca.subject
    assert edge.tls.key != node.keys.dir / "server.key"
    # B is a node of the pair: it serves its portal and retrieval workers, asks A, trusts A's
    # gateway and viewer, and A knows B at the URL B serves.
    b = load_settings(data / "country-b" / "node.toml")
    assert b.node.demo and b.portal.enabled and b.retrieval.enabled
    assert b.consumer.peers == ["AT"]
    assert trust.peer("BE").standard == b.urls.standard
    a_on_b = TrustList.load(b.trust.list).peer("AT")
    assert (a_on_b.standard, a_on_b.imaging, a_on_b.viewer) == (
        node.urls.standard,
        node.urls.imaging,
        node.urls.viewer,
    )
    assert demo_account_names(b.database.url) == ["anne", "luc"]
    for config in (data / "country-a" / "node.toml", data / "country-b" / "node.toml"):
        assert check_file(config).errors == [], config

    assert main(["demo", "--data", str(data), "--setup-only", *SMALL]) == 0
    second = capsys.readouterr().out
    assert "generating" not in second and "test PKI" not in second
    assert "0 added, 0 updated" in second
    assert "0 report versions stored" in second
    assert demo_account_names(b.database.url) == ["anne", "luc"]  # made once, kept


def test_totp_prints_the_current_code_of_a_demo_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "demo"
    assert main(["demo", "--data", str(data), "--totp", "anne"]) == 2  # no demo there yet
    assert "run `ncp demo` first" in capsys.readouterr().err
    assert main(["demo", "--data", str(data), "--setup-only", *SMALL]) == 0
    capsys.readouterr()
    assert main(["demo", "--data", str(data), "--totp", "anne"]) == 0
    code = capsys.readouterr().out.strip()
    b = load_settings(data / "country-b" / "node.toml")
    engine = make_engine(b.database.url)
    try:
        with session_factory(engine)() as session:
            account = session.scalars(select(HpAccount).where(HpAccount.username == "anne")).one()
            secret = account.totp_secret
    finally:
        engine.dispose()
    assert secret is not None and pyotp.TOTP(secret).verify(code, valid_window=1)
    assert main(["demo", "--data", str(data), "--totp", "mallory"]) == 2


# -- the pair, walked ----------------------------------------------------------------------------


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (each service leads its own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _ncp(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ncp", *args], capture_output=True, text=True, timeout=timeout
    )


def _ncp_json(*args: str) -> Any:
    done = _ncp(*args)
    assert done.returncode == 0, (args, done.stderr[-3000:])
    return json.loads(done.stdout)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, html[:2000]
    return found[1]


def _portal_login(web: httpx.Client, login: dict[str, str]) -> None:
    """Password, then the TOTP code of the login's secret, as a browser posts the forms."""
    page = web.get("/login")
    assert page.status_code == 200, page.text[:2000]
    answer = web.post(
        "/login",
        data={
            "username": login["username"],
            "password": login["password"],
            "csrf_token": _csrf(page.text),
        },
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/login/totp", answer.text
    page = web.get("/login/totp")
    code = pyotp.TOTP(login["totp_secret"]).now()
    answer = web.post("/login/totp", data={"code": code, "csrf_token": _csrf(page.text)})
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text


def test_the_pair_walks_the_use_case_through_b_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    started = time.monotonic()
    proc, lines = _demo(["demo", "--data", str(data), "--base-port", "0", "--no-browser", *SMALL])
    try:
        seen = _wait_for(lines, READY_LINE, START_TIMEOUT)
        print(f"the pair was ready {time.monotonic() - started:.1f} s after `ncp demo` started")
        ready = {line.split()[1]: line.split()[2] for line in seen if line.startswith("ready: ")}
        demo = json.loads((data / "demo.json").read_text(encoding="utf-8"))
        services = {s["name"]: s for s in demo["services"]}
        assert set(services) == {"node-a", "edge-a", "node-b"}
        assert set(services["node-a"]["urls"]) == {"standard", "dicomweb", "viewer", "ops"}
        assert set(services["edge-a"]["urls"]) == {"dicomweb", "ops"}
        assert set(services["node-b"]["urls"]) == {"standard", "portal", "ops"}
        for name, service in services.items():
            for kind, url in service["urls"].items():
                assert ready[f"{name}.{kind}"] == url
        for country in ("AT", "BE"):
            node = demo["nodes"][country]
            for key in ("config", "ca_certificate", "server_certificate", "server_key",
                        "client_certificate", "client_key", "jwks", "trust_list"):  # fmt: skip
                assert Path(node[key]).is_file(), (country, key)
        a_urls, b_node = demo["nodes"]["AT"]["urls"], demo["nodes"]["BE"]
        patient = demo["patient"]
        ref = f"{patient['system']}|{patient['id']}"
        b_config, hp = b_node["config"], b_node["hp"]
        ask = ["ask", "--config", b_config, "--peer", "AT", "--hp", hp, "--json"]
        for service in services.values():  # every operations listener: alive and ready
            assert httpx.get(service["urls"]["ops"] + "/readyz", trust_env=False).status_code == 200

        # 1. The HP logs in to B's portal: password, then the TOTP code of the demo login.
        to_b = ssl.create_default_context(cafile=b_node["ca_certificate"])
        login = demo["portal"]["accounts"][0]
        with httpx.Client(verify=to_b, base_url=b_node["portal"], timeout=30) as web:
            _portal_login(web, login)
            account = web.get("/account")
            assert account.status_code == 200 and login["name"] in account.text

        # 2. Identify the patient at A (B's peer client, $match).
        match = _ncp_json(*ask, "match", "--identifier", ref, "--family", patient["family"],
                          "--birth-date", patient["birth_date"])  # fmt: skip
        assert match["outcome"] in ("certain", "probable"), match
        assert match["candidates"][0]["patient"] == {"system": patient["system"],
                                                     "value": patient["id"]}  # fmt: skip

        # 3. The metadata list, 4. a report.
        listed = _ncp_json(*ask, "list", "--patient", ref)
        studies = [s["study_uid"] for s in listed["studies"]]
        assert len(studies) == patient["studies"] and patient["newest_study"] in studies
        report_id = listed["reports"][0]["report_id"]
        report = _ncp_json(*ask, "report", "--patient", ref, report_id)
        assert report["report_id"] == report_id and report["sections"]

        # 5. Pulls by option A (A's gateway) and C (A's edge gateway), stored in B's store.
        for option, study in (("A", studies[0]), ("C", studies[1])):
            job = _ncp_json("pull", "--config", b_config, "--peer", "AT", "--patient", ref,
                            "--study", study, "--option", option, "--json")  # fmt: skip
            assert job["status"] == "stored" and job["option"] == option, job
            stored = Path(b_node["store"]) / study
            assert len(list(stored.glob("*/*.dcm"))) == job["progress"]["instances_total"] > 0
        # Node B's own workers (a role of its ncp serve) take a job nobody runs here.
        pull = ["pull", "--config", b_config, "--peer", "AT", "--patient", ref]
        queued = _ncp_json(*pull, "--study", studies[2], "--option", "C", "--no-wait", "--json")
        deadline = time.monotonic() + 120
        while (job := _ncp_json("jobs", "show", "--config", b_config, queued["id"], "--json"))[
            "status"
        ] not in ("stored", "failed", "declined"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "stored", job
        engine = make_engine(b_node["database"])
        try:
            with session_factory(engine)() as session:
                claims = session.scalars(
                    select(RetrievalEvent.worker)
                    .where(RetrievalEvent.job_id == queued["id"])
                    .where(RetrievalEvent.status == "downloading")
                ).all()
        finally:
            engine.dispose()
        node_b_pid = services["node-b"]["pid"]
        assert claims and all(f":{node_b_pid}:" in (w or "") for w in claims), claims

        # 6. Option B: A's launch URL, redeemed at A's viewer by the HP's browser.
        grant = _ncp_json(*ask, "access", "--patient", ref, "--study", studies[0], "--option", "B")
        assert grant["url"].startswith(a_urls["viewer"] + "/launch?code=")
        to_a = ssl.create_default_context(cafile=demo["nodes"]["AT"]["ca_certificate"])
        with httpx.Client(verify=to_a, timeout=30) as browser:
            launched = browser.get(grant["url"])
            assert launched.status_code == 303, launched.text[:2000]
            assert "__Host-ncp-viewer" in launched.headers["set-cookie"]
            page = browser.get(httpx.URL(grant["url"]).join(launched.headers["location"]))
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            offered = browser.get(a_urls["viewer"] + "/studies")
            assert offered.status_code == 200, offered.text[:2000]
            assert [s["0020000D"]["Value"][0] for s in offered.json()] == [studies[0]]
            # The code is one-time.
            assert browser.get(grant["url"]).status_code == 403

        # Both nodes' audit chains hold every step, intact.
        for country in ("AT", "BE"):
            verified = _ncp("audit", "verify", "--config", demo["nodes"][country]["config"])
            assert verified.returncode == 0, verified.stdout + verified.stderr

        pids = [s["pid"] for s in demo["services"]]
        assert all(_group_members(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        assert all(_gone(pid) and not _group_members(pid) for pid in pids)
        assert not (data / "demo.json").exists()  # it describes running services only
    finally:
        _stop(proc)


@pytest.mark.orthanc
def test_archive_orthanc_puts_a_local_orthanc_behind_a(tmp_path: Path) -> None:
    import shutil

    if shutil.which("Orthanc", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) is None:
        if os.environ.get("NCP_REQUIRE_SERVICES") == "1":
            pytest.fail("Orthanc is not installed (NCP_REQUIRE_SERVICES=1)")
        pytest.skip("Orthanc is not installed")
    data = tmp_path / "demo"
    args = ["demo", "--data", str(data), "--base-port", "0", "--no-browser", "--archive", "orthanc"]
    proc, lines = _demo([*args, *SMALL])
    try:
        _wait_for(lines, READY_LINE, START_TIMEOUT)
        demo = json.loads((data / "demo.json").read_text(encoding="utf-8"))
        services = {s["name"]: s for s in demo["services"]}
        assert set(services) == {"orthanc-a", "node-a", "edge-a", "node-b"}
        orthanc = services["orthanc-a"]["urls"]["dicomweb"]
        a = load_settings(Path(demo["nodes"]["AT"]["config"]))
        edge = load_edge_settings(Path(demo["edge"]["AT"]["config"]))
        assert a.archive.kind == edge.archive.kind == "dicomweb"
        assert a.archive.url == edge.archive.url == orthanc  # type: ignore[union-attr]
        held = httpx.get(orthanc + "/studies", trust_env=False).json()
        assert len(held) == demo["patient"]["studies"]
        # A study travels from Orthanc through A's edge gateway (option C) to B.
        patient = demo["patient"]
        ref = f"{patient['system']}|{patient['id']}"
        job = _ncp_json("pull", "--config", demo["nodes"]["BE"]["config"], "--peer", "AT",
                        "--patient", ref, "--study", patient["newest_study"], "--option", "C",
                        "--json")  # fmt: skip
        assert job["status"] == "stored", job
        pids = [s["pid"] for s in demo["services"]]
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        assert all(_gone(pid) and not _group_members(pid) for pid in pids)
        assert any((data / "orthanc-a" / "storage").iterdir())  # kept for the next start
    finally:
        _stop(proc)
