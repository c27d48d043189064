"""Configuration: config.toml plus ENGINE_<SECTION>_<KEY> environment overrides.

Relative paths resolve against the folder that holds config.toml, so a copy of config.toml in an
empty folder is a complete, separate installation.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ValidationError

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")


def _coerce(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, list):
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


OWNER_KEYS = {"weight": (int, float), "max_running": int, "max_pending": int, "rate": int}


def _owners(values: dict, where: str) -> dict:
    """[owners.NAME] tables: each key known, each value a number of its kind, none negative."""
    checked = {}
    for owner, limits in values.items():
        if not isinstance(limits, dict):
            raise ValidationError(f"{where}: [owners.{owner}] must be a table (weight, max_running, max_pending, rate)")
        for key, value in limits.items():
            kind = OWNER_KEYS.get(key)
            if kind is None:
                raise ValidationError(f"{where}: unknown key owners.{owner}.{key}; one of {', '.join(OWNER_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
                raise ValidationError(f"{where}: owners.{owner}.{key} = {value!r}: a number, 0 or more")
        checked[str(owner)] = dict(limits)
    return checked


def _merge(defaults: dict, overrides: dict, where: str) -> dict:
    merged = {section: dict(values) for section, values in defaults.items()}
    for section, values in overrides.items():
        if section == "owners" and isinstance(values, dict):
            merged["owners"] = {**merged.get("owners", {}), **_owners(values, where)}
            continue
        if section not in merged or not isinstance(values, dict):
            raise ValidationError(f"{where}: unknown section [{section}]")
        for key, value in values.items():
            if key not in merged[section]:
                raise ValidationError(f"{where}: unknown key {section}.{key}")
            merged[section][key] = value
    return merged


@dataclass(frozen=True)
class Config:
    """The resolved settings; `values[section][key]`, with paths made absolute."""

    base_dir: Path
    values: dict
    source: Path | None

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def path(self, key: str) -> Path:
        value = self.values["database"]["path"] if key == "database" else self.values["paths"][key]
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def database_url(self) -> str:
        """The store's SQLAlchemy URL; the SQLite file's path is quoted, so `#` and `?` in it stay
        part of the path."""
        from sqlalchemy.engine import URL

        url = self.values["database"]["url"]
        return url or URL.create("sqlite", database=str(self.path("database"))).render_as_string(hide_password=False)

    @property
    def inbox(self) -> Path:
        return self.path("inbox")

    @property
    def outbox(self) -> Path:
        return self.path("outbox")

    @property
    def models_dir(self) -> Path:
        return self.path("models")

    @property
    def workflows_dir(self) -> Path | None:
        value = self.values["paths"]["workflows"]
        return self.path("workflows") if value else None


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load config.toml (explicit path, else $ENGINE_CONFIG, else ./config.toml, else defaults)."""
    environ = dict(os.environ if environ is None else environ)
    defaults = tomllib.loads(DEFAULTS_FILE.read_text())
    chosen = Path(path) if path else (Path(environ["ENGINE_CONFIG"]) if environ.get("ENGINE_CONFIG") else None)
    if chosen is None and Path("config.toml").is_file():
        chosen = Path("config.toml")
    values = defaults
    if chosen is not None:
        chosen = chosen.resolve()
        if not chosen.is_file():
            raise ValidationError(f"config file not found: {chosen}")
        try:
            values = _merge(defaults, tomllib.loads(chosen.read_text()), str(chosen))
        except tomllib.TOMLDecodeError as exc:
            raise ValidationError(f"{chosen}: {exc}") from exc
    for section, keys in values.items():
        for key, default in keys.items():
            env_name = f"ENGINE_{section}_{key}".upper()
            if env_name in environ:
                try:
                    values[section][key] = _coerce(environ[env_name], default)
                except ValueError as exc:
                    raise ValidationError(f"{env_name}: {exc}") from exc
    precision = values["models"]["precision"]
    if precision:
        from engine.domains.catalogue import PRECISIONS  # only then: the catalogue is not light to import
    if precision and precision not in PRECISIONS:
        raise ValidationError(f"{chosen or 'config'}: models.precision = {precision!r}: one of {', '.join(PRECISIONS)}, "
                              "or empty for [device] dtype")
    if values["models"]["fp8_scaling"] not in ("row", "tensor"):
        raise ValidationError(f"{chosen or 'config'}: models.fp8_scaling = {values['models']['fp8_scaling']!r}: "
                              "row or tensor")
    if values["device"]["offload"] not in ("auto", "off"):
        raise ValidationError(f"{chosen or 'config'}: device.offload = {values['device']['offload']!r}: auto or off")
    level = values["outbox"]["png_compress_level"]
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValidationError(f"{chosen or 'config'}: outbox.png_compress_level = {level!r}: a whole number from 0 to 9")
    base_dir = chosen.parent if chosen else Path.cwd()
    return Config(base_dir=base_dir, values=values, source=chosen)
