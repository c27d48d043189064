"""What an operator runs beside jobs: replaying and checking the log, read-only SQL and its role,
the compiled path's warm-up, the model catalogue and the devices, metrics and log lines, and
reading a job file as the inbox reads it. The CLI's admin commands and the HTTP door's /metrics
are thin over these."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from engine.config import Config


def rebuild(engine) -> dict[str, int]:
    """Drop the status tables and replay the event log; the rows of each table."""
    return engine.store.rebuild()


def verify(engine) -> list[str]:
    """What the status tables hold that a replay of the log would not (empty: they agree)."""
    return engine.store.verify()


def sql(config: Config, query: str, say: Callable[[str], None] | None = None) -> tuple[list[str], list]:
    """One read-only statement (engine.store.console), within [database] sql_timeout_seconds and
    its bounds of rows and bytes; `say` hears what was cut or where it stopped."""
    from engine.app import require_installation
    from engine.store.console import run_sql

    require_installation(config)
    return run_sql(config, query, say)


def sql_role(config: Config, name: str, password: str | None) -> str:
    """A PostgreSQL role that can only read this database; the URL for [database] readonly_url."""
    from engine.app import require_installation
    from engine.store.console import create_reader

    require_installation(config)
    return create_reader(config, name, password)


def read_job_file(engine, path: Path) -> bytes:
    """A job file's bytes, read and refused as the inbox reads and refuses them (its size limit,
    a name or content it would not take); OSError when it cannot be read."""
    from engine.ingest.seen import look_at, refusal

    seen = look_at(path, engine.config.get("inbox", "max_file_bytes"))
    refused = refusal(seen)
    if refused is not None:
        raise refused
    return seen.raw


def workflows(config: Config) -> dict:
    """The workflow templates of this config (built in, and [paths] workflows), by id."""
    from engine.workflows import load_workflows

    return load_workflows(config.workflows_dir)


def workflow_estimate(config: Config, workflow_id: str, params: Any) -> dict[str, Any]:
    """A workflow's resolved steps and its memory and time estimate for these params, read without
    an installation (`engine workflows ID`)."""
    from engine.domains.estimate import estimate
    from engine.ingest.jobs import validate_params
    from engine.workflows import get_workflow

    found = get_workflow(workflows(config), workflow_id)
    given = validate_params(params, "params")
    return {"id": found.id, "description": found.description, "steps": found.resolve(given.model_dump()),
            "estimate": estimate(config, found, given)}


def devices() -> list:
    from engine.domains.device import discover

    return discover()


def model_catalogue(config: Config):
    """The model registry of this config, read without an installation (`engine models`)."""
    from engine.domains.catalogue import ModelRegistry

    return ModelRegistry(config.models_dir, config.get("models", "allow_pickle"), config.get("models", "default"))


def model_needs(entry, config: Config) -> dict[str, float] | None:
    """GiB a pipeline needs on a GPU, whole and offloaded (engine.domains.estimate.model_needs)."""
    from engine.domains.estimate import model_needs as needs

    return needs(entry, config)


def default_precision(config: Config) -> str:
    from engine.domains.catalogue import default_precision as precision

    return precision(config)


def warmup(engine, model_id: str, sizes: str, batch_sizes: list[int], steps: int,
           done: Callable[[tuple, float, bool], None]) -> list[dict[str, Any]]:
    """Compile a model's fast path for these sizes (comma-separated WIDTHxHEIGHT) and call sizes."""
    from engine.run.warmup import parse_size, warmup as warm

    shapes = [parse_size(s) for s in sizes.split(",") if s.strip()]
    return warm(engine.config, engine.store, engine.handlers.shared, model_id, shapes, batch_sizes, steps, done)


def shapes_of(sizes: str) -> int:
    """How many sizes a --sizes list names (each checked)."""
    from engine.run.warmup import parse_size

    return len([parse_size(s) for s in sizes.split(",") if s.strip()])


def configure_logs(config: Config, log_format: str | None = None) -> None:
    """Log lines on stderr at [logging] level, plain or JSON (`log_format`, else [logging] format)."""
    from engine import logs

    logs.configure(config.get("logging", "level"), log_format or config.get("logging", "format"))


def serve_metrics(config: Config, port: int) -> None:
    """Prometheus metrics at http://127.0.0.1:PORT/metrics, from a store of their own."""
    from engine import metrics
    from engine.store import Store

    metrics.serve_metrics(Store.from_config(config), port)


def metrics_exposition(engine) -> Callable[[], tuple[bytes, str]]:
    """The /metrics body and its content type, as a function of no arguments (its registry made once)."""
    from engine import metrics

    registry = metrics.registry_for(engine.store)
    return lambda: metrics.exposition(registry)


def build_demo_models(config: Config, say: Callable[[str], None]) -> None:
    """A tiny SDXL-architecture pipeline and a tiny upscaler (random weights), built in code and
    registered, unless they are there already."""
    from engine.domains.tinymodels import build_tiny_sdxl, build_tiny_upscaler

    registry = model_catalogue(config)
    if "tiny-sdxl" not in registry.entries():
        say("building a tiny SDXL-architecture model in code (random weights: it draws noise)")
        build_tiny_sdxl(config.models_dir / "tiny-sdxl")
    if "tiny-upscaler" not in registry.entries():
        build_tiny_upscaler(config.models_dir / "tiny-upscaler.safetensors")
        registry.add(config.models_dir / "tiny-upscaler.safetensors", "tiny-upscaler", "upscaler")


def contact_sheet(labelled: list[tuple[Path, str]], path: Path, thumb: int, columns: int) -> Path | None:
    """A grid of these images, each labelled (engine.outbox.sheets)."""
    from engine.outbox.sheets import contact_sheet as sheet

    return sheet(labelled, path, thumb=thumb, columns=columns)


def seed_label(name: str) -> str:
    from engine.outbox.sheets import seed_label as label

    return label(name)
