"""Fuzzing every route of a node from the OpenAPI documents it publishes (schemathesis), and the
JSON shapes of ``$match`` and ``$imaging-access`` bodies (hypothesis) (issue 13, item 9).

A real node A on loopback, called as country B calls it: B's client certificate, a valid HP
assertion and TRC pair on the standard channel, a valid option A token on the gateway. For every
generated request, valid and invalid (schemathesis' positive and negative modes): no 500, and
every refusal (4xx) has its audit record in A's chain, found by its ``X-Request-ID``.

Bounded: ``NCP_FUZZ_EXAMPLES`` examples per operation and mode (default 20; a few minutes on a
loaded 2-core machine for both channels).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlalchemy import select

from ncp.audit.chain import verify
from ncp.audit.models import AuditRecord
from ncp.fhir.http import FhirHttpError
from ncp.provider import access, match
from tests.support.node import B, RunningNode, running_node, studies_of

EXAMPLES = int(os.environ.get("NCP_FUZZ_EXAMPLES", "20"))
STUDY = studies_of("PAT100")[0]
SERIES = f"{STUDY}.1"
INSTANCE = f"{SERIES}.1"
_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node of this module's own: fuzzing writes thousands of audit records."""
    with running_node(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def _session(node: RunningNode, client_cert: bool) -> requests.Session:
    session = requests.Session()
    # The environment may set REQUESTS_CA_BUNDLE, which would override verify (components.md).
    session.trust_env = False
    session.verify = str(node.ca_file)
    if client_cert:
        creds = node.creds[B]
        assert creds is not None
        session.cert = (str(creds[0]), str(creds[1]))
    return session


class Calls:
    """The requests made and the refusals among them (status, request id, what was sent)."""

    def __init__(self) -> None:
        self.count = 0
        self.refusals: list[tuple[int, str, str]] = []
        self.statuses: dict[int, int] = {}

    def record(self, response: Any, rid: str, what: str) -> None:
        self.count += 1
        status = int(response.status_code)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, f"{what}: {status} {response.text[:500]}"
        if status >= 400:
            # A refusal below the application (a head too large to read) cannot know the
            # X-Request-ID sent; its answer names the id its record is kept under.
            answered = response.headers.get("x-request-id") or [rid]  # schemathesis: lists
            self.refusals.append((status, answered if isinstance(answered, str) else answered[0],
                                  what))  # fmt: skip


def _fuzz(
    schema: Any,
    base_url: str,
    session: requests.Session,
    headers: Callable[[], dict[str, str]],
    calls: Calls,
    fixed: Callable[[Any], list[dict[str, str]]] = lambda op: [],
) -> None:
    """Every operation of ``schema``, in both generation modes (and with the ``fixed`` path
    parameters, so that some requests name what exists), each case sent once."""
    for result in schema.get_all_operations():
        operation = result.ok()
        variants: list[tuple[GenerationMode, dict[str, str] | None]] = [
            (GenerationMode.POSITIVE, None),
            (GenerationMode.NEGATIVE, None),
            *((GenerationMode.POSITIVE, path) for path in fixed(operation)),
        ]
        for mode, path in variants:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path)
            with contextlib.suppress(Unsatisfiable):  # no negative case for this operation
                _send_all(strategy, mode.value, base_url, session, headers, calls)


def _send_all(
    strategy: Any,
    label: str,
    base_url: str,
    session: requests.Session,
    headers: Callable[[], dict[str, str]],
    calls: Calls,
) -> None:
    @_SETTINGS
    @given(case=strategy)
    def send(case: Any) -> None:
        rid = f"fuzz-{uuid.uuid4()}"
        what = f"{case.method} {case.formatted_path} ({label})"
        response = case.call(
            base_url=base_url,
            session=session,
            headers={**headers(), "X-Request-ID": rid},
            timeout=60,
            # schemathesis sets verify itself: the session's would not be used.
            verify=session.verify,
            cert=session.cert,
        )
        calls.record(response, rid, what)

    send()


def _assert_every_refusal_audited(node: RunningNode, calls: Calls) -> None:
    # Refusals below the application are recorded on a worker thread, after the answer: the
    # last of them may be a moment late.
    deadline = time.monotonic() + 15
    while True:
        with node.node.sessions() as session:
            audited = set(session.scalars(select(AuditRecord.request_id)))
            assert verify(session).ok
        unaudited = [(s, what) for s, rid, what in calls.refusals if rid not in audited]
        if not unaudited or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not unaudited, f"{len(unaudited)} refusals left no record: {unaudited[:10]}"


def test_every_route_of_the_standard_channel(node: RunningNode) -> None:
    session = _session(node, client_cert=True)
    document = session.get(f"{node.origin}/fhir/openapi.json", timeout=30)
    assert document.status_code == 200
    schema = schemathesis.openapi.from_dict(document.json())
    hp = node.b.hp_assertion()
    trc = node.b.trc(hp, "PAT100")

    def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {hp}", "NCP-Treatment-Relationship": trc}

    calls = Calls()
    _fuzz(schema, node.origin, session, headers, calls)
    print("standard channel:", calls.count, "requests, statuses", calls.statuses)
    assert calls.count >= len(document.json()["paths"]) * EXAMPLES
    _assert_every_refusal_audited(node, calls)


def _gateway_token(node: RunningNode) -> str:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            *({"name": "study", "valueString": uid} for uid in studies_of("PAT100")),
            {"name": "option", "valueCode": "A"},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }
    with node.client() as http:
        answer = http.post("/fhir/$imaging-access", json=body, headers=node.b.headers("PAT100"))
    assert answer.status_code == 200, answer.text
    return str(next(p["valueString"] for p in answer.json()["parameter"] if p["name"] == "token"))


def test_every_route_of_the_gateway(node: RunningNode) -> None:
    assert node.imaging_url is not None
    origin = node.imaging_url.rsplit("/dicomweb", 1)[0]
    session = _session(node, client_cert=False)
    document = session.get(f"{node.imaging_url}/openapi.json", timeout=30)
    assert document.status_code == 200
    schema = schemathesis.openapi.from_dict(document.json())
    token = _gateway_token(node)

    def fixed(operation: Any) -> list[dict[str, str]]:
        names = {p.name for p in operation.path_parameters}
        known = {"study": STUDY, "series": SERIES, "instance": INSTANCE, "frames": "1"}
        if not names or not names <= set(known):
            return []
        return [{name: known[name] for name in names}]

    calls = Calls()
    _fuzz(schema, origin, session, lambda: {"Authorization": f"Bearer {token}"}, calls, fixed)
    print("gateway:", calls.count, "requests, statuses", calls.statuses)
    assert calls.statuses.get(200), calls.statuses  # some requests named what the token covers
    _assert_every_refusal_audited(node, calls)


# --- hypothesis: the JSON shapes of the operations' bodies --------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["resource", "study", "option", "purpose", "priority", "count", "onlyCertainMatches",
     "Patient", "Parameters", "A", "TREAT", STUDY, "1980-05-17", "PAT100"]
)  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
PARAMETER = st.fixed_dictionaries(
    {"name": JSON_VALUES},
    optional={
        "resource": JSON_VALUES
        | st.fixed_dictionaries(
            {"resourceType": st.just("Patient")},
            optional={
                "identifier": JSON_VALUES,
                "name": JSON_VALUES,
                "birthDate": JSON_VALUES,
                "gender": JSON_VALUES,
            },
        ),
        "valueString": JSON_VALUES,
        "valueCode": JSON_VALUES,
        "valueBoolean": JSON_VALUES,
        "valueInteger": JSON_VALUES,
    },
)
BODIES = st.fixed_dictionaries(
    {"resourceType": st.just("Parameters") | JSON_VALUES},
    optional={"parameter": st.lists(PARAMETER | JSON_VALUES, max_size=5) | JSON_VALUES},
)


@settings(max_examples=500, deadline=None)
@given(body=BODIES)
def test_any_json_shape_of_a_match_body_is_read_or_refused_with_a_4xx(body: Any) -> None:
    try:
        match.parse_parameters(body)
    except FhirHttpError as exc:
        assert 400 <= exc.status < 500
        assert exc.outcome()["issue"][0]["diagnostics"]


@settings(max_examples=500, deadline=None)
@given(body=BODIES)
def test_any_json_shape_of_an_access_body_is_read_or_refused_with_a_4xx(body: Any) -> None:
    try:
        asked = access.parse_parameters(body)
    except FhirHttpError as exc:
        assert 400 <= exc.status < 500
        assert exc.outcome()["issue"][0]["diagnostics"]
    else:
        assert asked.studies and all(isinstance(uid, str) for uid in asked.studies)


@pytest.mark.parametrize("route", ["/fhir/Patient/$match", "/fhir/$imaging-access"])
def test_any_json_shape_over_the_wire_is_answered_and_audited(
    node: RunningNode, route: str, tmp_path: Path
) -> None:
    calls = Calls()
    hp = node.b.hp_assertion()
    headers = {
        "Authorization": f"Bearer {hp}",
        "NCP-Treatment-Relationship": node.b.trc(hp, "PAT100"),
        "Content-Type": "application/fhir+json",
    }
    with node.client() as http:

        @settings(max_examples=EXAMPLES * 3, deadline=None, database=None)
        @given(body=BODIES, surrogate=st.booleans())
        def post(body: Any, surrogate: bool) -> None:
            text = json.dumps(body)
            if surrogate:  # a lone surrogate, as JSON can write it
                text = text.replace('"', '"\\ud800', 1)
            rid = f"shape-{uuid.uuid4()}"
            answer: httpx.Response = http.post(
                route, content=text.encode(), headers={**headers, "X-Request-ID": rid}
            )
            calls.record(answer, rid, text[:200])
            if answer.status_code >= 400:
                assert answer.json()["resourceType"] == "OperationOutcome"

        post()
    _assert_every_refusal_audited(node, calls)
