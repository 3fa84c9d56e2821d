"""Reading values from DICOM JSON data sets (PS3.18 F.2) as the gateway checks them: exactly, on
our side, whatever the archive's own matching did."""

from __future__ import annotations

from typing import Any

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
PATIENT_ID = "00100020"
ISSUER_OF_PATIENT_ID = "00100021"
RETRIEVE_URL = "00081190"


def values(item: Any, tag: str) -> list[Any]:
    """The values of ``tag`` in a data set (an empty list when absent or malformed); a person
    name is given as its alphabetic form."""
    element = item.get(tag) if isinstance(item, dict) else None
    found = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(found, list):
        return []
    out: list[Any] = []
    for value in found:
        if isinstance(value, dict) and isinstance(element, dict) and element.get("vr") == "PN":
            out.append(value.get("Alphabetic", ""))
        else:
            out.append(value)
    return out


def single_text(item: Any, tag: str) -> str | None:
    """The one string value of ``tag`` with DICOM padding removed, or None."""
    found = values(item, tag)
    if len(found) != 1 or not isinstance(found[0], str):
        return None
    return found[0].strip("\x00 ")


def element(vr: str, *items: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(items)} if items else {"vr": vr}
