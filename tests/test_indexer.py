"""The study index built from a folder: contents, incremental runs, bad files, on both engines."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.fileset import FileSet
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.dicom.folder import FolderSource
from ncp.errors import UnreadableInstance
from ncp.provider.indexer import index_source
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Instance, Patient, SourceObject, Study
from ncp.store.queries import patient_studies
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.index_dump import dump_index

ROOT = "1.2.826.0.1.3680043.10.99"


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine: Engine = make_engine(db_url)
    migrate(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    folder = tmp_path / "archive"
    folder.mkdir()
    return folder


def uid(*parts: int) -> str:
    return ".".join([ROOT, *map(str, parts)])


def write_study(
    folder: Path,
    patient: str,
    study: int,
    series_spec: dict[int, tuple[str, str | None, int]],
    **attrs: object,
) -> list[Path]:
    """series_spec: series number -> (modality, body part, number of instances)."""
    paths = []
    for s, (modality, body, count) in series_spec.items():
        for i in range(1, count + 1):
            ds = make_instance(
                patient_id=patient,
                study_uid=uid(study),
                series_uid=uid(study, s),
                sop_uid=uid(study, s, i),
                Modality=modality,
                BodyPartExamined=body,
                SeriesNumber=s,
                InstanceNumber=i,
                **attrs,
            )
            paths.append(write_instance(folder / patient / str(study) / f"{s}-{i}.dcm", ds))
    return paths


def test_index_holds_aggregates_of_its_instances(
    archive: Path, sessions: sessionmaker[Session]
) -> None:
    paths = write_study(
        archive, "PAT1", 1, {1: ("CT", "CHEST", 3), 2: ("PT", "CHEST", 2), 3: ("CT", "ABDOMEN", 1)}
    )
    paths += write_study(archive, "PAT1", 2, {1: ("MR", None, 2)}, StudyDate="20230101")
    run = index_source(sessions, FolderSource(archive))
    assert (run.added, run.skipped, run.studies_touched) == (8, [], 2)

    with sessions() as session:
        studies = patient_studies(session, "PAT1", "")
        assert [s.study_uid for s in studies] == [uid(1), uid(2)]  # newest first
        ct = studies[0]
        assert ct.modalities == "CT\\PT"
        assert ct.body_parts == "ABDOMEN\\CHEST"
        assert (ct.num_series, ct.num_instances) == (3, 6)
        assert ct.size_bytes == sum(p.stat().st_size for p in paths[:6])
        mr = studies[1]
        assert (mr.modalities, mr.body_parts, mr.num_instances) == ("MR", "", 2)
        sizes = dict(session.execute(select(Instance.sop_uid, Instance.size_bytes)).all())
        assert sizes[uid(1, 1, 1)] == paths[0].stat().st_size


def test_second_run_changes_nothing(archive: Path, sessions: sessionmaker[Session]) -> None:
    write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 4)})
    (archive / "notes.txt").write_text("not an image")
    index_source(sessions, FolderSource(archive))
    with sessions() as session:
        before = dump_index(session)
    run = index_source(sessions, FolderSource(archive))
    assert (run.added, run.updated, run.removed, run.unchanged) == (0, 0, 0, 5)  # 4 + the text file
    assert run.skipped == []  # a skipped file is not read again until it changes
    with sessions() as session:
        assert dump_index(session) == before


def test_incremental_add_change_remove(archive: Path, sessions: sessionmaker[Session]) -> None:
    paths = write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 3)})
    index_source(sessions, FolderSource(archive))

    write_study(archive, "PAT1", 1, {2: ("CT", "CHEST", 1)})
    run = index_source(sessions, FolderSource(archive))
    assert (run.added, run.updated, run.unchanged) == (1, 0, 3)

    # Rewrite the representative instance (smallest SOP UID) with a new description.
    ds = make_instance(
        patient_id="PAT1",
        study_uid=uid(1),
        series_uid=uid(1, 1),
        sop_uid=uid(1, 1, 1),
        StudyDescription="Corrected description",
    )
    write_instance(paths[0], ds)
    os.utime(paths[0], ns=(1, 2_000_000_000_000_000_000))
    run = index_source(sessions, FolderSource(archive))
    assert (run.added, run.updated, run.unchanged) == (0, 1, 3)
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.description == "Corrected description"
        assert study.num_instances == 4

    paths[1].unlink()
    run = index_source(sessions, FolderSource(archive))
    assert run.removed == 1
    with sessions() as session:
        assert session.scalars(select(Study)).one().num_instances == 3


def test_removing_every_instance_removes_study_and_patient(
    archive: Path, sessions: sessionmaker[Session]
) -> None:
    write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 2)})
    write_study(archive, "PAT2", 2, {1: ("MR", "HEAD", 1)})
    index_source(sessions, FolderSource(archive))
    shutil.rmtree(archive / "PAT1")
    run = index_source(sessions, FolderSource(archive))
    assert run.removed == 2
    with sessions() as session:
        assert session.scalars(select(Patient.patient_id)).all() == ["PAT2"]
        assert session.scalars(select(Study.study_uid)).all() == [uid(2)]
        assert session.scalar(select(func.count(SourceObject.id))) == 1


def test_moved_file_is_reindexed_not_refused_as_duplicate(
    archive: Path, sessions: sessionmaker[Session]
) -> None:
    paths = write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 2)})
    index_source(sessions, FolderSource(archive))
    target = archive / "moved" / "x.dcm"
    target.parent.mkdir()
    paths[0].rename(target)
    run = index_source(sessions, FolderSource(archive))
    assert (run.removed, run.added, run.skipped) == (1, 1, [])
    with sessions() as session:
        locators = session.scalars(select(Instance.locator).order_by(Instance.locator)).all()
        assert locators == ["PAT1/1/1-2.dcm", "moved/x.dcm"]


def test_duplicate_sop_instance_is_skipped_and_taken_up_when_original_goes(
    archive: Path, sessions: sessionmaker[Session]
) -> None:
    paths = write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 1)})
    copy = archive / "zz-copy.dcm"
    shutil.copy(paths[0], copy)
    run = index_source(sessions, FolderSource(archive))
    assert run.added == 1
    assert run.skipped == [("zz-copy.dcm", "duplicate of PAT1/1/1-1.dcm")]

    paths[0].unlink()
    run = index_source(sessions, FolderSource(archive))
    assert (run.removed, run.added) == (1, 1)
    with sessions() as session:
        assert session.scalars(select(Instance.locator)).all() == ["zz-copy.dcm"]


def test_bad_files_are_skipped_with_reasons_never_fatal(
    archive: Path, sessions: sessionmaker[Session]
) -> None:
    good = write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 1)})[0]
    data = good.read_bytes()
    (archive / "empty.dcm").write_bytes(b"")
    (archive / "text.txt").write_text("hello")
    (archive / "truncated.dcm").write_bytes(data[:200])
    (archive / "garbage.dcm").write_bytes(data[:132] + os.urandom(400))
    write_instance(archive / "no-patient.dcm", make_instance(patient_id="", sop_uid=uid(9, 9, 9)))
    os.symlink(good, archive / "link.dcm")

    run = index_source(sessions, FolderSource(archive))
    assert run.added == 1
    reasons = dict(run.skipped)
    assert set(reasons) == {
        "empty.dcm",
        "text.txt",
        "truncated.dcm",
        "garbage.dcm",
        "no-patient.dcm",
        "link.dcm",
    }
    assert "no DICM prefix" in reasons["text.txt"]
    assert "no DICM prefix" in reasons["empty.dcm"]
    assert "PatientID" in reasons["no-patient.dcm"]
    assert "symbolic link" in reasons["link.dcm"]
    with sessions() as session:
        skipped = session.scalar(
            select(func.count(SourceObject.id)).where(SourceObject.skipped_reason.is_not(None))
        )
        assert skipped == 6

    # A skipped file that is repaired is picked up on the next run.
    shutil.copy(good, archive / "truncated.dcm")
    write_instance(
        archive / "truncated.dcm",
        make_instance(
            patient_id="PAT3", study_uid=uid(3), series_uid=uid(3, 1), sop_uid=uid(3, 1, 1)
        ),
    )
    run = index_source(sessions, FolderSource(archive))
    assert run.added == 1


def test_file_that_turns_corrupt_leaves_the_index(
    archive: Path, sessions: sessionmaker[Session]
) -> None:
    paths = write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 2)})
    index_source(sessions, FolderSource(archive))
    paths[1].write_bytes(b"overwritten")
    run = index_source(sessions, FolderSource(archive))
    assert run.removed == 1
    with sessions() as session:
        assert session.scalars(select(Study.num_instances)).one() == 1


def test_study_attributes_do_not_depend_on_listing_order(tmp_path: Path) -> None:
    dumps = []
    for order in (("a", "b"), ("b", "a")):
        folder = tmp_path / "-".join(order)
        for name, sop, desc in zip(
            order, (uid(1, 1, 1), uid(1, 1, 2)), ("First", "Second"), strict=True
        ):
            write_instance(
                folder / f"{name}.dcm",
                make_instance(
                    study_uid=uid(1), series_uid=uid(1, 1), sop_uid=sop, StudyDescription=desc
                ),
            )
        engine = make_engine(f"sqlite:///{folder}.db")
        migrate(engine)
        sessions = session_factory(engine)
        index_source(sessions, FolderSource(folder))
        with sessions() as session:
            dumps.append(dump_index(session))
            assert session.scalars(select(Study.description)).one() == "First"  # smallest SOP UID
        engine.dispose()
    assert dumps[0] == dumps[1]


def test_patient_identifiers_match_exactly(archive: Path, sessions: sessionmaker[Session]) -> None:
    write_study(archive, "pat200", 1, {1: ("CT", "CHEST", 1)})
    write_study(archive, "PAT200", 2, {1: ("CT", "CHEST", 1)})
    write_study(archive, "PAT2001", 3, {1: ("CT", "CHEST", 1)})
    index_source(sessions, FolderSource(archive))
    with sessions() as session:
        assert [s.study_uid for s in patient_studies(session, "PAT200", "")] == [uid(2)]
        assert [s.study_uid for s in patient_studies(session, "pat200", "")] == [uid(1)]
        assert patient_studies(session, "PAT2*", "") == []
        assert patient_studies(session, "PAT200", "other-issuer") == []


def test_media_layout_with_dicomdir_indexes_like_a_tree(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    tree = tmp_path / "tree"
    paths = write_study(tree, "PAT1", 1, {1: ("CT", "CHEST", 2), 2: ("MR", "HEAD", 1)})
    media = tmp_path / "media"
    fs = FileSet()
    for p in paths:
        fs.add(p)
    fs.write(media)
    assert (media / "DICOMDIR").exists()

    run = index_source(sessions, FolderSource(media))
    assert (run.added, run.skipped) == (3, [])
    with sessions() as session:
        media_dump = dump_index(session)

    # A medium with a file gone is indexed as far as it goes and names the missing file.
    victim = next(p for p in (media / "PT000000").rglob("*") if p.is_file())
    victim.unlink()
    run = index_source(sessions, FolderSource(media))
    assert run.removed == 1
    assert [why for _, why in run.skipped] == ["listed in DICOMDIR but missing"]
    assert media_dump["studies"][uid(1)]["num_instances"] == 3


def test_locators_cannot_leave_the_folder(tmp_path: Path) -> None:
    source = FolderSource(tmp_path)
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../x", "a//b", "./a", "a\x00b"):
        with pytest.raises(UnreadableInstance, match="leaves the archive folder"):
            source.path_of(bad)


def test_worker_processes_build_the_same_index(archive: Path, tmp_path: Path) -> None:
    write_study(archive, "PAT1", 1, {1: ("CT", "CHEST", 7), 2: ("PT", "CHEST", 5)})
    write_study(archive, "PAT2", 2, {1: ("MR", "HEAD", 6)})
    (archive / "junk.bin").write_bytes(b"\x00" * 300)
    dumps, runs = [], []
    for workers in (1, 2):
        engine = make_engine(f"sqlite:///{tmp_path}/w{workers}.db")
        migrate(engine)
        sessions = session_factory(engine)
        runs.append(index_source(sessions, FolderSource(archive), batch_size=4, workers=workers))
        with sessions() as session:
            dumps.append(dump_index(session))
        engine.dispose()
    assert dumps[0] == dumps[1]
    assert (
        runs[0].skipped
        == runs[1].skipped
        == [("junk.bin", "not a DICOM Part 10 file (no DICM prefix)")]
    )
    assert runs[1].added == 18
