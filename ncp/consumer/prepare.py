"""The start of a job attempt: A's manifests of the job's studies, and what B holds already.

A's manifests are read once (through the peer client, with the HP's confirmation) and kept in
the job's records, so a resumed job verifies against the same manifests. Whatever B's store
holds of them (an earlier job's, or this job's own before a crash between the store and the
record) is recorded as done: never fetched, never stored again. What was left in the staging
folder is discarded and fetched again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable

from sqlalchemy import update

from ncp.consumer.attempt import Attempt, Declined
from ncp.consumer.grants import context, refusal
from ncp.consumer.localstore import StoreError
from ncp.consumer.manifests import manifest_to_json
from ncp.consumer.model import PeerRefused
from ncp.consumer.retrieve import Transient
from ncp.consumer.verify import StudyCheck
from ncp.store.retrieval import RetrievalJob, RetrievalJobStudy


def prepare(attempt: Attempt) -> None:
    """Manifests, what the store holds, and the checks the download verifies against."""
    shutil.rmtree(attempt.staging, ignore_errors=True)
    attempt.staging.mkdir(parents=True, exist_ok=True)
    wanted = [uid for uid in attempt.stored if uid not in attempt.manifests]
    if wanted:
        peer = attempt.env.peers(attempt.row.peer)
        try:
            found = peer.manifests(context(attempt), wanted)
        except PeerRefused as exc:
            raise refusal(exc) from None
        absent = [uid for uid in wanted if uid not in found]
        if absent:
            raise Declined(
                f"A lists no study {absent[0]} for this patient (unknown to A, or "
                "another patient's)"
            )
        for uid in wanted:
            manifest = found[uid]
            if manifest.patient != attempt.row.patient:
                raise Declined(f"A's manifest of study {uid} is for another patient")
            if manifest.study_uid != uid:
                raise Declined(f"A answered study {manifest.study_uid} for study {uid}")
            attempt.manifests[uid] = manifest
        _save_manifests(attempt, wanted)
    # What the store holds already is done: never fetched, never stored again.
    found_rows = []
    for uid, manifest in attempt.manifests.items():
        expected = {i.sop_instance_uid: s for s in manifest.series for i in s.instances}
        try:
            present = attempt.env.store.existing(uid)
        except StoreError as exc:
            raise Transient(str(exc)) from None
        for sop in sorted((present & expected.keys()) - attempt.stored[uid]):
            found_rows.append((uid, expected[sop].series_uid, sop))
    if found_rows:
        attempt.committer.record_present(found_rows)
    for uid, manifest in attempt.manifests.items():
        attempt.checks[uid] = StudyCheck(manifest, seen=attempt.stored[uid])


def _save_manifests(attempt: Attempt, uids: Iterable[str]) -> None:
    with attempt.env.sessions.begin() as session:
        for uid in uids:
            manifest = attempt.manifests[uid]
            session.execute(
                update(RetrievalJobStudy)
                .where(RetrievalJobStudy.job_id == attempt.row.id)
                .where(RetrievalJobStudy.study_uid == uid)
                .values(
                    manifest=manifest_to_json(manifest),
                    instances_total=manifest.instance_count,
                )
            )
        total = sum(m.instance_count for m in attempt.manifests.values())
        size = sum(m.size or 0 for m in attempt.manifests.values())
        session.execute(
            update(RetrievalJob)
            .where(RetrievalJob.id == attempt.row.id)
            .values(instances_total=total, bytes_total=size)
        )
