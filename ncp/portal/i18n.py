"""The portal's languages: message catalogues, the HP's locale, dates, sizes and coded values.

Messages are flat JSON catalogues (``locales/<lang>.json``), one per language the pages are
written in (en, de, fr): no compile step, and the list page's script gets the same strings
(decision 0016). Dates, numbers and durations are formatted by Babel in
the HP's full locale (``de-AT`` formats as Austrian German); coded values from country A are
shown through ``ncp.fhir.terminology`` in any of its eight languages, so a Dutch-speaking HP reads
body sites in Dutch on English pages when the catalogue has no Dutch.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from importlib import resources
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time, format_timedelta
from babel.numbers import format_decimal

from ncp.fhir.terminology import default_terminology

LANGUAGES = ("en", "de", "fr")
"""Languages the pages are written in."""
DEFAULT_LANGUAGE = "en"
_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*")


class CatalogueError(ValueError):
    """A catalogue is missing, malformed, or lacks a key another one has."""


@functools.cache
def catalogues() -> dict[str, dict[str, str]]:
    """Every catalogue, read once; all must hold the same keys (checked here, so a page
    never falls back to a key's name in front of an HP)."""
    out: dict[str, dict[str, str]] = {}
    folder = resources.files("ncp.portal") / "locales"
    for lang in LANGUAGES:
        try:
            data = json.loads((folder / f"{lang}.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CatalogueError(f"locales/{lang}.json: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise CatalogueError(f"locales/{lang}.json: must be an object of strings")
        out[lang] = data
    keys = set(out[DEFAULT_LANGUAGE])
    for lang, data in out.items():
        if set(data) != keys:
            missing = sorted(keys - set(data)) or sorted(set(data) - keys)
            raise CatalogueError(f"locales/{lang}.json: keys differ from en.json: {missing[:5]}")
    return out


def normalise_tag(tag: str | None) -> str | None:
    """A BCP 47 tag in its usual case (``de-AT``), or None when it is not one."""
    if not tag or not _TAG.fullmatch(tag.strip().replace("_", "-")):
        return None
    parts = tag.strip().replace("_", "-").split("-")
    head = parts[0].lower()
    rest = [p.upper() if len(p) == 2 else p for p in parts[1:]]
    return "-".join([head, *rest])


def page_language(tag: str | None) -> str | None:
    """The pages' language for a tag (its primary subtag), or None when the pages have none."""
    normal = normalise_tag(tag)
    if normal is None:
        return None
    primary = normal.split("-", 1)[0]
    return primary if primary in LANGUAGES else None


def from_accept_language(header: str | None, default: str = DEFAULT_LANGUAGE) -> str:
    """The best tag from an ``Accept-Language`` header among the pages' languages (by q value,
    then order); ``default`` when none fits. Returns the full tag (``fr-BE``) of the choice."""
    if not header:
        return default
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate(header.split(",")[:20]):
        piece, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                continue
        tag = normalise_tag(piece)
        if tag is not None and page_language(tag) is not None and q > 0:
            ranked.append((-q, i, tag))
    return min(ranked)[2] if ranked else default


@dataclass(frozen=True)
class Translator:
    """Everything language-dependent of one page: messages, dates, numbers, coded values."""

    tag: str
    """The HP's full locale (``de-AT``); Babel formats by it, terminology displays use it."""

    @property
    def language(self) -> str:
        return page_language(self.tag) or DEFAULT_LANGUAGE

    @functools.cached_property
    def _locale(self) -> Locale:
        try:
            return Locale.parse(self.tag.replace("-", "_"))
        except (UnknownLocaleError, ValueError):
            return Locale.parse(self.language)

    @property
    def messages(self) -> dict[str, str]:
        return catalogues()[self.language]

    def __call__(self, key: str, **values: Any) -> str:
        """The message ``key`` in the page's language, with ``{name}`` fields filled."""
        text = self.messages.get(key)
        if text is None:
            raise KeyError(f"no message {key!r} in the portal's catalogues")
        return text.format(**values) if values else text

    def subset(self, prefix: str) -> dict[str, str]:
        """Messages whose key starts with ``prefix`` (what a page's script needs)."""
        return {k: v for k, v in self.messages.items() if k.startswith(prefix)}

    def datetime(self, moment: datetime) -> str:
        """Date and time in the HP's locale, at the moment's own offset (a study's local time
        where it was made)."""
        day = format_date(moment, "medium", locale=self._locale)
        clock = format_time(moment, "short", tzinfo=moment.tzinfo, locale=self._locale)
        return f"{day}, {clock}"  # seconds help no reader of a study list

    def date(self, day: date) -> str:
        return format_date(day, "medium", locale=self._locale)

    def number(self, value: float, digits: int = 0) -> str:
        pattern = "#,##0" + ("." + "0" * digits if digits else "")
        return format_decimal(value, format=pattern, locale=self._locale)

    def size(self, size_bytes: int) -> str:
        """Bytes in MB or GB (decimal units, as disks and networks count them)."""
        if size_bytes >= 10**9:
            return f"{self.number(size_bytes / 10**9, 1)} GB"
        if size_bytes >= 10**6:
            return f"{self.number(size_bytes / 10**6, 1)} MB"
        return f"{self.number(max(size_bytes, 0) / 10**3, 0)} kB"

    def duration(self, seconds: float) -> str:
        """A rough duration ("3 minutes"); under a second reads as one second."""
        return format_timedelta(
            timedelta(seconds=max(seconds, 1)), threshold=1.1, locale=self._locale
        )

    def coded(self, system: str, code: str, fallback: str | None = None) -> str:
        """A code from country A in the HP's language (terminology/, eight languages)."""
        return default_terminology().display(system, code, self.tag) or fallback or code


def translator_for(tag: str | None, default: str = DEFAULT_LANGUAGE) -> Translator:
    return Translator(normalise_tag(tag) or default)
