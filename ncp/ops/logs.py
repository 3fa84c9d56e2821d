"""The log of a running node: one line per record on stderr, as text or as one JSON object, each
with the id of the request it belongs to, and no patient data.

- ``--log-format json`` writes one JSON object per line (python-json-logger): ``time``,
  ``level``, ``logger``, ``message``, ``request_id`` (when the record belongs to a request) and
  any ``extra`` fields; ``text`` writes the same in one readable line.
- The request id is the correlation id of the request being served (``X-Request-ID``, the one
  the audit records carry), set by :class:`ncp.ops.observe.ObservedApp` in a context variable
  that every record logged while serving it picks up.
- Patient data: the audit module's :class:`~ncp.audit.record.PatientDataFilter` masks patient
  fields of every record; uvicorn's access log, which prints the raw path and query (patient
  identifiers in a search, study UIDs in a DICOMweb path), is switched off and replaced by one
  line per request naming the route template (``ObservedApp``).

:func:`configure_logging` is idempotent and must run after every uvicorn ``Config`` of the
process is made: each ``Config`` re-applies uvicorn's own logging set-up when created.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import IO, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from ncp.audit.record import PatientDataFilter

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

REQUEST_ID: ContextVar[str | None] = ContextVar("ncp_request_id", default=None)
"""The correlation id of the request being served in this task (None outside requests)."""

_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
_TEXT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Gives every record the request id of the task that logs it (``-`` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get() or "-"
        return True


class _NodeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler :func:`configure_logging` installs (recognised when it runs again)."""


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            ["asctime", "levelname", "name", "message", "request_id"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn repeats the message with terminal colours in `color_message`.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    return logging.Formatter(_TEXT, datefmt="%Y-%m-%dT%H:%M:%S%z")


def configure_logging(
    log_format: LogFormat = "text", level: str = "info", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) in ``log_format``, with the
    request id and the patient data filter; returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _NodeHandler)]:
        root.removeHandler(old)
    handler = _NodeHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(PatientDataFilter())
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _UVICORN:
        # uvicorn's own handlers go: its records reach ours through the root logger.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    # The access log prints raw paths and queries (patient identifiers, study UIDs). Without
    # handlers and propagation it is off (uvicorn checks hasHandlers()); ObservedApp logs each
    # request by its route template instead.
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    # Alembic reports each plugin it loads at every start: only its warnings are news.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return handler
