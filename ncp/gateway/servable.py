"""Whether the gateways can serve a stored instance: the rules they check each part by
(``ncp.gateway.stream``, ``ncp.gateway.parthead``), asked by the indexer of every file it
indexes, so that an instance a gateway would refuse is reported by ``ncp index``, not found out
by a clinician (docs/gateway.md, "What the gateways serve").

The rules, one per case, the same for the index, option A and the edge:

- an instance is its data set's SOP Instance UID (0008,0018): the index keeps that one, a
  DICOMweb archive indexes it under it, and the gateways admit a part by it. A file meta group
  naming another (0002,0003) is tolerated and noted by the index;
- Study, Series and SOP Instance UIDs encoded UN in an Explicit VR file are read as UIDs (PS3.5
  6.2.2), by the index (pydicom takes the dictionary's VR) and by the gateways alike;
- a value pydicom's DICOM JSON writer rejects (an IS of ``1A``) is left out of the folder
  catalogue's metadata and QIDO answers, the rest of the header kept (the index notes values
  it could not read);
- a part must name its file meta and its data set's Study, Series and SOP Instance UIDs within
  its first :data:`~ncp.gateway.parthead.HEAD_LIMIT` bytes, readable element by element: an
  instance that does not is refused by the edge (and option A without its index), and the
  index reports it as not servable.
"""

from __future__ import annotations

from ncp.gateway.errors import StreamBroken
from ncp.gateway.parthead import HEAD_LIMIT, Buffer, dataset_ids, file_meta, meta_end


def part_problem(head: Buffer) -> str | None:
    """Why a gateway would refuse a stored Part 10 object whose first bytes are ``head`` (up to
    :data:`HEAD_LIMIT` of them, or the whole object when shorter), or None when it names itself
    as the gateways need."""
    view = memoryview(head)[:HEAD_LIMIT]
    try:
        facts = file_meta(view)
        if facts is None:
            return "its file meta group ends before the file does"
        ids = dataset_ids(view, meta_end(view), facts[1])
    except StreamBroken as exc:
        return str(exc)
    if isinstance(ids, int):
        if len(view) >= HEAD_LIMIT:
            return (
                "it does not name its study, series and instance within its first "
                f"{HEAD_LIMIT} bytes"
            )
        return "it ends before it names its study, series and instance"
    return None
