"""Loading a portrait image with the checks every generator relies on."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.errors import PortraitError

logger = logging.getLogger(__name__)

MIN_SIDE = 128  # pixels, short side
MAX_SIDE = 1024  # pixels, long side; larger images are downscaled


def load_portrait(source: str | Path | bytes, size: int | None = None) -> np.ndarray:
    """Decode a portrait (path or encoded bytes) to RGB uint8 (H, W, 3).

    ``size``: if given, the image is scaled (Lanczos) so its long side is ``size``
    pixels, both sides rounded down to even numbers (H.264 needs even sizes).
    Otherwise images whose long side exceeds MAX_SIDE pixels are downscaled to
    MAX_SIDE with a logged note. Raises PortraitError for a missing file, bytes
    that are not an image, or a short side below MIN_SIDE pixels.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PortraitError(f"portrait file not found: {path}")
        data = path.read_bytes()
    else:
        data = source
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise PortraitError(
            f"portrait is not a readable image ({exc.__class__.__name__}); accepted: PNG, JPEG, WebP, BMP"
        ) from exc
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise PortraitError(
            f"portrait is {width}x{height} pixels; the short side must be at least {MIN_SIDE} pixels"
        )
    target = size if size is not None else min(max(width, height), MAX_SIDE)
    scale = target / max(width, height)
    new_size = (2 * int(width * scale / 2), 2 * int(height * scale / 2))
    if new_size != (width, height):
        if scale < 1 and size is None:
            logger.warning("portrait is %dx%d pixels; downscaled to %dx%d", width, height, *new_size)
        image = image.resize(new_size, Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8).copy()
