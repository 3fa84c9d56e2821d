"""Scale-out: two replicas of node A and two of node B, each country's replicas on one PostgreSQL,
behind a layer-4 load balancer (round robin per connection, TLS ending at the replica); A's
archive Orthanc with its index in PostgreSQL (Debian's ``orthanc-postgresql``).

The replicas run the demo's configs unchanged (``ncp.demo.configs.write_configs``): the database
and the listening ports of each come from ``NCP_*`` environment overrides, as an operator gives
each replica its own; the public URLs in the configs are the balancer's. What is shown:

- both replicas of A answer the same list;
- B's retrieval jobs, taken by the workers of both B replicas, each done once (one claim, every
  instance sent by A once, stored once);
- under concurrent load spread over both replicas of each node at once (lists, image tokens,
  portal logins, new jobs), every answer as expected and one audit chain per node that
  ``ncp audit verify`` proves intact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import func, select

from ncp.audit.models import AuditRecord
from ncp.config import NodeSettings, load_settings
from ncp.consumer.jobs import JobRequest, Requester, Status
from ncp.consumer.wiring import ClientWiring, retrieval_env
from ncp.demo.accounts import ensure_demo_logins
from ncp.demo.configs import Archive, generate_once, write_configs
from ncp.demo.data import TopPatient, index_and_list
from ncp.demo.layout import Layout, Ports, PortTaken, choose_ports
from ncp.fhir.identifiers import patient_system
from ncp.node import Node
from ncp.security.claims import PatientRef
from ncp.security.keystore import KeyStore
from ncp.store.db import make_engine, session_factory
from ncp.store.retrieval import RetrievalEvent
from tests.gateway_support import free_ports
from tests.support.balancer import Balancer
from tests.support.node import PeerSide
from tests.support.orthanc import ENV_REQUIRE, OrthancServer, OrthancUnavailable
from tests.support.postgres import PostgresCluster

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.orthanc,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]
ROOT = Path(__file__).resolve().parents[1]
JOBS = 16
HP = Requester("BE-HP-0042", "Dr. Anne Peeters")


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ports['ops']}"

    def origin(self, listener: str) -> str:
        return f"https://localhost:{self.ports[listener]}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Cluster:
    layout: Layout
    public: Ports
    env_a: dict[str, str]
    env_b: dict[str, str]
    a: list[Replica]
    b: list[Replica]
    balancer: Balancer
    top: TopPatient
    studies: list[str]
    peer: PeerSide
    archive: str
    """What A's replicas read: 'Orthanc with its PostgreSQL index', or why not."""
    stopped: list[Replica] = field(default_factory=list)

    @property
    def patient(self) -> PatientRef:
        return PatientRef(patient_system(self.top.issuer), self.top.patient_id)

    def settings(self, country: str) -> NodeSettings:
        env = self.env_a if country == "AT" else self.env_b
        config = self.layout.node_a_config if country == "AT" else self.layout.node_b_config
        return load_settings(config, environ={**os.environ, **env})

    def a_client(self) -> httpx.Client:
        import ssl

        context = ssl.create_default_context(cafile=str(self.layout.keys_a / "ca.pem"))
        keys = self.layout.keys_b
        context.load_cert_chain(keys / "client.pem", keys / "client.key")
        return httpx.Client(verify=context, timeout=60, trust_env=False)


def _consecutive_ports() -> int:
    for _ in range(50):
        # Below the kernel's ephemeral range (32768 up), from which every outgoing connection
        # of the replicas takes a port that the balancer could then not bind.
        base = random.randrange(20000, 32768 - Ports.count())
        try:
            choose_ports(base)
        except PortTaken:
            continue
        return base
    raise RuntimeError("no free run of ports")


def _start(
    name: str, config: Path, env: dict[str, str], ports: dict[str, int], log: Path
) -> Replica:
    listen = {f"NCP_LISTEN__{k.upper()}_PORT": str(v) for k, v in ports.items()}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ncp", "serve", "--config", str(config)],
            cwd=config.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env, **listen},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Replica(name, process, ports, log)


def _wait_ready(replica: Replica, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert replica.process.poll() is None, f"{replica.name} exited:\n{replica.tail()}"
        try:
            if httpx.get(replica.ops + "/readyz", timeout=3, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{replica.name} not ready:\n{replica.tail()}"
        time.sleep(0.2)


def _stop(replica: Replica) -> int | None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            return replica.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(replica.process.pid, signal.SIGKILL)
            replica.process.wait(30)
            return None
    return replica.process.returncode


def _archive(root: Path, cluster: PostgresCluster) -> tuple[OrthancServer | None, str]:
    """Orthanc with its index in PostgreSQL; without the plugin (outside CI), A reads the
    folder and the test says so."""
    try:
        return OrthancServer.start(index_database=cluster.create_database()), "orthanc"
    except OrthancUnavailable as exc:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"Orthanc with its PostgreSQL index unavailable: {exc}", pytrace=False)
        print(f"A reads the folder archive: {exc}")
        return None, f"folder ({exc})"


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_cluster: PostgresCluster
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scale-out")
    layout = Layout(root / "pair")
    generate_once(layout, patients=2, seed=5, big=40)
    orthanc, archive = _archive(root, postgres_cluster)
    replicas: list[Replica] = []
    balancer = Balancer()
    try:
        source = Archive()
        if orthanc is not None:
            files = sorted(p for p in layout.dicom.rglob("*.dcm"))
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda p: orthanc.upload([p]), files))
            source = Archive("orthanc", dicomweb=orthanc.dicomweb_url)
            archive = f"Orthanc with its index in PostgreSQL ({len(files)} instances)"
        public = Ports(*range(base := _consecutive_ports(), base + Ports.count()))
        write_configs(layout, public, source)
        env_a = {"NCP_DATABASE__URL": postgres_cluster.create_database()}
        env_b = {
            "NCP_DATABASE__URL": postgres_cluster.create_database(),
            "NCP_RETRIEVAL__POLL_S": "0.2",
        }
        environ = {**os.environ}
        # A's index and reports, B's schema and portal logins: before any replica starts, so
        # that no two replicas race to migrate (docs/operations.md, upgrading).
        top = index_and_list(load_settings(layout.node_a_config, environ={**environ, **env_a}))
        b_settings = load_settings(layout.node_b_config, environ={**environ, **env_b})
        engine = make_engine(b_settings.database.url)
        try:
            from ncp.store.db import migrate

            migrate(engine)
            ensure_demo_logins(session_factory(engine), "demo")
        finally:
            engine.dispose()
        for i in range(2):
            listeners_a = ("standard", "imaging", "viewer", "ops")
            ports_a = dict(zip(listeners_a, free_ports(4), strict=True))
            replicas.append(
                _start(f"a{i}", layout.node_a_config, env_a, ports_a, root / f"a{i}.log")
            )
            ports_b = dict(zip(("standard", "portal", "ops"), free_ports(3), strict=True))
            replicas.append(
                _start(f"b{i}", layout.node_b_config, env_b, ports_b, root / f"b{i}.log")
            )
        a = [r for r in replicas if r.name.startswith("a")]
        b = [r for r in replicas if r.name.startswith("b")]
        for replica in replicas:
            _wait_ready(replica)
        for front, group, listener in (
            (public.standard, a, "standard"),
            (public.imaging, a, "imaging"),
            (public.viewer, a, "viewer"),
            (public.b_standard, b, "standard"),
            (public.portal, b, "portal"),
        ):
            balancer.add(front, [r.ports[listener] for r in group])
        keys = KeyStore.load(layout.keys_b, country="BE")
        peer = PeerSide("BE", layout.keys_b, keys.current_signing_key(), public.standard_url)
        engine = make_engine(env_a["NCP_DATABASE__URL"])
        try:
            from ncp.store.queries import patient_studies

            with session_factory(engine)() as session:
                studies = [
                    s.study_uid for s in patient_studies(session, top.patient_id, top.issuer)
                ]
        finally:
            engine.dispose()
        yield Cluster(layout, public, env_a, env_b, a, b, balancer, top, studies, peer, archive)
    finally:
        for replica in replicas:
            _stop(replica)
        balancer.close()
        if orthanc is not None:
            orthanc.stop()


def _list(client: httpx.Client, origin: str, cluster: Cluster, kind: str) -> dict[str, Any]:
    ref = cluster.patient
    answer = client.get(
        f"{origin}/fhir/{kind}",
        params={"patient.identifier": f"{ref.system}|{ref.value}", "_count": "1000"},
        headers=cluster.peer.headers(ref),
    )
    assert answer.status_code == 200, answer.text[:2000]
    body: dict[str, Any] = answer.json()
    return body


def test_both_replicas_of_a_answer_the_same_list(cluster: Cluster) -> None:
    print(f"A's replicas read {cluster.archive}")
    if cluster.archive.startswith("Orthanc"):
        archive = cluster.settings("AT").archive
        assert archive.kind == "dicomweb"
    with cluster.a_client() as client:
        for kind in ("DocumentReference", "ImagingStudy"):
            lists = [_list(client, r.origin("standard"), cluster, kind) for r in cluster.a]
            entries = [b["entry"] for b in lists]
            assert entries[0] == entries[1]
            assert lists[0]["total"] == lists[1]["total"] > 0
            # Through the balancer: a new connection each time, both replicas in turn.
            for _ in range(4):
                with cluster.a_client() as fresh:
                    front = cluster.public.url(cluster.public.standard)
                    assert _list(fresh, front, cluster, kind)["entry"] == entries[0]
    served = cluster.balancer.connections[cluster.public.standard]
    assert sorted(served) == sorted(r.ports["standard"] for r in cluster.a)


def _b_node(cluster: Cluster) -> tuple[Node, ClientWiring, Any]:
    node = Node.from_settings(cluster.settings("BE"))
    wiring = ClientWiring(node)
    return node, wiring, retrieval_env(node, wiring.access)


def _a_sent(cluster: Cluster, request_id: str) -> list[str]:
    engine = make_engine(cluster.env_a["NCP_DATABASE__URL"])
    try:
        with session_factory(engine)() as session:
            records = session.scalars(
                select(AuditRecord)
                .where(AuditRecord.request_id == request_id)
                .where(AuditRecord.action == "image-retrieve")
            ).all()
            return [sop for r in records for sop in (r.details or {}).get("instances") or []]
    finally:
        engine.dispose()


def test_bs_replicas_do_each_job_once(cluster: Cluster) -> None:
    node, wiring, env = _b_node(cluster)
    try:
        hp = node.settings.retrieval.cli_hp
        assert hp is not None
        context = wiring.context("AT", hp, cluster.patient, purpose="TREAT", informed=True)
        created = [
            env.jobs.create(HP, context, JobRequest("AT", cluster.patient, (study,))).id
            for study in cluster.studies[:JOBS]
        ]
        deadline = time.monotonic() + 300
        while not all(env.jobs.get(j).ended for j in created):
            assert time.monotonic() < deadline, [env.jobs.get(j).status for j in created]
            time.sleep(0.25)
        views = [env.jobs.get(j) for j in created]
        with env.sessions() as session:
            claims = session.execute(
                select(RetrievalEvent.job_id, RetrievalEvent.worker)
                .where(RetrievalEvent.job_id.in_(created))
                .where(RetrievalEvent.status == "downloading")
            ).all()
    finally:
        env.close()
        wiring.close()
        node.close()
    assert all(v.status == Status.STORED for v in views), [(v.status, v.reason) for v in views]
    for view in views:
        assert [e.status for e in view.history] == ["queued", "downloading", "verifying", "stored"]
        sent = _a_sent(cluster, view.request_id)
        assert len(sent) == len(set(sent)) == view.instances_total > 0
    assert Counter(job for job, _ in claims) == Counter(created)  # one claim each
    pids = {str(r.process.pid) for r in cluster.b}
    took = {w.split(":")[1] for _, w in claims}
    assert took == pids, (took, pids)  # the workers of both replicas took jobs


def _portal_login(cluster: Cluster, username: str) -> int:
    import re
    import ssl

    context = ssl.create_default_context(cafile=str(cluster.layout.keys_b / "ca.pem"))
    engine = make_engine(cluster.env_b["NCP_DATABASE__URL"])
    try:
        logins = ensure_demo_logins(session_factory(engine), "demo")
    finally:
        engine.dispose()
    [login] = [x for x in logins if x.username == username]
    base = cluster.public.portal_url
    with httpx.Client(verify=context, base_url=base, timeout=60, trust_env=False) as web:
        page = web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None, page.text[:1000]
        data = {"username": username, "password": login.password, "csrf_token": csrf[1]}
        answer = web.post("/login", data=data)
        if answer.status_code != 303:
            return answer.status_code
        page = web.get("/login/totp")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        code = pyotp.TOTP(login.totp_secret).now()
        answer = web.post("/login/totp", data={"code": code, "csrf_token": csrf[1]})
        assert answer.status_code == 303, answer.text[:1000]
        return web.get("/account").status_code


def _standard_requests(replica: Replica) -> float:
    text = httpx.get(replica.ops + "/metrics", timeout=10, trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ncp_http_request_duration_seconds_count{") and (
            'listener="standard"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _verify(cluster: Cluster, country: str) -> subprocess.CompletedProcess[str]:
    config = cluster.layout.node_a_config if country == "AT" else cluster.layout.node_b_config
    env = cluster.env_a if country == "AT" else cluster.env_b
    return subprocess.run(
        [sys.executable, "-m", "ncp", "audit", "verify", "--config", str(config)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_one_audit_chain_per_node_stays_intact_under_load_on_both_replicas(
    cluster: Cluster,
) -> None:
    before = [_standard_requests(r) for r in cluster.a]
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    fronts = [cluster.public.url(cluster.public.standard)] + [
        r.origin("standard") for r in cluster.a
    ]

    def a_load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            origin = fronts[n % len(fronts)]
            with cluster.a_client() as client:  # a new connection: the balancer moves on
                try:
                    if n % 5 == 4:
                        body = {
                            "resourceType": "Parameters",
                            "parameter": [
                                {"name": "study", "valueString": cluster.studies[n % 10]},
                                {"name": "option", "valueCode": "A"},
                                {"name": "purpose", "valueCode": "TREAT"},
                            ],
                        }
                        answer = client.post(
                            f"{origin}/fhir/$imaging-access",
                            json=body,
                            headers=cluster.peer.headers(cluster.patient),
                        )
                        key = f"access {answer.status_code}"
                    else:
                        _list(client, origin, cluster, "DocumentReference")
                        key = "list 200"
                except (httpx.HTTPError, AssertionError) as exc:
                    key = f"error {type(exc).__name__}: {str(exc)[:200]}"
            with lock:
                outcomes[key] += 1
            n += 1

    node, wiring, env = _b_node(cluster)
    try:
        hp = node.settings.retrieval.cli_hp
        assert hp is not None
        context = wiring.context("AT", hp, cluster.patient, purpose="TREAT", informed=True)
        with ThreadPoolExecutor(9) as pool:
            loads = [pool.submit(a_load, i) for i in range(6)]
            # B: new jobs (B's audit from this process and both replicas' workers) and portal
            # logins through the balancer, at the same time.
            created = [
                env.jobs.create(
                    HP,
                    context,
                    JobRequest("AT", cluster.patient, (study,), priority="emergency"),
                ).id
                for study in cluster.studies[JOBS : JOBS + 8]
            ]
            logins = [pool.submit(_portal_login, cluster, name) for name in ("anne", "luc")]
            failed = pool.submit(_portal_login_wrong, cluster)
            deadline = time.monotonic() + 300
            while not all(env.jobs.get(j).ended for j in created):
                assert time.monotonic() < deadline
                time.sleep(0.25)
            time.sleep(2)
            stop.set()
            for f in loads:
                f.result()
            assert [f.result() for f in logins] == [200, 200]
            assert failed.result() == 200
        assert all(env.jobs.get(j).status == Status.STORED for j in created)
    finally:
        stop.set()
        env.close()
        wiring.close()
        node.close()
    assert set(outcomes) == {"list 200", "access 200"}, outcomes
    assert sum(outcomes.values()) > 20, outcomes
    after = [_standard_requests(r) for r in cluster.a]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert len(cluster.balancer.connections[cluster.public.portal]) == 2  # both B replicas

    for country in ("AT", "BE"):
        verified = _verify(cluster, country)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        engine = make_engine(cluster.settings(country).database.url)
        try:
            with session_factory(engine)() as session:
                count = session.scalar(select(func.count()).select_from(AuditRecord))
                top = session.scalar(select(func.max(AuditRecord.seq)))
        finally:
            engine.dispose()
        assert count == top and count is not None and count > 50, (country, count, top)


def _portal_login_wrong(cluster: Cluster) -> int:
    """A failed login (audited as such), then the login page again."""
    import re
    import ssl

    context = ssl.create_default_context(cafile=str(cluster.layout.keys_b / "ca.pem"))
    base = cluster.public.portal_url
    with httpx.Client(verify=context, base_url=base, timeout=60, trust_env=False) as web:
        page = web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        data = {"username": "anne", "password": f"wrong-{uuid.uuid4()}", "csrf_token": csrf[1]}
        answer = web.post("/login", data=data)
        assert answer.status_code in (200, 401), answer.status_code
        return web.get("/login").status_code
