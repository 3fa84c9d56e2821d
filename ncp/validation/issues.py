"""Validation issues and the OperationOutcome that carries them.

An :class:`Issue` is one finding with its location (a FHIRPath expression into the validated
resource, as the official validator writes it: ``Bundle.entry[2].resource.ofType(ImagingStudy)
.identifier[0].value``) and the rule it enforces (a constraint key such as ``bdl-7``, or the
profile element id whose cardinality, binding or fixed value failed). Validators return issues;
they do not raise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["fatal", "error", "warning", "information"]

# FHIR R4 issue-type codes (http://hl7.org/fhir/issue-type) the validator uses.
STRUCTURE = "structure"
REQUIRED = "required"
VALUE = "value"
INVARIANT = "invariant"
CODE_INVALID = "code-invalid"
NOT_FOUND = "not-found"
NOT_SUPPORTED = "not-supported"
PROCESSING = "processing"
TOO_COSTLY = "too-costly"
SECURITY = "security"
DUPLICATE = "duplicate"
BUSINESS_RULE = "business-rule"
INFORMATIONAL = "informational"

MESSAGE_ID_EXTENSION = "http://hl7.org/fhir/StructureDefinition/operationoutcome-message-id"
"""Where the OperationOutcome keeps :attr:`Issue.rule`, as HAPI and the HL7 validator do."""

_RANK = {"fatal": 0, "error": 1, "warning": 2, "information": 3}


@dataclass(frozen=True, slots=True)
class Issue:
    severity: Severity
    code: str
    """FHIR issue-type code (``structure``, ``required``, ``value``, ``code-invalid``, ...)."""
    expression: str
    """FHIRPath location of the element concerned (the resource type for the whole resource)."""
    diagnostics: str
    rule: str = ""
    """The constraint key, profile element id or named rule this issue enforces."""

    @property
    def is_error(self) -> bool:
        return self.severity in ("fatal", "error")

    def key(self) -> tuple[str, str, str, str]:
        """What makes two issues the same finding (diagnostics wording aside)."""
        return (self.severity, self.code, self.expression, self.rule)


def has_errors(issues: Iterable[Issue]) -> bool:
    return any(issue.is_error for issue in issues)


def unique(issues: Iterable[Issue]) -> list[Issue]:
    """Issues without repeats (a rule checked by a base definition and by a profile alike),
    most severe first, then in document order of their location, order found otherwise."""
    seen: set[tuple[str, str, str, str]] = set()
    kept: list[Issue] = []
    for issue in issues:
        if issue.key() not in seen:
            seen.add(issue.key())
            kept.append(issue)
    return sorted(kept, key=lambda i: _RANK[i.severity])


def issue_json(issue: Issue) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if issue.rule:
        out["extension"] = [{"url": MESSAGE_ID_EXTENSION, "valueString": issue.rule}]
    out["severity"] = issue.severity
    out["code"] = issue.code
    if issue.diagnostics:
        out["diagnostics"] = issue.diagnostics
    if issue.expression:
        out["expression"] = [issue.expression]
    return out


def to_operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    """A valid R4 OperationOutcome; FHIR wants at least one issue, so none found becomes one
    information issue saying so."""
    if not issues:
        body = [{"severity": "information", "code": INFORMATIONAL, "diagnostics": "no issues"}]
    else:
        body = [issue_json(issue) for issue in issues]
    return {"resourceType": "OperationOutcome", "issue": body}


def from_operation_outcome(outcome: dict[str, Any]) -> list[Issue]:
    """The issues of an OperationOutcome written by :func:`to_operation_outcome`."""
    found: list[Issue] = []
    for raw in outcome.get("issue", []):
        rule = ""
        for ext in raw.get("extension", []):
            if ext.get("url") == MESSAGE_ID_EXTENSION:
                rule = str(ext.get("valueString", ""))
        expressions = raw.get("expression") or [""]
        found.append(
            Issue(raw["severity"], raw["code"], expressions[0], raw.get("diagnostics", ""), rule)
        )
    return found
