"""Contact sheets: a grid of thumbnails with a label under each tile (a batch's item index and
seed; the demo's session names), written atomically as a PNG.

Tiles of images this process saved are kept in a small cache keyed by the file's identity (inode,
size, modification time: a rename into the outbox keeps all three), so a batch's sheet does not
decode every full-size PNG again; a file the cache does not know is read from disk.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageDraw

from engine.files import atomic_write_bytes

LABEL_HEIGHT = 14
TILE = 128
_SEED = re.compile(r"(\d+)\.png$")
_TILES_KEPT = 2048  # 48 KiB each: about 100 MiB at most


class _TileCache:
    """Thumbnails of recently saved images, by file identity; least recently used go first."""

    def __init__(self, capacity: int) -> None:
        self._tiles: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: Path) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def remember(self, path: Path, image: Image.Image) -> None:
        key = self._key(path)
        if key is None:
            return
        tile = image.convert("RGB").resize((TILE, TILE))
        with self._lock:
            self._tiles[key] = tile
            while len(self._tiles) > self._capacity:
                self._tiles.popitem(last=False)

    def get(self, path: Path) -> Image.Image | None:
        key = self._key(path)
        with self._lock:
            tile = self._tiles.get(key) if key else None
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile


tiles = _TileCache(_TILES_KEPT)


def _tile(image_path: Path, thumb: int) -> Image.Image:
    kept = tiles.get(image_path) if thumb == TILE else None
    if kept is not None:
        return kept
    with Image.open(image_path) as image:
        return image.convert("RGB").resize((thumb, thumb))


def seed_of(name: str) -> int | None:
    """The seed an image file named as the engine names them (…-<seed>.png) was made with."""
    found = _SEED.search(name)
    return int(found.group(1)) if found else None


def seed_label(name: str) -> str:
    """'seed N' from an image file named as the engine names them (…-<seed>.png), else ''."""
    found = _SEED.search(name)
    return f"seed {found.group(1)}" if found else ""


def contact_sheet(labelled: list[tuple[Path, str]], path: Path, thumb: int = TILE, columns: int = 8) -> Path | None:
    """labelled: (image file, label) in order. None when there is nothing to show."""
    if not labelled:
        return None
    columns = min(columns, len(labelled))
    rows = (len(labelled) + columns - 1) // columns
    cell = thumb + LABEL_HEIGHT
    sheet = Image.new("RGB", (columns * thumb, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (image_path, label) in enumerate(labelled):
        x, y = (index % columns) * thumb, (index // columns) * cell
        try:
            sheet.paste(_tile(image_path, thumb), (x, y))
        except OSError:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline=(200, 0, 0))
        draw.text((x + 2, y + thumb + 1), label[: thumb // 6], fill=(0, 0, 0))
    encoded = io.BytesIO()
    sheet.save(encoded, format="PNG")
    atomic_write_bytes(path, encoded.getvalue())
    return path
