"""Thumbnails: a small WebP beside each published PNG (`00000-42.png` -> `00000-42.thumb.webp`),
made when its session's result.json is written, so a page of thousands of images loads thumbnails
and never a full-size PNG. One made later on demand is the same file."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

SIZE = 256  # the longer side, in pixels
SUFFIX = ".thumb.webp"


def thumbnail_path(png: Path) -> Path:
    return png.with_name(png.stem + SUFFIX)


def make_thumbnail(png: Path) -> Path:
    """The thumbnail of a PNG, made (under a temporary name, then renamed) when it is missing or
    older than the PNG; returns its path."""
    target = thumbnail_path(png)
    try:
        if target.stat().st_mtime >= png.stat().st_mtime:
            return target
    except FileNotFoundError:
        pass
    with Image.open(png) as image:
        image.thumbnail((SIZE, SIZE))
        picture = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
        staged = target.with_name(f".{target.name}.{os.getpid()}.part")
        picture.save(staged, format="WEBP", quality=80, method=4)
    os.replace(staged, target)
    return target
