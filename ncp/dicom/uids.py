"""What the node accepts as a DICOM UID (PS3.5 9.1), wherever a UID enters: headers, URLs, paths.

1 to 64 characters, digits in dot-separated components, none empty. Stricter than "digits and
dots": '..' or '.' would otherwise pass and could become a path segment of a URL or a file name.
Leading zeros are tolerated (seen in real archives, harmless here).
"""

from __future__ import annotations

import re

UID_PATTERN = re.compile(r"(?=[0-9.]{1,64}\Z)[0-9]+(?:\.[0-9]+)*")


def is_uid(value: str) -> bool:
    return UID_PATTERN.fullmatch(value) is not None
