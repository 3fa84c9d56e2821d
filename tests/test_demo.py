"""``ncp demo``: run for real in a subprocess, reached with the test peer's identity, stopped with
Ctrl-C; and its failure paths (a child that dies, a port that is taken)."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
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
import pytest

from ncp.cli import main
from ncp.config import load_edge_settings, load_settings
from ncp.security.keystore import load_certificates
from ncp.security.trust import TrustList

SMALL = ["--patients", "1", "--seed", "3", "--big-patient-studies", "4"]
RUNNING = "running; Ctrl-C stops every service"
START_TIMEOUT = 90.0


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
        if line == wanted:
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


def test_demo_serves_node_a_to_the_test_peer_and_stops_everything_on_ctrl_c(
    tmp_path: Path,
) -> None:
    data = tmp_path / "demo"
    proc, lines = _demo(["demo", "--data", str(data), "--base-port", "0", "--no-browser", *SMALL])
    try:
        seen = _wait_for(lines, RUNNING, START_TIMEOUT)
        ready = {line.split()[1]: line.split()[2] for line in seen if line.startswith("ready: ")}
        assert set(ready) == {"node-a.standard", "node-a.imaging", "edge-a"}

        demo = json.loads((data / "demo.json").read_text(encoding="utf-8"))
        services = {s["name"]: s for s in demo["services"]}
        assert set(services) == {"node-a", "edge-a"}
        assert services["node-a"]["urls"]["node-a.standard"] == ready["node-a.standard"]
        node = demo["nodes"]["AT"]
        for key in ("config", "ca_certificate", "server_certificate", "server_key", "trust_list"):
            assert Path(node[key]).is_file(), key
        peer = demo["test_peer"]
        assert peer["country"] == "BE"
        assert Path(peer["signing_key"]).is_file()
        assert peer["audience"] == ready["node-a.standard"]

        # A real mutual TLS request with the B identity demo.json hands out.
        context = ssl.create_default_context(cafile=peer["trust_anchor"])
        context.load_cert_chain(peer["client_certificate"], peer["client_key"])
        with httpx.Client(verify=context, timeout=10) as client:
            answer = client.get(peer["audience"] + "/metadata")
            assert answer.status_code == 200, answer.text
            assert answer.json()["resourceType"] == "CapabilityStatement"
            # The gateways refuse a request without an access token.
            assert client.get(ready["node-a.imaging"] + "/studies").status_code == 401
            assert client.get(ready["edge-a"] + "/studies").status_code == 401
        # Without a client certificate the standard channel refuses at the handshake.
        bare = ssl.create_default_context(cafile=peer["trust_anchor"])
        with httpx.Client(verify=bare, timeout=10) as client, pytest.raises(httpx.TransportError):
            client.get(peer["audience"] + "/metadata")

        # Country B's node pulls the patient's newest study with the command the demo printed.
        [printed] = [line for line in seen if line.startswith("pull:")]
        command = shlex.split(printed.removeprefix("pull:"))
        assert command[:2] == ["ncp", "pull"]
        pulled = subprocess.run(
            [sys.executable, "-m", "ncp", *command[1:], "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        job = json.loads(pulled.stdout)
        assert job["status"] == "stored" and job["hp"]["source"] == "cli"
        stored = Path(demo["country_b"]["BE"]["store"]) / job["studies"][0]["study_uid"]
        assert len(list(stored.glob("*/*.dcm"))) == job["progress"]["instances_total"] > 0

        pids = [s["pid"] for s in demo["services"]]
        assert all(not _gone(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert all(_gone(pid) for pid in pids)
        assert not (data / "demo.json").exists()  # it describes running services only
    finally:
        _stop(proc)


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

    assert main(["demo", "--data", str(data), "--setup-only", *SMALL]) == 0
    second = capsys.readouterr().out
    assert "generating" not in second and "test PKI" not in second
    assert "0 added, 0 updated" in second
    assert "0 report versions stored" in second
