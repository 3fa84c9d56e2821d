"""The gateway's audit records: one per request, written through the node's (or the edge's own)
:class:`~ncp.audit.record.Auditor`.

| request | action | what it names |
| --- | --- | --- |
| QIDO-RS search | ``list-query`` | the query, the studies in the answer |
| WADO-RS metadata | ``image-retrieve`` | instances described, bytes sent |
| WADO-RS retrieve, frames, bulk | ``image-transfer-begin`` | what is asked, before the first byte |
| ... when it ends | ``image-retrieve`` | instances, bytes and SOP UIDs sent, how it ended |
| refused request | ``refusal`` | why, the token's id once its signature verified |

Each record names the token's ``jti``, the health professional, the requesting country, the
patient, purpose and priority, and the request id (``X-Request-ID`` when the caller sends one,
so B's retriever and A's gateway share it). Records are written off the event loop. A record
that cannot be written fails a search or metadata answer (never answer unaudited); a transfer
is recorded before its first byte (so a crash mid-transfer still leaves a trace) and when it
ends, with what was actually sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditError, AuditEvent, Auditor, printable
from ncp.dicom.uids import is_uid
from ncp.security.access import AccessGrant

log = logging.getLogger(__name__)

_THREADS = 8
"""Audit writes at once: they queue on the chain's lock anyway."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    request_id: str
    path: str
    query: str
    client: str | None


class GatewayAudit:
    """Builds and writes the gateway's records for ``side`` (gateway or edge)."""

    def __init__(self, auditor: Auditor, side: Side) -> None:
        self.auditor = auditor
        self.side = side
        self._threads = ThreadPoolExecutor(_THREADS, thread_name_prefix="gateway-audit")

    def event(
        self,
        info: RequestInfo,
        action: Action,
        grant: AccessGrant | None,
        *,
        outcome: Outcome = Outcome.SUCCESS,
        reason: str | None = None,
        studies: tuple[str, ...] = (),
        jti: str | None = None,
        details: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> AuditEvent:
        base: dict[str, Any] = {
            "action": action,
            "side": self.side,
            "request_id": info.request_id,
            "outcome": outcome,
            "reason": reason[:2000] if reason else None,
            "studies": tuple(s for s in studies if is_uid(s)),
            "details": {"path": printable(info.path), "client": info.client, **(details or {})},
            "token_jti": jti,
        }
        if grant is not None:
            base.update(
                actor_id=grant.subject,
                actor_country=grant.requesting_country,
                peer_country=grant.requesting_country,
                patient_id=grant.patient.value,
                patient_issuer=grant.patient.system,
                purpose=grant.purpose_of_use,
                priority=grant.priority,
                option=grant.option,
                token_jti=grant.jti,
            )
        base.update(fields)
        return AuditEvent(**base)

    async def record(self, event: AuditEvent) -> None:
        """Write ``event``; AuditError when it cannot be written (the caller fails closed)."""
        # Off the event loop (a database may wait for a lock), on the gateway's own threads:
        # asyncio's executor hand-off costs less than anyio's worker threads on every request.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, self.auditor.record, event)

    async def record_late(self, event: AuditEvent) -> None:
        """Write the record of a transfer that has already been sent: a failure is logged (the
        bytes are gone), never raised into the closing stream."""
        try:
            await self.record(event)
        except AuditError:
            log.error("audit record of transfer %s lost", event.request_id)
