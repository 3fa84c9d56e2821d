"""``ncp demo``: the pair run for real in a subprocess and the use case walked through country
B's portal as a browser posts its forms (cookies, CSRF tokens read from the pages, the links the
pages give): login with a demo login's TOTP, identify the demo patient at AT, confirm the
treatment relationship, the list as its page serves it, a report, pulls by options A and C run
by node B's own workers and seen stored on their job pages and in B's local viewer, option B's
launch redeemed once at A's viewer, the HP's audit view; both audit chains verified, then
stopped with Ctrl-C leaving no process behind. Also its failure paths (a child that dies, a
port that is taken), ``--setup-only`` and ``--totp``. The same pages in Chromium, with their
scripts, are tested against a pair in ``tests/test_portal_pair.py``."""

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
from html import unescape
from pathlib import Path
from typing import IO, Any

import httpx
import pyotp
import pytest
from sqlalchemy import select

from ncp.cli import main
from ncp.config import load_edge_settings, load_settings
from ncp.demo import READY_LINE
from ncp.fhir.identifiers import patient_system
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
    # The HP types A's patient number as the demo prints it: the portal knows A's system.
    assert b.portal.identifier_systems == {"AT": patient_system(node.node.patient_id_issuer)}
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


def _text(html: str) -> str:
    """What a page says, as the HP reads it: the tags gone, the entities read, spaces folded."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def _element(html: str, pattern: str) -> str:
    """The HTML of the first element ``pattern`` (a regular expression) finds."""
    found = re.search(pattern, html, re.S)
    assert found is not None, (pattern, _text(html)[:2000])
    return found[0]


def _h1(html: str) -> str:
    return _text(_element(html, r"<h1[^>]*>.*?</h1>"))


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


def _job_page_ended(web: httpx.Client, url: str, timeout: float = 120) -> str:
    """The job's page once it says the job ended (its script polls, then loads it again)."""
    deadline = time.monotonic() + timeout
    while True:
        page = web.get(url)
        assert page.status_code == 200, _text(page.text)[:2000]
        status = re.search(r'id="job-status" class="([^"]+)"', page.text)
        assert status is not None, page.text[:2000]
        if {"job-stored", "job-failed", "job-declined"} & set(status[1].split()):
            return page.text
        assert time.monotonic() < deadline, _text(page.text)[:2000]
        time.sleep(0.5)


def _worker_claims(database: str, job_ids: list[str]) -> list[str | None]:
    """The workers (``host:pid:...``) that moved these jobs to downloading."""
    engine = make_engine(database)
    try:
        with session_factory(engine)() as session:
            return list(
                session.scalars(
                    select(RetrievalEvent.worker)
                    .where(RetrievalEvent.job_id.in_(job_ids))
                    .where(RetrievalEvent.status == "downloading")
                )
            )
    finally:
        engine.dispose()


def _audit_rows(html: str) -> list[tuple[str, str, str]]:
    """The audit view's rows: what was done, what was asked, its outcome (without the reason)."""
    body = _element(html, r'<table class="simple audit">.*?</table>')
    rows = re.findall(r'<tr>\s*<td>.*?</td>\s*<td>(.*?)</td>\s*<td class="asked">(.*?)</td>'
                      r'\s*<td><span class="outcome[^"]*">(.*?)</span>', body, re.S)  # fmt: skip
    return [(_text(what), _text(asked), _text(outcome)) for what, asked, outcome in rows]


def test_the_pair_walks_the_use_case_through_b_s_portal_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
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
        for service in services.values():  # every operations listener: alive and ready
            assert httpx.get(service["urls"]["ops"] + "/readyz", trust_env=False).status_code == 200

        # The command line the demo's guide prints asks A too, as B's configured HP (hp.toml):
        # its records are not the portal HP's, and the audit view below leaves them out.
        ref = f"{patient['system']}|{patient['id']}"
        match = _ncp_json("ask", "--config", b_node["config"], "--peer", "AT", "--hp",
                          b_node["hp"], "--json", "match", "--identifier", ref, "--family",
                          patient["family"], "--birth-date", patient["birth_date"])  # fmt: skip
        assert match["outcome"] == "certain", match

        to_b = ssl.create_default_context(cafile=b_node["ca_certificate"])
        login = demo["portal"]["accounts"][0]
        portal = httpx.Client(verify=to_b, base_url=b_node["portal"], timeout=60, trust_env=False)
        with portal as web:
            # 1. The HP logs in to B's portal: password, then the TOTP code of the demo login.
            _portal_login(web, login)
            account = web.get("/account")
            assert account.status_code == 200 and login["name"] in _text(account.text)

            # 2. Identify: AT chosen from the form's countries; the identifier as the demo
            # printed it (A's national number, no system), family name and date of birth.
            home = web.get("/")
            choice = _element(home.text, r'<select id="country".*?</select>')
            countries = re.findall(r'<option value="([A-Z]{2})"', choice)
            assert countries == ["AT"], countries
            asked = {"country": countries[0], "identifier": patient["id"],
                     "family": patient["family"], "birth_date": patient["birth_date"]}  # fmt: skip
            identified = web.post("/identify", data={"csrf_token": _csrf(home.text), **asked})
            assert identified.status_code == 200, _text(identified.text)[:2000]
            assert _h1(identified.text) == "Patient identified"
            facts = _text(_element(identified.text, r'<dl class="facts patient-facts">.*?</dl>'))
            assert f"{patient['given']} {patient['family']}" in facts
            assert f"{patient['id']} {patient['system']}" in facts and "certain" in facts
            chosen = re.search(r'name="match" value="([^"]+)"', identified.text)
            assert chosen is not None

            # 3. Confirm the treatment relationship: treatment, the patient informed.
            confirmed = web.post("/confirm", data={
                "csrf_token": _csrf(identified.text), "match": chosen[1], "candidate": "0",
                "purpose": "TREAT", "relationship": "yes", "informed": "yes"})  # fmt: skip
            assert confirmed.status_code == 303, _text(confirmed.text)[:2000]
            list_url = confirmed.headers["location"]
            key = list_url.split("/")[2]
            assert list_url == f"/patients/{key}/list" and patient["id"] not in list_url

            # 4. The list, as its page serves it: every study of the patient, from AT.
            page = web.get(list_url)
            assert page.status_code == 200 and _h1(page.text) == "Studies and reports"
            told = _text(_element(page.text, r'<p class="confirmation.*?</p>'))
            assert told.startswith("Treatment: confirmed until"), told
            model = json.loads(_element(page.text, r'(?<=id="list-model">).*?(?=</script>)'))
            assert model["patient"] == {"display": f"{patient['given']} {patient['family']}",
                                        "identifier": patient["id"]}  # fmt: skip
            rows = {r["id"]: r for r in model["rows"]}
            assert len(rows) == len(model["rows"]) == patient["studies"], list(rows)
            assert patient["newest_study"] in rows
            assert all(r["kind"] == "study" and r["country"] == "AT" for r in rows.values())
            assert all(r["organisation"] and r["description"] for r in rows.values())
            list_token = _csrf(page.text)

            # 5. A report, by the link its study's row gives.
            row = next(r for r in model["rows"] if r["report"])
            report = web.get(row["report"]["url"])
            assert report.status_code == 200, _text(report.text)[:2000]
            assert _h1(report.text) == row["report"]["title"]
            about = _text(_element(report.text, r'<dl class="facts report-facts">.*?</dl>'))
            assert row["report"]["status_display"] in about and "(AT)" in about
            assert re.search(r"· version \d+", about), about
            headings = [_text(h) for h in re.findall(r'<h2 id="sec-\d+">(.*?)</h2>', report.text)]
            assert "Findings" in headings, headings
            assert f'href="{list_url}#study-{row["id"]}"' in report.text  # back to its study

            # 6. Pulls through the portal: the two smallest studies, by options A and C.
            smallest = sorted(rows.values(), key=lambda r: r["size_bytes"] or 0)
            pulls = {"A": smallest[0]["id"], "C": smallest[1]["id"]}
            job_urls = {}
            for option, study in pulls.items():
                asked_for = web.post("/retrieve", data={
                    "csrf_token": list_token, "patient": key, "study": study,
                    "option": option, "priority": "normal"})  # fmt: skip
                assert asked_for.status_code == 303, _text(asked_for.text)[:2000]
                job_urls[option] = asked_for.headers["location"]
                assert re.fullmatch(r"/jobs/[0-9a-f-]{36}", job_urls[option])
            for option, study in pulls.items():
                job_page = _job_page_ended(web, job_urls[option])
                shown = _text(_element(job_page, r'<dl class="facts">.*?</dl>'))
                assert "Status Stored" in shown, shown
                assert {"A": "A: NCPeH gateway", "C": "C: national archive"}[option] in shown
                assert f"{patient['given']} {patient['family']} {patient['id']} (AT)" in shown
                verified = re.search(r"manifest: (\d+) of (\d+) images", shown)
                assert verified is not None and verified[1] == verified[2] != "0", shown
                assert f'href="/viewer/?study={study}"' in job_page  # "Open in viewer"
                job = web.get(f"/api/retrieval{job_urls[option]}").json()
                assert job["status"] == "stored" and job["option"] == option, job
                assert job["hp"] == {"id": login["username"], "name": login["name"],
                                     "source": "portal"}  # fmt: skip
                files = list((Path(b_node["store"]) / study).glob("*/*.dcm"))
                assert len(files) == int(verified[1]) == job["progress"]["instances_total"]
            job_ids = [url.rsplit("/", 1)[1] for url in job_urls.values()]
            listed_jobs = web.get("/jobs").text
            assert all(f'href="/jobs/{job_id}"' in listed_jobs for job_id in job_ids)
            # Node B's own workers (a role of its ncp serve) ran both: nobody else runs jobs here.
            claims = _worker_claims(b_node["database"], job_ids)
            node_b_pid = services["node-b"]["pid"]
            assert len(claims) >= 2 and all(f":{node_b_pid}:" in (w or "") for w in claims), claims

            # B's local viewer, as the portal mounts it: exactly the studies the HP's jobs stored.
            opened = web.get(f"/viewer/?study={pulls['A']}")
            assert opened.status_code == 200 and "text/html" in opened.headers["content-type"]
            deadline = time.monotonic() + 15  # a folder store is scanned again within a second
            while True:
                offered = web.get("/viewer/studies")
                assert offered.status_code == 200, offered.text[:2000]
                held = sorted(s["0020000D"]["Value"][0] for s in offered.json())
                if held == sorted(pulls.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert held == sorted(pulls.values())
            series = web.get(f"/viewer/studies/{pulls['C']}/series")
            assert series.status_code == 200 and series.json(), series.text[:2000]

            # 7. Option B through the portal: its page leads the new tab to A's viewer.
            viewed = next(s for s in rows if s not in pulls.values())
            launch = web.post("/view", data={"csrf_token": list_token, "patient": key,
                                             "study": viewed})  # fmt: skip
            assert launch.status_code == 200 and _h1(launch.text) == "Opening the viewer of AT"
            refresh = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', launch.text)
            button = re.search(r'<a class="button" href="([^"]+)"', launch.text)
            assert refresh is not None and button is not None
            target = unescape(refresh[1])
            assert unescape(button[1]) == target
            assert target.startswith(a_urls["viewer"] + "/launch?code=")
            assert f"studyUID={viewed}" in target

            # 8. The HP's audit view: their own requests, each done; not the command line's.
            audit = web.get("/audit")
            assert audit.status_code == 200
            done = _audit_rows(audit.text)
            assert done and all(outcome == "Done" for _, _, outcome in done), done
            actions = [what for what, _, _ in done]
            for wanted in ("Login", "Patient identification", "Treatment relationship confirmed",
                           "List of studies and reports", "Report read", "Image access",
                           "Retrieval", "Images retrieved", "Images stored",
                           "Viewer of the other country opened"):  # fmt: skip
                assert wanted in actions, (wanted, actions)
            identifications = [a for w, a, _ in done if w == "Patient identification"]
            assert len(identifications) == 1 and f"patient {patient['id']}" in identifications[0]
            retrievals = [a for w, a, _ in done if w == "Retrieval"]
            assert any("option A" in a for a in retrievals), retrievals
            assert any("option C" in a for a in retrievals), retrievals
            launches = [a for w, a, _ in done if w == "Viewer of the other country opened"]
            assert len(launches) == 1 and "option B" in launches[0], launches

        # The HP's browser opens A's launch URL: a session at A's viewer, the code used once.
        to_a = ssl.create_default_context(cafile=demo["nodes"]["AT"]["ca_certificate"])
        with httpx.Client(verify=to_a, timeout=30, trust_env=False) as browser:
            launched = browser.get(target)
            assert launched.status_code == 303, launched.text[:2000]
            assert "__Host-ncp-viewer" in launched.headers["set-cookie"]
            page = browser.get(httpx.URL(target).join(launched.headers["location"]))
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            offered = browser.get(a_urls["viewer"] + "/studies")
            assert offered.status_code == 200, offered.text[:2000]
            assert [s["0020000D"]["Value"][0] for s in offered.json()] == [viewed]
            assert browser.get(target).status_code == 403  # replayed

        # Both nodes' audit chains hold every step, intact.
        for country in ("AT", "BE"):
            verified_chain = _ncp("audit", "verify", "--config", demo["nodes"][country]["config"])
            assert verified_chain.returncode == 0, verified_chain.stdout + verified_chain.stderr

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
