"""Engine and migration plumbing that the migration tests do not reach."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from ncp.store.db import alembic_config, make_engine, migrate


def test_percent_in_the_url_does_not_break_migrations(tmp_path: Path) -> None:
    (tmp_path / "100% data").mkdir()
    # URL-encoded, as a password with a '%' would be; SQLAlchemy decodes it to the folder name.
    engine = make_engine(f"sqlite:///{tmp_path}/100%25 data/index.db")
    migrate(engine)
    assert (tmp_path / "100% data" / "index.db").exists()
    cfg = alembic_config(engine)
    assert cfg.get_main_option("sqlalchemy.url") == engine.url.render_as_string(hide_password=False)
    engine.dispose()


def test_foreign_keys_are_on_again_after_migrating(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/index.db")
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    engine.dispose()
