"""Shared set-up for the benchmarks: a throwaway installation with the test handlers."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import Installation  # noqa: E402


def installation(name: str, settings: dict | None = None, base: Path | None = None) -> Installation:
    folder = Path(tempfile.mkdtemp(prefix=f"engine-bench-{name}-", dir=base))
    return Installation(folder / "engine", settings=settings)


def line(label: str, value: float, unit: str, goal: str = "", digits: int = 1) -> None:
    print(f"  {label:<58} {value:>12,.{digits}f} {unit:<10} {goal}")
