"""Country B's side of the retrieval tests, around a real node A (``tests.support.node``).

Two ways to be B:

- :func:`b_node`: B's node from a config on disk (:func:`write_b_config`) with the real peer client
  (``ncp.consumer.peer``), as ``ncp pull`` and ``ncp jobs work`` assemble it: the fault tests, the
  command tests and the benchmark;
- :func:`b_env`: the job machinery alone around :class:`NodeAPeer`, a small in-test
  ``PeerAccess`` that calls A for real (the token from ``$imaging-access`` over mutual TLS with
  B's signed pair) but takes the manifests from A's own index, and lets a test change a manifest
  or a grant on the way (what A could send wrong): the unit tests of the jobs.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from ncp.audit.record import Auditor
from ncp.config import RetrievalSection
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import Jobs, token_claims
from ncp.consumer.localstore import FolderStore, LocalStore
from ncp.consumer.model import (
    ImageGrant,
    ImageOption,
    ManifestInstance,
    ManifestSeries,
    PeerAccess,
    PeerContext,
    PeerRefused,
    PeerUnreachable,
    Priority,
    StudyManifest,
)
from ncp.fhir.identifiers import issuer_of
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Instance, Patient, Series, Study
from tests.security_support import trust_toml
from tests.support.node import PATIENTS, RunningNode


@dataclass(frozen=True)
class NodeADesc:
    """How to reach a running node A from any process: its database (for the manifests), its
    standard channel and CA, and B's client certificate."""

    database_url: str
    origin: str
    ca_file: str
    client_cert: str
    client_key: str

    @classmethod
    def of(cls, node: RunningNode) -> NodeADesc:
        creds = node.creds["BE"]
        assert creds is not None
        return cls(
            node.node.settings.database.url,
            node.origin,
            str(node.ca_file),
            str(creds[0]),
            str(creds[1]),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NodeADesc:
        return cls(**json.loads(text))


@dataclass
class NodeAPeer:
    """``PeerAccess`` against a running node A (see the module doc). ``calls`` counts the
    requests per method; the hooks may change a grant or a manifest before it is returned."""

    a: NodeADesc
    calls: dict[str, int] = field(default_factory=lambda: {"manifests": 0, "imaging_access": 0})
    grant_hook: Callable[[ImageGrant], ImageGrant] | None = None
    manifest_hook: Callable[[StudyManifest], StudyManifest] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sessions: Any = None

    @classmethod
    def of(cls, node: RunningNode) -> NodeAPeer:
        return cls(NodeADesc.of(node))

    def sessions(self) -> Any:
        with self._lock:
            if self._sessions is None:
                self._sessions = session_factory(make_engine(self.a.database_url))
            return self._sessions

    def manifests(
        self, context: PeerContext, study_uids: Sequence[str]
    ) -> Mapping[str, StudyManifest]:
        with self._lock:
            self.calls["manifests"] += 1
        out: dict[str, StudyManifest] = {}
        with self.sessions()() as session:
            rows = session.execute(
                select(Study, Patient)
                .join(Patient, Study.patient_pk == Patient.id)
                .where(Study.study_uid.in_(list(study_uids)))
            ).all()
            for study, patient in rows:
                if (patient.patient_id, patient.issuer) != (
                    context.patient.value,
                    issuer_of(context.patient.system),
                ):
                    raise PeerRefused(context.peer, 403, f"study {study.study_uid} refused")
                series_rows = session.scalars(
                    select(Series).where(Series.study_pk == study.id).order_by(Series.number)
                ).all()
                series = []
                for s in series_rows:
                    instances = session.scalars(
                        select(Instance)
                        .where(Instance.series_pk == s.id)
                        .order_by(Instance.instance_number, Instance.sop_uid)
                    ).all()
                    series.append(
                        ManifestSeries(
                            series_uid=s.series_uid,
                            modality=s.modality,
                            instances=tuple(
                                ManifestInstance(
                                    sop_instance_uid=i.sop_uid,
                                    sop_class_uid=i.sop_class_uid,
                                    number=i.instance_number,
                                    frames=i.number_of_frames,
                                    size=i.size_bytes,
                                )
                                for i in instances
                            ),
                        )
                    )
                manifest = StudyManifest(
                    study_uid=study.study_uid,
                    patient=context.patient,
                    series=tuple(series),
                    size=study.size_bytes,
                )
                if self.manifest_hook is not None:
                    manifest = self.manifest_hook(manifest)
                out[study.study_uid] = manifest
        return out

    def imaging_access(
        self,
        context: PeerContext,
        study_uids: Sequence[str],
        option: ImageOption,
        priority: Priority,
    ) -> ImageGrant:
        with self._lock:
            self.calls["imaging_access"] += 1
        iua = (token_claims(context.trc).get("extensions") or {}).get("ihe_iua") or {}
        purpose = (iua.get("purpose_of_use") or [{}])[0].get("code", "TREAT")
        params: list[dict[str, Any]] = [{"name": "study", "valueString": uid} for uid in study_uids]
        params += [
            {"name": "option", "valueCode": option},
            {"name": "purpose", "valueCode": purpose},
            {"name": "priority", "valueCode": "stat" if priority == "emergency" else "routine"},
        ]
        headers = {
            "Authorization": f"Bearer {context.hp_assertion}",
            "NCP-Treatment-Relationship": context.trc,
            "X-Request-ID": context.request_id or "test-retrieval",
        }
        context_ssl = ssl.create_default_context(cafile=self.a.ca_file)
        context_ssl.load_cert_chain(self.a.client_cert, self.a.client_key)
        try:
            with httpx.Client(verify=context_ssl, base_url=self.a.origin, timeout=30) as http:
                r = http.post(
                    "/fhir/$imaging-access",
                    json={"resourceType": "Parameters", "parameter": params},
                    headers=headers,
                )
        except httpx.HTTPError as exc:
            raise PeerUnreachable(f"{context.peer}: {exc}") from None
        if r.status_code != 200:
            issues = r.json().get("issue") or [{}]
            raise PeerRefused(context.peer, r.status_code, issues[0].get("diagnostics", ""))
        values = {
            p["name"]: next(v for k, v in p.items() if k.startswith("value"))
            for p in r.json()["parameter"]
        }
        grant = ImageGrant(
            token=values["token"],
            base_url=values["dicomweb"],
            option=option,
            studies=tuple(study_uids),
            expires_at=datetime.fromisoformat(values["expires"].replace("Z", "+00:00")),
        )
        return self.grant_hook(grant) if self.grant_hook else grant


def sign_context(
    node: RunningNode,
    patient: str = "PAT100",
    *,
    purpose: str = "TREAT",
    lifetime: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> PeerContext:
    """An HP assertion and a TRC signed by B's key for A, as B's portal would."""
    moment = now or datetime.now(UTC)
    expires = moment + lifetime
    ref = PATIENTS[patient].ref
    hp = node.b.hp_assertion(now=moment, expires_at=expires)
    trc = node.b.trc(hp, ref, now=moment, expires_at=expires, purpose_of_use=purpose, informed=True)
    return PeerContext(peer="AT", hp_assertion=hp, trc=trc, patient=ref, expires_at=expires)


def b_env(
    root: Path,
    node: RunningNode,
    *,
    peer: PeerAccess | None = None,
    database_url: str | None = None,
    store: LocalStore | None = None,
    clock: Callable[[], datetime] | None = None,
    **settings: Any,
) -> RetrievalEnv:
    """Country B's retrieval machinery (BE) with its own database and a folder store under
    ``root``, calling ``node`` (A) through ``peer`` (a :class:`NodeAPeer` by default)."""
    root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url or f"sqlite:///{root / 'node-b.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    values: dict[str, Any] = {
        "store": {"kind": "folder", "path": str(root / "retrieved")},
        "staging": str(root / "retrieved" / ".incoming"),
        "poll_s": 0.1,
        "retry_backoff_s": 0.1,
        **settings,
    }
    section = RetrievalSection.model_validate(values)
    access = peer or NodeAPeer.of(node)
    jobs = Jobs(sessions, Auditor(sessions, country="BE"), **({"clock": clock} if clock else {}))
    return RetrievalEnv(
        jobs=jobs,
        settings=section,
        store=store or FolderStore(root / "retrieved"),
        peers=lambda country: access,
        imaging_tls=lambda country: ssl.create_default_context(cafile=node.ca_file),
        local_issuer="2.16.56.1.1.1",
    )


# -- a node B on disk, for the commands ------------------------------------------------------------


def write_b_config(
    root: Path,
    node: RunningNode,
    *,
    database_url: str | None = None,
    leeway_s: int = 30,
    **retrieval: Any,
) -> Path:
    """Country B's node (BE) on disk, as an operator writes it: its config (SQLite unless
    ``database_url``, folder store, ``[consumer] peers = ["AT"]``, the CLI's HP) and a trust list
    naming A; ``retrieval`` sets ``[retrieval]`` keys."""
    root.mkdir(parents=True, exist_ok=True)
    a_keys = node.node.settings.keys.dir
    trust = root / "trust.toml"
    trust.write_text(
        trust_toml(
            {
                "AT": {
                    "standard": node.url,
                    "imaging": node.imaging_url or "",
                    "tls_ca": str(a_keys / "ca.pem"),
                    "jwks_file": str(a_keys / "jwks.json"),
                }
            }
        )
    )
    values: dict[str, Any] = {
        "store": {"kind": "folder", "path": str(root / "retrieved")},
        "poll_s": 0.1,
        "retry_backoff_s": 0.2,
        "cli_hp": {
            "id": "BE-HP-0042",
            "name": "Dr. Anne Peeters",
            "organisation": "UZ Leuven",
            "organisation_id": "urn:oid:2.16.56.1.1.1.1",
            "point_of_care": "Radiology",
        },
        **retrieval,
    }
    default_db = f"sqlite:///{root / 'node-b.db'}"
    lines = [
        "[node]",
        'country = "BE"',
        'patient_id_issuer = "2.16.56.1.1.1"',
        "[urls]",
        'standard = "https://localhost:1/fhir"',
        "[database]",
        f'url = "{database_url or default_db}"',
        "[tokens]",
        f"leeway_s = {leeway_s}",
        "[consumer]",
        'peers = ["AT"]',
        "[archive]",
        'kind = "folder"',
        f'path = "{root / "archive"}"',
        "[keys]",
        f'dir = "{node.b.keys_dir}"',
        "[trust]",
        f'list = "{trust}"',
        "[retrieval]",
    ]
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"[retrieval.{key}]")
            tables += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path = root / "node.toml"
    path.write_text("\n".join(lines + tables) + "\n")
    return path


@dataclass
class NodeB:
    """Country B's node from its config, with the real peer client and the retrieval machinery
    (what ``ncp pull`` and ``ncp jobs work`` assemble)."""

    config: Path
    node: Any
    wiring: Any
    env: RetrievalEnv

    def context(self, patient: str = "PAT100", *, purpose: str = "TREAT") -> PeerContext:
        """B signs its CLI HP's pair for ``patient`` (the real signer of the peer client)."""
        hp = self.node.settings.retrieval.cli_hp
        assert hp is not None
        return self.wiring.context("AT", hp, PATIENTS[patient].ref, purpose=purpose, informed=True)

    def close(self) -> None:
        self.env.close()
        self.wiring.close()
        self.node.close()


def b_node(root: Path, node: RunningNode, **config: Any) -> NodeB:
    """:func:`write_b_config`, then the node as the commands build it (the caller closes it)."""
    from ncp.config import load_settings
    from ncp.consumer.wiring import ClientWiring, retrieval_env
    from ncp.node import Node

    path = write_b_config(root, node, **config)
    made = Node.from_settings(load_settings(path))
    wiring = ClientWiring(made)
    return NodeB(path, made, wiring, retrieval_env(made, wiring.access))
