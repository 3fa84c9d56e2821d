"""Pairs (HP identity assertion, TRC) that passed ``check_request_pair``, remembered by their
exact bytes until the first of them expires.

B's portal signs one pair per HP and patient and sends it with every request of that session
(the list, each page, each token renewal): both assertions are reusable by design (neither kind
is one-time, no replay guard sees them). Verifying them from scratch costs two ECDSA checks and
the parsing of two tokens on every request (about 1 ms of node A's CPU a list request, with a
second verification of the HP assertion before the pair's). The same bytes always carry the same
claims, so a later request with them needs only what can change since the first check:

- the time: not yet past the first expiry plus the leeway (from then on ``verify`` says
  Expired), and not before the moment the pair was checked (a clock set back could make an
  assertion not yet valid again);
- the keys: each token's signing key still the one its issuer publishes under that kid (the
  trust list may have dropped the peer or rotated its keys), and not withdrawn.

Anything else (the audience, the TLS peer's country, the leeway) is part of the key the pair is
remembered under. Any doubt is a miss: the caller verifies in full and refuses with the precise
reason. One-time kinds are never remembered (``VerifiedPairs.put`` refuses them), so the replay
rules are untouched. The TLS peer is still checked on every request by the caller.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ncp.security.claims import HP_ASSERTION, TRC
from ncp.security.keys import KeySet
from ncp.security.pair import RequestContext
from ncp.security.tokens import KeyResolver

DEFAULT_MAX_ENTRIES = 4096
"""Pairs remembered at most (a few MB): one per HP and patient of the last hours."""


@dataclass(frozen=True, slots=True)
class _Known:
    context: RequestContext
    since: datetime
    """When the full check passed."""
    until: datetime
    """The first expiry plus the leeway: from then on ``verify`` refuses (Expired)."""
    keys: tuple[tuple[str, Any], ...]
    """(kid, public key) each token's signature verified with."""


def _kid_of(token: str) -> str | None:
    """The ``kid`` of a token whose header has already been verified."""
    header = token.split(".", 1)[0]
    try:
        kid = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))).get("kid")
    except (ValueError, AttributeError):
        return None
    return kid if isinstance(kid, str) else None


def _current_key(keys: KeySet | KeyResolver, issuer: str, kid: str, now: datetime) -> Any:
    """The public key ``verify`` would use for ``kid`` of ``issuer`` now, or None."""
    keyset = keys if isinstance(keys, KeySet) else keys(issuer)
    if keyset is None or keyset.issuer != issuer:
        return None
    found = keyset.get(kid)
    if found is None or (found.not_after is not None and now > found.not_after):
        return None
    return found.public_key


class VerifiedPairs:
    """Thread-safe memory of verified pairs for one node (``Node.verified_pairs``)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self.max_entries = max_entries
        self._known: dict[bytes, _Known] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(
        hp_token: str, trc_token: str, tls_country: str, audience: str, leeway_s: int
    ) -> bytes:
        text = "\n".join((tls_country, audience, str(leeway_s), hp_token, trc_token))
        return hashlib.sha256(text.encode("utf-8")).digest()

    def get(
        self,
        hp_token: str,
        trc_token: str,
        *,
        tls_country: str,
        keys: KeySet | KeyResolver,
        audience: str,
        now: datetime,
        leeway_s: int,
    ) -> RequestContext | None:
        """The context of this exact pair if it passed in full before and nothing that could
        change its verdict has changed since; None otherwise (verify it in full)."""
        digest = self._digest(hp_token, trc_token, tls_country, audience, leeway_s)
        with self._lock:
            known = self._known.get(digest)
        if known is None or not known.since <= now < known.until:
            return None
        for kid, public in known.keys:
            if _current_key(keys, tls_country, kid, now) != public:
                return None
        return known.context

    def put(
        self,
        hp_token: str,
        trc_token: str,
        context: RequestContext,
        *,
        tls_country: str,
        keys: KeySet | KeyResolver,
        audience: str,
        checked_at: datetime,
        leeway_s: int,
    ) -> None:
        """Remember a pair that ``check_request_pair`` accepted at ``checked_at`` with these
        arguments. One-time kinds, and tokens whose key cannot be named, are not remembered."""
        if self.max_entries == 0 or HP_ASSERTION.one_time or TRC.one_time:
            return
        pinned: list[tuple[str, Any]] = []
        for token in (hp_token, trc_token):
            kid = _kid_of(token)
            public = None if kid is None else _current_key(keys, tls_country, kid, checked_at)
            if kid is None or public is None:
                return
            pinned.append((kid, public))
        until = context.expires_at + timedelta(seconds=leeway_s)
        known = _Known(context, checked_at, until, tuple(pinned))
        digest = self._digest(hp_token, trc_token, tls_country, audience, leeway_s)
        with self._lock:
            if len(self._known) >= self.max_entries:
                self._known = {d: k for d, k in self._known.items() if k.until > checked_at}
                if len(self._known) >= self.max_entries:
                    self._known.clear()
            self._known[digest] = known

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._known)


__all__ = ["DEFAULT_MAX_ENTRIES", "VerifiedPairs"]
