"""Resolving user-given relative paths strictly inside their allowed folders."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from engine.errors import UnsafePath, ValidationError


def resolve_inside(base: Path, relative: str, field: str, must_exist: bool = True) -> Path:
    """`base / relative`, refusing absolute paths, `..`, and symlinks that lead outside `base`."""
    if not relative or "\x00" in relative:
        raise UnsafePath(f"{field}: an empty or NUL-bearing path", [{"loc": field}])
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or PureWindowsPath(relative).drive:
        raise UnsafePath(f"{field}: absolute paths are refused ({relative!r}); give a path relative to the inbox",
                         [{"loc": field}])
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafePath(f"{field}: '..' is refused in {relative!r}", [{"loc": field}])
    root = base.resolve()
    candidate = root.joinpath(*[p for p in parts if p not in ("", ".")])
    resolved = Path(os.path.realpath(candidate))
    if resolved != root and root not in resolved.parents:
        raise UnsafePath(f"{field}: {relative!r} leads outside its folder (a symlink?)", [{"loc": field}])
    if must_exist and not resolved.is_file():
        raise ValidationError(f"{field}: file not found: {relative}", [{"loc": field}])
    return resolved
