"""Prometheus metrics of a node (``prometheus_client``), served at ``/metrics`` of the operations
listener. Names and labels are documented in docs/operations.md; a test keeps them in step.

Three sources, so that nothing is counted twice and nothing carries patient data:

- HTTP requests, counted per listener by :class:`ncp.ops.observe.ObservedApp`: latency by route
  template (``/fhir/Patient/$match``, ``/dicomweb/studies/{study}/series/{series}``), never by
  raw path, whose UIDs and identifiers would be patient data and an unbounded label set.
- The audit trail: every step the node records (:class:`~ncp.audit.record.Auditor` observers)
  is counted by side, action and outcome; image bytes streamed and access tokens issued and
  refused are read from the same events, exactly what the audit chain says happened. These
  are per process counters; Prometheus sums the replicas.
- The database, read at each scrape (:class:`DatabaseCollector`), so that several replicas on
  one PostgreSQL report the same: the audit chain's length and country B's retrieval jobs by
  state and lane.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import column, func, inspect, select, table
from sqlalchemy.orm import Session, sessionmaker

from ncp.audit.models import Action, AuditChainHead, Outcome, Side
from ncp.audit.record import AuditEvent

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
"""Seconds: the list's goal is 0.2 s at p95, a study's transfer may take minutes."""

_TOKEN_ACTIONS = {Action.ACCESS_TOKEN_ISSUE: "issue", Action.ACCESS_TOKEN_RENEW: "renew"}
_GATEWAY_SIDES = (Side.GATEWAY, Side.EDGE)

RETRIEVAL_JOBS = table("retrieval_job", column("status"), column("priority"))
"""Country B's job table as the retrieval jobs define it (``ncp.store.retrieval``): read by
name, so the metric needs nothing of the jobs' code and reports nothing where it is absent."""


class Metrics:
    """The metrics of one process: its own registry (several nodes may share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.request_seconds = Histogram(
            "ncp_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a transfer: its last "
            "byte), by listener, method, route template and status.",
            ["listener", "method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ncp_http_requests_in_flight",
            "Requests being answered now, by listener.",
            ["listener"],
            registry=self.registry,
        )
        self.audit_records = Counter(
            "ncp_audit_records",
            "Audit records this process wrote, by side, action and outcome.",
            ["side", "action", "outcome"],
            registry=self.registry,
        )
        self.bytes_streamed = Counter(
            "ncp_image_bytes_streamed",
            "Bytes of DICOMweb answers sent by the gateways (side gateway: option A, edge: "
            "option C) or received by country B's retriever (side consumer), as audited.",
            ["side"],
            registry=self.registry,
        )
        self.instances_streamed = Counter(
            "ncp_image_instances_streamed",
            "DICOM instances in those answers, as audited.",
            ["side"],
            registry=self.registry,
        )
        self.tokens_issued = Counter(
            "ncp_access_tokens_issued",
            "Image access tokens and viewer launch codes this node issued ($imaging-access), "
            "by kind (issue, renew) and option (A, B, C).",
            ["kind", "option"],
            registry=self.registry,
        )
        self.tokens_refused = Counter(
            "ncp_access_tokens_refused",
            "Access tokens refused: stage issue, $imaging-access refused; stage use, a token "
            "presented to a gateway refused (401 or 403).",
            ["side", "stage"],
            registry=self.registry,
        )

    # -- the audit trail -----------------------------------------------------------------------

    def observe_audit(self, event: AuditEvent) -> None:
        """Count one step the audit chain recorded (an :class:`Auditor` observer)."""
        side, action = Side(event.side), Action(event.action)
        outcome = Outcome.parse(event.outcome)
        self.audit_records.labels(side.value, action.value, outcome.label).inc()
        if action is Action.IMAGE_RETRIEVE:
            if event.size_bytes:
                self.bytes_streamed.labels(side.value).inc(event.size_bytes)
            if event.num_instances:
                self.instances_streamed.labels(side.value).inc(event.num_instances)
        elif action in _TOKEN_ACTIONS and side is Side.PROVIDER:
            if outcome is Outcome.SUCCESS:
                option = str(event.option) if event.option is not None else "unknown"
                self.tokens_issued.labels(_TOKEN_ACTIONS[action], option).inc()
            else:
                self.tokens_refused.labels(side.value, "issue").inc()
        elif (
            action is Action.REFUSAL
            and side in _GATEWAY_SIDES
            and event.details.get("status") in (401, 403)  # 400: a malformed request
        ):
            self.tokens_refused.labels(side.value, "use").inc()

    # -- the database --------------------------------------------------------------------------

    def watch_database(self, sessions: sessionmaker[Session]) -> None:
        """Report what the node's database says at every scrape (:class:`DatabaseCollector`)."""
        self.registry.register(DatabaseCollector(sessions))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (blocking: collectors read the database)."""
        return generate_latest(self.registry)


class DatabaseCollector(Collector):
    """Gauges read from the node's database when Prometheus scrapes: the same on every replica."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._has_jobs: bool | None = None

    def describe(self) -> list[Metric]:
        return []  # collected on demand only: registering must not touch the database

    def collect(self) -> Iterator[Metric]:
        chain = GaugeMetricFamily(
            "ncp_audit_chain_length",
            "Records in this node's audit chain (the sequence number of its newest record).",
        )
        jobs = GaugeMetricFamily(
            "ncp_retrieval_jobs",
            "Country B's retrieval jobs in the database, by state and lane (priority).",
            labels=["state", "lane"],
        )
        try:
            with self.sessions() as session:
                seq = session.scalar(select(AuditChainHead.seq))
                chain.add_metric([], float(seq or 0))
                for state, lane, count in self._job_counts(session):
                    jobs.add_metric([state, lane], float(count))
        except Exception as exc:  # the scrape still answers; /readyz says the database is down
            log.warning("metrics: the database could not be read (%s)", type(exc).__name__)
            return
        yield chain
        if self._has_jobs:
            yield jobs

    def _job_counts(self, session: Session) -> list[Any]:
        if not self._has_jobs:
            # Looked up until found: a node upgraded while running gains the table.
            self._has_jobs = inspect(session.connection()).has_table(RETRIEVAL_JOBS.name)
            if not self._has_jobs:
                return []
        query = select(RETRIEVAL_JOBS.c.status, RETRIEVAL_JOBS.c.priority, func.count()).group_by(
            RETRIEVAL_JOBS.c.status, RETRIEVAL_JOBS.c.priority
        )
        return list(session.execute(query))
