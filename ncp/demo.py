"""``ncp demo``: country A on embedded defaults (SQLite, a folder archive, generated data).

What exists so far: it generates example studies and reports once, writes country A's node
config, indexes the archive and prints the metadata list of the patient with the most studies.
The network services (standard channel, gateways, country B and the portal) join it as they are
built; the data folder layout stays the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy import func, select

from ncp.config import load_settings
from ncp.dicom.archive import open_archive
from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER, generate_examples
from ncp.provider.indexer import index_source
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Patient, Study
from ncp.store.queries import patient_studies

COUNTRY_A = "AT"
ISSUER_A = DEFAULT_PATIENT_ID_ISSUER

_NODE_A = """\
# Country A of the demo: folder archive and SQLite, paths relative to this file.
[node]
country = "{country}"
name = "NCPeH-{country} imaging (demo)"
patient_id_issuer = "{issuer}"

[database]
url = "sqlite:///index.db"

[archive]
kind = "folder"
path = "../dicom"

[reports]
kind = "folder"
path = "../reports"
"""


def run_demo(data: Path, *, patients: int, seed: int, big_patient_studies: int) -> int:
    data = data.resolve()
    if not (data / "dicom").is_dir():
        print(f"generating example data for country {COUNTRY_A} into {data} ...", flush=True)
        s = generate_examples(
            data,
            patients=patients,
            seed=seed,
            big_patient_studies=big_patient_studies,
            country=COUNTRY_A,
            patient_id_issuer=ISSUER_A,
        )
        print(
            f"  {s.patients} patients, {s.studies} studies, {s.instances} instances, "
            f"{s.reports} reports"
        )
    config = data / "country-a" / "node.toml"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(_NODE_A.format(country=COUNTRY_A, issuer=ISSUER_A), encoding="utf-8")
    settings = load_settings(config)
    engine = make_engine(settings.database.url)
    migrate(engine)
    sessions = session_factory(engine)
    run = index_source(sessions, open_archive(settings.archive))
    print(
        f"index of country {COUNTRY_A}: {run.added} added, {run.updated} updated, "
        f"{run.unchanged} unchanged, {run.removed} removed, {len(run.skipped)} skipped"
    )
    with sessions() as session:
        top = session.execute(
            select(
                Patient.patient_id, Patient.family_name, Patient.given_name, func.count(Study.id)
            )
            .join(Study, Study.patient_pk == Patient.id)
            .where(Patient.issuer == settings.node.patient_id_issuer)
            .group_by(Patient.id, Patient.patient_id, Patient.family_name, Patient.given_name)
            .order_by(func.count(Study.id).desc(), Patient.patient_id)
        ).first()
        if top is None:
            print("the index is empty", file=sys.stderr)
            engine.dispose()
            return 1
        pid, family, given, count = top
        studies = patient_studies(session, pid, settings.node.patient_id_issuer)
    engine.dispose()
    print(f"\npatient {pid} ({given} {family}): {count} studies; the ten newest:")
    for st in studies[:10]:
        when = st.started.strftime("%Y-%m-%d") if st.started else "----------"
        print(
            f"  {when}  {st.modalities:<6} {(st.description or '')[:34]:<34} "
            f"{st.num_series:>2} series {st.num_instances:>4} instances "
            f"{st.size_bytes / 1e6:6.1f} MB"
        )
    print(f"\nconfig: {config}\nmore:   ncp studies --config {config} --patient {pid} --limit 50")
    print("ready: country A index (standard channel, gateways and country B are not built yet)")
    return 0
