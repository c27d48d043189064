"""Writing files so that a reader never sees half of one: a temporary name, fsync, then a rename.

The temporary name is `.<name>.<random>.tmp`: two writers of the same file (two runners finishing
the same move, a retry beside a recovery) never share one. A write that fails (disk full,
read-only folder) removes its temporary file before the error goes up, so nothing is left behind.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def leftovers(path: Path) -> list[Path]:
    """Temporary files of writes of `path` that were cut short (a crash between write and rename)."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    return [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` under a temporary name first, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
