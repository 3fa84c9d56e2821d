"""The promise of the index: the same instances give the same index, whatever holds them.

Generated example studies are indexed from a folder (into SQLite) and, after uploading the same
files to a real Orthanc, from its DICOMweb interface (into SQLite and PostgreSQL); the two indexes
must be identical except for where each instance is stored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ncp.dicom.dicomweb import DicomwebSource
from ncp.dicom.folder import FolderSource
from ncp.examples.generate import generate_examples
from ncp.provider.indexer import index_source
from ncp.store.db import make_engine, migrate, session_factory
from tests.support.index_dump import dump_index
from tests.support.orthanc import OrthancServer


def index_dump(url: str, source: FolderSource | DicomwebSource) -> tuple[dict[str, object], int]:
    engine = make_engine(url)
    migrate(engine)
    sessions = session_factory(engine)
    run = index_source(sessions, source, batch_size=50)
    assert run.skipped == []
    with sessions() as session:
        dump = dump_index(session)
    engine.dispose()
    return dump, run.added


@pytest.mark.orthanc
def test_index_from_orthanc_equals_index_from_folder(
    tmp_path: Path, orthanc_empty: OrthancServer, db_url: str
) -> None:
    generate_examples(tmp_path / "data", patients=3, seed=11, big_patient_studies=5)
    archive = tmp_path / "data" / "dicom"
    files = sorted(p for p in archive.rglob("*.dcm"))
    assert orthanc_empty.upload(files) == len(files)

    from_folder, added = index_dump(f"sqlite:///{tmp_path}/folder.db", FolderSource(archive))
    with DicomwebSource(orthanc_empty.dicomweb_url) as source:
        from_orthanc, added_dw = index_dump(db_url, source)

    assert added == added_dw == len(files)
    assert from_folder["patients"] == from_orthanc["patients"]
    assert from_folder["studies"] == from_orthanc["studies"]
    assert from_folder["series"] == from_orthanc["series"]
    assert from_folder["instances"] == from_orthanc["instances"]
    modalities = {s["modalities"] for s in from_folder["studies"].values()}  # type: ignore[attr-defined]
    assert len(modalities) > 3, "the sample should cover several modalities"
