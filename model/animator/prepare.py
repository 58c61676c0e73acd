"""Portrait preparation: everything the per-frame path needs, as plain arrays.

Face landmarks (MediaPipe), the portrait with its lip gap refilled, the local
(face) and global (head/body) basis displacement fields, and the colours of the
painted mouth and lash line. Deterministic for the same image.
"""
from __future__ import annotations

import logging

import numpy as np

from model.animator.body_rig import GLOBAL_BASES, build_global_fields, coarse_grid
from model.animator.eyes import lash_colour
from model.animator.grid import FieldGrid
from model.animator.mouth import fill_lip_gap, mouth_palette
from model.animator.rig import LOCAL_BASES, build_local_fields, local_grid
from model.base import PreparedPortrait
from model.errors import NoFaceError, PortraitError
from model.face_mesh import detect_faces

logger = logging.getLogger(__name__)

#: Smallest usable face, pixels from forehead to chin.
MIN_FACE_HEIGHT = 40


def _grid_meta(grid: FieldGrid) -> list[float]:
    return [grid.x0, grid.y0, grid.scale, grid.shape[0], grid.shape[1]]


def grid_from_meta(values: list[float]) -> FieldGrid:
    """Inverse of the grid entries written into PreparedPortrait.meta."""
    x0, y0, scale, rows, cols = values
    return FieldGrid(float(x0), float(y0), float(scale), (int(rows), int(cols)))


def prepare_portrait(image: np.ndarray, name: str, version: str) -> PreparedPortrait:
    """Prepare an RGB uint8 (H, W, 3) portrait for animation.

    Uses the largest face (logs a warning when there are several). Raises
    NoFaceError when no face is found, PortraitError when the image is not
    RGB uint8 or the face is under MIN_FACE_HEIGHT pixels tall.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise PortraitError(
            f"portrait must be an RGB uint8 array of shape (H, W, 3), got "
            f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        )
    faces = detect_faces(image)
    if not faces:
        raise NoFaceError("no face found in the portrait; use a photo with one clearly visible, roughly frontal face")
    if len(faces) > 1:
        logger.warning("portrait has %d faces; animating the largest one", len(faces))
    landmarks = faces[0]
    face_height = float(np.linalg.norm(landmarks[152, :2] - landmarks[10, :2]))
    if face_height < MIN_FACE_HEIGHT:
        raise PortraitError(
            f"the face is only {face_height:.0f} pixels tall; at least {MIN_FACE_HEIGHT} pixels are needed"
        )
    local = local_grid(landmarks, image.shape[:2])
    coarse = coarse_grid(image.shape[:2])
    arrays = {
        "image": fill_lip_gap(image, landmarks),
        "landmarks": landmarks.astype(np.float32),
        "local_fields": build_local_fields(landmarks, local),
        "global_fields": build_global_fields(landmarks, coarse),
        "palette": mouth_palette(image, landmarks),
        "lash": lash_colour(image, landmarks),
    }
    meta = {
        "generator": name,
        "version": version,
        "local_bases": list(LOCAL_BASES),
        "global_bases": list(GLOBAL_BASES),
        "local_grid": _grid_meta(local),
        "global_grid": _grid_meta(coarse),
        "face_height": face_height,
        "faces_found": len(faces),
    }
    return PreparedPortrait(arrays=arrays, meta=meta)
