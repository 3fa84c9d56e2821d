"""What only the demo may hold, and the check that refuses it anywhere else.

``ncp demo`` creates HP accounts in country B's portal whose password is printed on the screen and
written into ``demo.json`` with their TOTP secrets: logins anyone can read. They carry
:data:`DEMO_ORGANISATION_ID` as their organisation's identifier, which no real organisation has.
:func:`check_demo_accounts` finds them in the database of a node whose portal serves outside
the demo (``node.demo`` false) and makes that an error: ``ncp check-config`` reports it and
``ncp serve`` does not start. A deployment that began as a copy of a demo's database never serves
the demo's logins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ncp.config import NodeSettings

if TYPE_CHECKING:
    from ncp.ops.checks import Context, Findings

DEMO_ORGANISATION_ID = "urn:ncp:demo:organisation"
"""The organisation identifier of every HP account the demo creates (a URI, as the HP
assertion's ``subject_organization_id`` must be, in a namespace no real organisation uses)."""
DEMO_PASSWORD = "ncp-demo-password"
"""The password of every demo account: printed by ``ncp demo``, never valid outside it."""
CONNECT_TIMEOUT_S = 3


def demo_account_names(url: str) -> list[str] | None:
    """User names of the demo's accounts in the database at ``url``; None when the database
    holds no portal accounts at all (a SQLite file not made yet, a schema not migrated).
    Raises :class:`SQLAlchemyError` when the database cannot be read."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:" or not Path(database).is_file():
            return None  # never create a file while checking
        connect_args: dict[str, object] = {"timeout": CONNECT_TIMEOUT_S}
    else:
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S}
    from ncp.store.portal import HpAccount

    engine = create_engine(url, connect_args=connect_args, hide_parameters=True)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table(HpAccount.__tablename__):
                return None
            rows = connection.execute(
                select(HpAccount.username)
                .where(HpAccount.organisation_id == DEMO_ORGANISATION_ID)
                .order_by(HpAccount.username)
            )
            return [str(name) for (name,) in rows]
    finally:
        engine.dispose()


def check_demo_accounts(settings: NodeSettings, ctx: Context, findings: Findings) -> None:
    """Outside the demo, a portal that serves must not hold the demo's accounts."""
    if ctx.demo or not settings.portal.enabled:
        return
    try:
        names = demo_account_names(settings.database.url)
    except SQLAlchemyError as exc:
        findings.warning(
            ctx.config,
            "database.url",
            "could not look for the demo's portal accounts (the database does not answer: "
            f"{type(exc).__name__}); check again before serving",
        )
        return
    if names:
        findings.error(
            ctx.config,
            "portal",
            f"the database holds the demo's portal accounts ({', '.join(names)}), whose "
            "password and second factors are published: they log in in the demo only "
            "(node.demo); serve this portal from a database the demo never used",
        )
