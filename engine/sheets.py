"""Contact sheets: a grid of thumbnails with a label under each tile (a batch's item index and
seed; the demo's session names), written atomically as a PNG."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image, ImageDraw

from engine.files import atomic_write_bytes

LABEL_HEIGHT = 14
_SEED = re.compile(r"(\d+)\.png$")


def seed_label(name: str) -> str:
    """'seed N' from an image file named as the engine names them (…-<seed>.png), else ''."""
    found = _SEED.search(name)
    return f"seed {found.group(1)}" if found else ""


def contact_sheet(tiles: list[tuple[Path, str]], path: Path, thumb: int = 128, columns: int = 8) -> Path | None:
    """tiles: (image file, label) in order. None when there is nothing to show."""
    if not tiles:
        return None
    columns = min(columns, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    cell = thumb + LABEL_HEIGHT
    sheet = Image.new("RGB", (columns * thumb, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (image_path, label) in enumerate(tiles):
        x, y = (index % columns) * thumb, (index // columns) * cell
        try:
            with Image.open(image_path) as image:
                sheet.paste(image.convert("RGB").resize((thumb, thumb)), (x, y))
        except OSError:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline=(200, 0, 0))
        draw.text((x + 2, y + thumb + 1), label[: thumb // 6], fill=(0, 0, 0))
    encoded = io.BytesIO()
    sheet.save(encoded, format="PNG")
    atomic_write_bytes(path, encoded.getvalue())
    return path
