"""The one root: `Engine` puts an installation together from its config, once. It owns the
config, the store, the handler registry, the model catalogue, the intake and the outbox (with the
hook that writes result.json and summary.json after every commit that ends something), and builds
the runner and the inbox. Every door (CLI, stdio worker, live view), the tests and the benches get
what they need from it.
"""

from __future__ import annotations

import logging
from functools import cached_property

from engine.config import Config
from engine.errors import NotFound
from engine.store import Store


def create_folders(config: Config) -> None:
    for folder in (config.inbox, config.inbox / "accepted", config.inbox / "rejected", config.outbox,
                   config.models_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if not config.get("database", "url"):
        config.path("database").parent.mkdir(parents=True, exist_ok=True)


def require_installation(config: Config) -> None:
    """Refuse, creating nothing, where no installation is: a SQLite database that does not exist."""
    if not config.get("database", "url") and not config.path("database").is_file():
        where = f"with {config.source}" if config.source else f"in {config.base_dir} (no config.toml here)"
        raise NotFound(f"no engine installation {where}: {config.path('database')} does not exist; "
                       "run `engine init` first, or pass --config PATH to an installation's config.toml")


class Engine:
    """One installation: what every door, test and bench works through."""

    def __init__(self, config: Config, store: Store) -> None:
        from engine.outbox.folders import Outbox
        from engine.outbox.results import Results

        self.config = config
        self.store = store
        self.outbox = Outbox(config.outbox)
        from engine.notify.record import Recorder

        self.results = Results(self.outbox, store)
        store.after_commit.append(self.results.after_commit)
        # Webhook deliveries are recorded in the transaction of the event they report.
        store.before_commit[:] = [h for h in store.before_commit if not isinstance(h, Recorder)] + [Recorder(config)]
        self.traces = None  # engine.traces.Traces when [telemetry] traces is on
        from engine import traces

        traces.install(self)

    @classmethod
    def create(cls, config: Config) -> "Engine":
        """Create the folders and bring the database to the newest schema (idempotent): `engine
        init`, and every runner's start (an older installation is upgraded)."""
        from engine.store.migrate import upgrade

        create_folders(config)
        store = Store.from_config(config)
        try:
            upgrade(store)
        except BaseException:
            store.close()
            raise
        return cls(config, store)

    @classmethod
    def open(cls, config: Config) -> "Engine":
        """An existing installation, as it is (see require_installation)."""
        require_installation(config)
        return cls(config, Store.from_config(config))

    @cached_property
    def handlers(self):
        """The handler registry of `[handlers] modules` (the first worker's; see Registry.for_another_worker)."""
        from engine.run.handlers import load_registry

        return load_registry(self.config.get("handlers", "modules"))

    @cached_property
    def models(self):
        """The model catalogue of `[paths] models`."""
        from engine.domains.catalogue import ModelRegistry

        return ModelRegistry(self.config.models_dir, self.config.get("models", "allow_pickle"),
                             self.config.get("models", "default"))

    @cached_property
    def intake(self):
        """What a job is checked and resolved against: limits, workflows, models, devices."""
        from engine.ingest.intake import Intake

        return Intake(self.config, self.store, self.handlers, self.models)

    def runner(self, runner_id: str | None = None, **options):
        from engine.run.runner import Runner

        return Runner(self, runner_id=runner_id, **options)

    def inbox(self):
        from engine.ingest.inbox import Inbox

        return Inbox(self)

    def close(self) -> None:
        """Write what is owed to the outbox, then close the store."""
        try:
            self.results.close()
            if self.traces is not None:
                self.traces.flush()
        finally:
            hooks = [self.results.after_commit] + ([self.traces.after_commit] if self.traces else [])
            self.store.after_commit[:] = [h for h in self.store.after_commit if h not in hooks]
            self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


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
