"""The string forms of FHIR R4 primitive values, checked against R4's own rules.

Each primitive type's definition (``profiles/base/StructureDefinition-<type>.json``) carries the
regular expression its values must match (the ``regex`` extension on ``<type>.value``); R4 writes
them in the XML Schema / Java dialect, where ``\\s`` and ``\\S`` are ASCII classes, so they are
compiled with :data:`re.ASCII`. Among them the limit that ``id`` values (resource ids,
``meta.versionId``, the UIDs of ImagingStudy series and instances) are at most 64 characters.
Dates that match their pattern must also name a day the calendar has.

Every message is in the project's words: the value quoted (bounded: a value of megabytes is
never copied into an OperationOutcome), the type, what R4 requires in words, and the pattern.
The same words serve the model's findings (:mod:`ncp.validation.structure`) for resources whose
definition is not held, so no library's wording reaches a user.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date

from ncp.fhir.conformance import DefinitionNotFound, Definitions
from ncp.validation.issues import VALUE, Issue

RULE_FORMAT = "primitive-format"
REGEX_EXTENSION = "http://hl7.org/fhir/StructureDefinition/regex"

QUOTE_CHARS = 48
"""A value longer than this is quoted by its first characters and its length."""

RULES_IN_WORDS: dict[str, str] = {
    "id": "1 to 64 characters of A-Z a-z 0-9 - .",
    "oid": "urn:oid: and an OID (digits and dots, no leading zeros)",
    "uuid": "urn:uuid: and a UUID in lower case",
    "uri": "no whitespace",
    "url": "no whitespace",
    "canonical": "no whitespace",
    "code": "not empty, no leading, trailing or repeated whitespace",
    "string": "not empty",
    "markdown": "not empty",
    "date": "YYYY, YYYY-MM or YYYY-MM-DD",
    "dateTime": "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.f] with a time zone "
    "(Z or +hh:mm)",
    "instant": "YYYY-MM-DDThh:mm:ss[.f] with a time zone (Z or +hh:mm)",
    "time": "hh:mm:ss[.f]",
    "base64Binary": "base64 (A-Z a-z 0-9 + / in groups of 4, = padding)",
    "decimal": "a decimal number",
    "integer": "a whole number from -2147483648 to 2147483647",
    "unsignedInt": "a whole number from 0 to 2147483647",
    "positiveInt": "a whole number from 1 to 2147483647",
}
"""What R4 requires of each primitive type, as a message says it."""

_INT_RANGES = {
    "integer": (-(2**31), 2**31 - 1),
    "unsignedInt": (0, 2**31 - 1),
    "positiveInt": (1, 2**31 - 1),
}
_DATED = frozenset({"date", "dateTime", "instant"})
_NOT_STRINGS = frozenset({"boolean", "decimal", *_INT_RANGES})
"""Types JSON writes as numbers or booleans: their patterns are of the XML form."""
_NOT_EMPTY = frozenset({"string", "markdown"})
# base64 is checked by hand: R4's pattern ``(\s*([0-9a-zA-Z\+/=]){4}\s*)+`` backtracks badly on
# a long invalid value, and Binary data runs to megabytes.
_BASE64 = re.compile(r"[0-9A-Za-z+/]*={0,2}\Z")
_SPACE = re.compile(r"\s+", re.ASCII)


def quote(value: object) -> str:
    """``value`` as a message quotes it: ``repr``, at most :data:`QUOTE_CHARS` characters of it,
    with the length of a value cut short."""
    if isinstance(value, str) and len(value) > QUOTE_CHARS:
        return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS + 2 else f"{text[:QUOTE_CHARS]}... (cut short)"


def format_message(type_code: str, value: object, why: str | None = None) -> str:
    """``'2024-13-01' is not a valid date: R4 requires YYYY, YYYY-MM or YYYY-MM-DD``."""
    rule = RULES_IN_WORDS.get(type_code)
    message = f"{quote(value)} is not a valid {type_code}"
    if why:
        return f"{message}: {why}"
    return f"{message}: R4 requires {rule}" if rule else message


class Formats:
    """The rule of each primitive type, compiled on first use from its definition."""

    def __init__(self, definitions: Definitions) -> None:
        self._definitions = definitions
        self._patterns: dict[str, tuple[Callable[[str], object] | None, str]] = {}

    def pattern(self, type_code: str) -> tuple[Callable[[str], object] | None, str]:
        """(fullmatch of the type's regex or None, the regex as R4 writes it)."""
        found = self._patterns.get(type_code)
        if found is None:
            regex = self._regex_of(type_code)
            matcher = re.compile(regex, re.ASCII).fullmatch if regex else None
            found = self._patterns[type_code] = (matcher, regex or "")
        return found

    def _regex_of(self, type_code: str) -> str | None:
        if type_code in _NOT_EMPTY or type_code == "base64Binary" or not type_code[:1].islower():
            return None
        try:
            sd = self._definitions.by_type(type_code)
        except DefinitionNotFound:
            return None
        for element in (sd.get("snapshot") or {}).get("element") or []:
            if element.get("path") != f"{type_code}.value":
                continue
            for t in element.get("type") or []:
                for ext in t.get("extension") or []:
                    regex = ext.get("valueString")
                    if ext.get("url") == REGEX_EXTENSION and isinstance(regex, str):
                        return regex
        return None

    def check(self, type_code: str, value: object, location: str, issues: list[Issue]) -> None:
        """An issue when ``value`` (of the JSON type the type wants: the caller checked it)
        breaks the rule of ``type_code``."""
        why = self.problem(type_code, value)
        if why is not None:
            issues.append(Issue("error", VALUE, location, why, RULE_FORMAT))

    def problem(self, type_code: str, value: object) -> str | None:
        """The message for ``value`` as a ``type_code``, or None when it is one."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            low, high = _INT_RANGES.get(type_code, (None, None))
            if low is not None and high is not None and not low <= value <= high:
                return format_message(type_code, value)
            return None
        if not isinstance(value, str) or type_code in _NOT_STRINGS:
            return None  # a string for a number or boolean is a JSON type error, said apart
        if type_code in _NOT_EMPTY:
            return None if value else format_message(type_code, value)
        if type_code == "base64Binary":
            return None if _is_base64(value) else format_message(type_code, value)
        matcher, regex = self.pattern(type_code)
        if matcher is None:
            return None
        if not matcher(value):
            rule = RULES_IN_WORDS.get(type_code)
            words = f"R4 requires {rule} (pattern {regex})" if rule else f"pattern {regex}"
            return format_message(type_code, value, words)
        if type_code in _DATED and len(value) >= 10 and not _is_day(value):
            return format_message(type_code, value, "no such day in the calendar")
        return None


def _is_day(value: str) -> bool:
    try:
        date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


def _is_base64(value: str) -> bool:
    text = _SPACE.sub("", value)
    return bool(text) and len(text) % 4 == 0 and _BASE64.match(text) is not None
