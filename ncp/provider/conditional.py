"""Conditional reads of versioned resources (FHIR R4 http.html#cread): whether a client's copy
is still the version the node would send, so the answer can be ``304 Not Modified``.

``If-None-Match`` names entity tags (``W/"3"``, or ``*`` for any version) and is compared
weakly (RFC 9110 section 8.8.3.2: the ``W/`` prefix does not count); when it is present,
``If-Modified-Since`` is ignored (section 13.2.2). ``If-Modified-Since`` counts when it is a
valid HTTP date and the version was last updated no later (to the second, as HTTP dates go);
an unreadable date is ignored, as the RFC says, and the full answer is sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_TAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*(?:,|\Z)')


def _tags(header: str) -> list[str] | None:
    """The opaque tags of an ``If-None-Match`` list; None when it is not one."""
    tags, at = [], 0
    while at < len(header):
        match = _TAG.match(header, at)
        if match is None:
            return None
        tags.append(match.group(1))
        at = match.end()
    return tags


def _opaque(etag: str) -> str:
    return etag.removeprefix("W/").strip('"')


def not_modified(headers: Mapping[str, str], etag: str, last_updated: datetime | None) -> bool:
    """Whether the request's conditions say the client holds the version tagged ``etag``
    (last updated at ``last_updated``, aware)."""
    match = headers.get("if-none-match")
    if match is not None:
        if match.strip() == "*":
            return True
        tags = _tags(match)
        return tags is not None and _opaque(etag) in tags
    since = headers.get("if-modified-since")
    if since is None or last_updated is None:
        return False
    try:
        moment = parsedate_to_datetime(since)
    except (TypeError, ValueError, IndexError):
        return False
    if moment.tzinfo is None:  # "-0000": an HTTP date is GMT in any case
        moment = moment.replace(tzinfo=UTC)
    return last_updated.astimezone(UTC).replace(microsecond=0) <= moment
