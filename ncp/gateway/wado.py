"""WADO-RS representations (PS3.18 8.7): which transfer syntax a retrieve is answered in, and the
Accept header the archive gets for frames and bulk data.

A retrieve of instances is ``multipart/related; type="application/dicom"`` with an optional
``transfer-syntax`` parameter; without one the default is Explicit VR Little Endian (PS3.18
8.7.3.5.2), ``*`` means as stored. The caller's Accept header is parsed and rebuilt from what we
understood: nothing of it reaches the archive verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ncp.dicom.transcode import TARGETS
from ncp.dicom.uids import is_uid
from ncp.gateway.errors import BadRequest, NotAcceptable

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_DICOM = "application/dicom"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_RANGE = re.compile(
    rf"\s*({_TOKEN})/({_TOKEN})\s*((?:;\s*{_TOKEN}\s*=\s*(?:{_TOKEN}|\"[^\"\\]*\")\s*)*)\Z"
)
_PARAM = re.compile(rf";\s*({_TOKEN})\s*=\s*({_TOKEN}|\"[^\"\\]*\")")


@dataclass(frozen=True, slots=True)
class MediaRange:
    type: str
    params: tuple[tuple[str, str], ...]
    q: float

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    def __str__(self) -> str:
        text = self.type
        for name, value in self.params:
            quoted = value if re.fullmatch(_TOKEN, value) else f'"{value}"'
            text += f"; {name}={quoted}"
        return text


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges of an Accept header, most preferred first (q=0 dropped); BadRequest if
    malformed."""
    if header is None or not header.strip():
        return []
    if len(header) > 2048:
        raise BadRequest("Accept header too long")
    ranges: list[MediaRange] = []
    for item in re.findall(r'(?:[^,"]|"[^"]*")+', header):
        match = _RANGE.match(item)
        if match is None:
            raise BadRequest("malformed Accept header")
        params: list[tuple[str, str]] = []
        q = 1.0
        for name, value in _PARAM.findall(match.group(3)):
            name, value = name.lower(), value.strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    raise BadRequest("malformed q value in Accept") from None
            else:
                params.append((name, value))
        if q > 0:
            ranges.append(
                MediaRange(f"{match.group(1)}/{match.group(2)}".lower(), tuple(params), q)
            )
    return sorted(ranges, key=lambda r: -r.q)


def dicom_syntaxes(header: str | None) -> list[str]:
    """Transfer syntaxes (UIDs, or ``*`` for as stored) acceptable for instances, in order of
    preference; NotAcceptable if the caller accepts no multipart DICOM at all."""
    ranges = parse_accept(header)
    if not ranges:
        return [EXPLICIT_VR_LITTLE_ENDIAN]
    out: list[str] = []
    for media in ranges:
        if media.type in ("*/*", "multipart/*"):
            syntax = EXPLICIT_VR_LITTLE_ENDIAN
        elif media.type == "multipart/related" and media.param("type") in (
            None,
            "application/dicom",
        ):
            syntax = media.param("transfer-syntax") or EXPLICIT_VR_LITTLE_ENDIAN
            if syntax != "*" and not is_uid(syntax):
                raise BadRequest("transfer-syntax is not a UID or *")
        else:
            continue
        if syntax not in out:
            out.append(syntax)
    if not out:
        raise NotAcceptable(
            'instances are served as multipart/related; type="application/dicom" only'
        )
    return out


def choose_syntax(accepted: list[str], stored: set[str] | None) -> str:
    """The syntax to ask the archive for. ``stored``: the instances' own syntaxes when known
    (a folder), else None (the archive decides, and transcodes).

    A folder sends its files as stored when that is accepted (``*``, or their one syntax:
    zero copy), else the first accepted syntax it can transcode to
    (:data:`ncp.dicom.transcode.TARGETS`); instances already in it go as stored."""
    if stored is None:
        return accepted[0]
    if len(stored) == 1 and next(iter(stored)) in accepted:
        return next(iter(stored))
    if "*" in accepted:
        return "*"
    for syntax in accepted:
        if syntax in TARGETS:
            return syntax
    raise NotAcceptable(
        "the instances are stored in transfer syntaxes not accepted, and this archive "
        "transcodes to Explicit or Implicit VR Little Endian only; ask for one of them, or "
        "with transfer-syntax=*"
    )


def archive_accept(header: str | None, default: str) -> str:
    """The Accept header for frames or bulk data, rebuilt from the caller's parsed ranges."""
    # Wildcards say "anything": the archive gets our default, the one form it surely serves.
    ranges = [
        m
        for m in parse_accept(header)
        if not m.type.endswith("/*") and not (m.param("type") or "").endswith("/*")
    ]
    if not ranges:
        return default
    for media in ranges:
        syntax = media.param("transfer-syntax")
        if syntax is not None and syntax != "*" and not is_uid(syntax):
            raise BadRequest("transfer-syntax is not a UID or *")
    return ", ".join(str(m) if m.q == 1.0 else f"{m}; q={m.q:g}" for m in ranges)
