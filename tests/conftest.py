from tests.support.database import empty_engine, engine  # noqa: F401
from tests.support.orthanc import orthanc, orthanc_empty  # noqa: F401
from tests.support.postgres import db_url, postgres_cluster, postgres_url  # noqa: F401
