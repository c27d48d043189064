"""Schema migrations through Alembic: `engine init` runs `upgrade head`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

# The repository's top-level migrations/, installed as the package engine.migrations (pyproject's package-dir).
MIGRATIONS_DIR = Path(str(files("engine.migrations")))


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(store) -> None:
    """Bring the database to the newest schema, using the store's writer connection."""
    from engine.store.errors import DRIVER_ERRORS, translate

    config = alembic_config(store.url)
    try:
        with store.reader.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except DRIVER_ERRORS as exc:
        raise translate(exc) from exc
