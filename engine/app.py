"""Putting an installation together from its config: folders, schema, store, handlers, runner."""

from __future__ import annotations

import logging

from engine.config import Config
from engine.run.handlers import Registry, load_registry
from engine.store import Store
from engine.store.migrate import upgrade


def init(config: Config) -> Store:
    """Create the folders and bring the database to the newest schema (idempotent)."""
    for folder in (config.inbox, config.inbox / "accepted", config.inbox / "rejected", config.outbox,
                   config.models_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if not config.get("database", "url"):
        config.path("database").parent.mkdir(parents=True, exist_ok=True)
    store = Store.from_config(config)
    upgrade(store)
    return store


def require_installation(config: Config) -> None:
    """Refuse, creating nothing, where no installation is: a SQLite database that does not exist."""
    from engine.errors import NotFound

    if not config.get("database", "url") and not config.path("database").is_file():
        where = f"with {config.source}" if config.source else f"in {config.base_dir} (no config.toml here)"
        raise NotFound(f"no engine installation {where}: {config.path('database')} does not exist; "
                       "run `engine init` first, or pass --config PATH to an installation's config.toml")


def open_store(config: Config) -> Store:
    """The store of an existing installation (see require_installation)."""
    require_installation(config)
    return Store.from_config(config)


def registry_for(config: Config) -> Registry:
    return load_registry(config.get("handlers", "modules"))


def quiet_libraries() -> None:
    """Keep third-party progress bars and chatter out of the engine's own output."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    for name in ("diffusers", "transformers", "alembic", "watchdog"):
        logging.getLogger(name).setLevel(logging.ERROR)

