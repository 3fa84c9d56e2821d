"""The viewer's audit records, written through the node's :class:`~ncp.audit.record.Auditor`
on the side it is told (``viewer`` at A, ``consumer`` for B's local viewer: the same hook).

- a study first shown in a session (by this process): ``image-view``, success,
  ``details.phase`` ``opened``;
- its viewing over (idle for ``idle_s``, the session ended, the process stopping):
  ``image-view``, success, ``phase`` ``viewed``, with the frames rendered and thumbnails
  counted, the instances seen, the first and last time;
- a request refused (no or an expired session, a study not covered, a path trick):
  ``refusal``, serious failure, with the reason, the path and the session's HP when known.

Launches and session ends are recorded by :mod:`ncp.viewer.launch` and
:mod:`ncp.viewer.sessions` (``viewer-launch``, ``viewer-session``).

Frames are counted in memory, not recorded one by one: a radiologist scrolling a CT series
renders hundreds of frames a minute. The ``opened`` record is written before the first frame is
sent (a view that cannot be audited is not shown); the count follows when the viewing ends.
Counts are per process: each replica that served a session writes its own ``viewed`` record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditError, AuditEvent, Auditor, printable
from ncp.dicom.uids import is_uid
from ncp.viewer.access import ViewerGrant

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    grant: ViewerGrant
    study: str
    request_id: str
    first: datetime
    last: datetime
    last_mono: float
    frames: int = 0
    thumbnails: int = 0
    instances: set[str] = field(default_factory=set)


class ViewAudit:
    """Records what the viewer shows and refuses (see the module doc)."""

    def __init__(self, auditor: Auditor, side: Side, *, idle_s: float = 120.0) -> None:
        self.auditor = auditor
        self.side = side
        self.idle_s = idle_s
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="viewer-audit")

    def _fields(self, grant: ViewerGrant | None) -> dict[str, Any]:
        if grant is None:
            return {}
        out: dict[str, Any] = {
            "actor_id": grant.subject,
            "actor_name": grant.subject_name,
            "token_jti": grant.token_jti,
            "option": grant.option,
            "purpose": grant.purpose_of_use,
            "priority": grant.priority,
        }
        if grant.requesting_country:
            out["actor_country"] = out["peer_country"] = grant.requesting_country
        if grant.patient is not None:
            out["patient_id"] = grant.patient.value
            out["patient_issuer"] = grant.patient.system
        return out

    async def record(self, event: AuditEvent) -> None:
        """Write off the event loop; AuditError when it cannot be written (fail closed)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, self.auditor.record, event)

    def event(
        self,
        action: Action,
        request_id: str,
        grant: ViewerGrant | None,
        *,
        outcome: Outcome = Outcome.SUCCESS,
        reason: str | None = None,
        studies: tuple[str, ...] = (),
        details: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> AuditEvent:
        values: dict[str, Any] = {
            "action": action,
            "side": self.side,
            "request_id": request_id,
            "outcome": outcome,
            "reason": reason[:2000] if reason else None,
            "studies": tuple(s for s in studies if is_uid(s)),
            "details": dict(details or {}),
            **self._fields(grant),
            **fields,
        }
        return AuditEvent(**values)

    async def refused(
        self,
        request_id: str,
        reason: str,
        *,
        status: int,
        path: str,
        grant: ViewerGrant | None = None,
        study: str | None = None,
        jti: str | None = None,
    ) -> None:
        details: dict[str, Any] = {"status": status, "path": printable(path)}
        if grant is not None:
            details["session"] = grant.session
        event = self.event(
            Action.REFUSAL,
            request_id,
            grant,
            outcome=Outcome.SERIOUS_FAILURE,
            reason=f"{status}: {reason}",
            studies=(study,) if study and is_uid(study) else (),
            details=details,
        )
        if jti is not None and grant is None:
            event = AuditEvent(**{**_as_dict(event), "token_jti": jti})
        await self.record(event)

    async def viewed(
        self,
        request_id: str,
        grant: ViewerGrant,
        study: str,
        *,
        frames: int = 0,
        thumbnails: int = 0,
        instances: tuple[str, ...] = (),
    ) -> None:
        """Count what was shown of ``study``; the first time in a session, write the ``opened``
        record before returning (AuditError: the caller must not show the image)."""
        key = (grant.session, study)
        tally = self._tallies.get(key)
        now = datetime.now(UTC)
        if tally is None:
            await self.record(
                self.event(
                    Action.IMAGE_VIEW,
                    request_id,
                    grant,
                    studies=(study,),
                    details={"phase": "opened", "session": grant.session},
                )
            )
            tally = self._tallies.setdefault(
                key, _Tally(grant, study, request_id, now, now, time.monotonic())
            )
        tally.frames += frames
        tally.thumbnails += thumbnails
        tally.instances.update(instances)
        tally.last = now
        tally.last_mono = time.monotonic()

    async def flush(self, *, everything: bool = False, ended: Set[str] = frozenset()) -> int:
        """Write the ``viewed`` record of every viewing idle for ``idle_s`` or whose session
        has ended (its expiry passed, or its id in ``ended``; all of them with ``everything``,
        when the process stops). Returns how many were written; a record that cannot be
        written stays counted for the next flush."""
        now_mono, now = time.monotonic(), datetime.now(UTC)
        due = [
            key
            for key, t in self._tallies.items()
            if everything
            or key[0] in ended
            or now_mono - t.last_mono >= self.idle_s
            or (t.grant.expires_at is not None and t.grant.expires_at <= now)
        ]
        written = 0
        for key in due:
            tally = self._tallies.get(key)
            if tally is None:
                continue
            event = self.event(
                Action.IMAGE_VIEW,
                tally.request_id,
                tally.grant,
                studies=(tally.study,),
                num_instances=len(tally.instances),
                duration_ms=max(0, round((tally.last - tally.first).total_seconds() * 1000)),
                details={
                    "phase": "viewed",
                    "session": tally.grant.session,
                    "frames": tally.frames,
                    "thumbnails": tally.thumbnails,
                    "first": tally.first.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "last": tally.last.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                },
            )
            try:
                await self.record(event)
            except AuditError:
                log.error("viewing record of session %s not written yet", tally.grant.session)
                continue
            self._tallies.pop(key, None)
            written += 1
        return written

    def pending(self) -> int:
        return len(self._tallies)

    def close(self) -> None:
        self._threads.shutdown(wait=True)


def _as_dict(event: AuditEvent) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


__all__ = ["Side", "ViewAudit"]
