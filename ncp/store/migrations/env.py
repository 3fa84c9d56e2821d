"""Alembic environment: runs on the connection the caller hands over (see ncp.store.db.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

# Imported for their tables on Base.metadata: the audit trail, B's retrieval jobs, the portal.
import ncp.audit.models
import ncp.store.portal
import ncp.store.retrieval  # noqa: F401
from ncp.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run(conn)
