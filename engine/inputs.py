"""Input images a job names (init, mask, ControlNet): read once, checked, decoded whole.

The same checks run at submit and again where a step opens the file: the pixel limit
(`limits.max_image_pixels`, read from the header before any pixel is decoded), a full decode (a
corrupt compressed stream is found here, not three attempts later), and the file's digest. The
digest taken at submit is recorded with the job's params (`input_digests`); a step refuses a file
whose digest differs, so a picture swapped while its job waits (held, queued) is never decoded.
Every refusal is a ValidationError: bad input, not worth another attempt.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ValidationError

BYTES_PER_PIXEL = 8  # 16-bit RGBA: no image file of N pixels needs more than this, uncompressed


@dataclass(frozen=True)
class InputImage:
    image: object  # PIL.Image.Image, decoded
    digest: str  # sha256 of the file's bytes

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def read_image(path: Path, field: str, max_pixels: int, expected_digest: str | None = None) -> InputImage:
    """The image at `path`, decoded, or a ValidationError that names `field` and says why."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.stat(path).st_size
        if size > max_pixels * BYTES_PER_PIXEL + (1 << 20):
            raise ValidationError(f"{field}: the file is {size} bytes, more than any image within "
                                  f"limits.max_image_pixels ({max_pixels}) needs", [{"loc": field}])
        with open(path, "rb") as handle:
            raw = handle.read(max_pixels * BYTES_PER_PIXEL + (1 << 20) + 1)
    except OSError as exc:
        raise ValidationError(f"{field}: cannot be read: {exc.strerror or exc}", [{"loc": field}]) from exc
    digest = hashlib.sha256(raw).hexdigest()
    if expected_digest and digest != expected_digest:
        raise ValidationError(f"{field}: the file changed after the job was submitted (its contents differ from what "
                              "was checked then); submit the job again to use the new picture", [{"loc": field}])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ValidationError(f"{field}: {width}x{height} is over limits.max_image_pixels "
                                          f"({max_pixels} pixels)", [{"loc": field}])
                image.load()
                decoded = image.copy()
    except ValidationError:
        raise
    except Image.DecompressionBombError as exc:
        raise ValidationError(f"{field}: over limits.max_image_pixels ({max_pixels} pixels): {exc}",
                              [{"loc": field}]) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValidationError(f"{field}: not a readable image ({exc})", [{"loc": field}]) from exc
    return InputImage(decoded, digest)


def digest_key(field: str) -> str:
    """`params.init_image` -> `init_image`: the key of a field's digest in `input_digests`."""
    return field.split("params.", 1)[-1].split("].", 1)[-1]
