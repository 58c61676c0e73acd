"""Head and body controls: coarse whole-image displacement fields.

Head rotation is approximated for small angles: a point at depth d in front of
the head's rotation axis moves by d * angle sideways (yaw) or down (pitch), so
the nose moves more than the cheeks (parallax); roll turns about a pivot in the
neck. A soft head mask (1 on the head and hair, fading over the neck) limits all
head controls. Depth comes from the face mesh's z, spread over the image with a
membrane. Breathing lifts the shoulders and, less, the head.

Controls (GLOBAL_BASES) and units of a coefficient of 1: ``yaw``, ``pitch``,
``roll``: radians; ``shift_x``, ``shift_y``: head translation, pixels;
``breath``: shoulder lift, pixels.
"""
from __future__ import annotations

import numpy as np

from model.animator import landmarks as lm
from model.animator.grid import FieldGrid
from model.animator.landmarks import FaceFrame
from model.animator.membrane import MembraneSolver, border_cells

GLOBAL_BASES = ("yaw", "pitch", "roll", "shift_x", "shift_y", "breath")

#: Coarse grid cell size, pixels (fields are smooth; cv2.resize upsamples them).
COARSE_STEP = 4


def coarse_grid(image_shape: tuple[int, int]) -> FieldGrid:
    """Grid whose cells match cv2.resize's sampling when upsampling by COARSE_STEP:
    cell j lies at pixel COARSE_STEP * j + (COARSE_STEP - 1) / 2."""
    height, width = image_shape
    offset = (COARSE_STEP - 1) / 2
    shape = (-(-height // COARSE_STEP), -(-width // COARSE_STEP))
    return FieldGrid(offset, offset, 1.0 / COARSE_STEP, shape)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def head_mask(landmarks: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Soft head mask at pixel points (xs, ys) (same-shape arrays): 1 inside an
    ellipse around the face outline grown to take in hair and ears, falling
    smoothly to 0 at 1.6 times its radii."""
    frame = FaceFrame.from_landmarks(landmarks)
    oval = landmarks[list(lm.FACE_OVAL), :2].astype(np.float64)
    centre = oval.mean(axis=0) - 0.12 * frame.height * frame.down
    rel_x = xs - centre[0]
    rel_y = ys - centre[1]
    along = rel_x * frame.right[0] + rel_y * frame.right[1]
    across = rel_x * frame.down[0] + rel_y * frame.down[1]
    radius = np.hypot(along / (0.68 * frame.width), across / (0.72 * frame.height))
    return 1.0 - _smoothstep(1.0, 1.6, radius)


def build_global_fields(landmarks: np.ndarray, grid: FieldGrid) -> np.ndarray:
    """Forward displacement fields of the head and body controls on ``grid``.

    Returns float32 (len(GLOBAL_BASES), rows, cols, 2), (dx, dy) in pixels per
    unit of each control.
    """
    frame = FaceFrame.from_landmarks(landmarks)
    rows, cols = grid.shape
    xs, ys = grid.cell_centres()
    mask = head_mask(landmarks, xs, ys)

    # Depth in front of the rotation axis: the mesh's z (smaller is nearer) spread
    # with a membrane pinned at the landmarks and, far from the face, at the face edge.
    z = landmarks[:, 2].astype(np.float64)
    z_edge = float(z[list(lm.FACE_OVAL)].max())
    cells = np.rint(grid.to_grid(landmarks)).astype(np.int64)
    inside = (cells[:, 0] >= 0) & (cells[:, 0] < cols) & (cells[:, 1] >= 0) & (cells[:, 1] < rows)
    flat = cells[inside, 1] * cols + cells[inside, 0]
    uniq, inverse = np.unique(flat, return_inverse=True)
    z_cells = np.bincount(inverse, weights=z[inside]) / np.bincount(inverse)
    border = np.setdiff1d(border_cells(grid.shape), uniq)
    pinned = np.concatenate([uniq, border])
    z_values = np.concatenate([z_cells, np.full(len(border), z_edge)])[:, None]
    z_map = MembraneSolver(grid.shape, pinned).solve(z_values)[..., 0]
    # The axis sits 0.35 face widths behind the outline (about the neck's axis).
    depth = (z_edge + 0.35 * frame.width - z_map) * mask

    pivot = landmarks[lm.CHIN, :2] + 0.3 * frame.height * frame.down
    chin_y = float(landmarks[lm.CHIN, 1])
    # Shoulders and chest: below the neck, within about two and a half face widths of the face's centre line.
    centre_x = float(landmarks[list(lm.FACE_OVAL), 0].mean())
    body = _smoothstep(chin_y + 0.35 * frame.height, chin_y + 1.4 * frame.height, ys)
    body *= 1.0 - _smoothstep(1.6 * frame.width, 2.6 * frame.width, np.abs(xs - centre_x))
    fields = {
        "yaw": (depth * frame.right[0], depth * frame.right[1]),
        "pitch": (depth * frame.down[0], depth * frame.down[1]),
        "roll": (-(ys - pivot[1]) * mask, (xs - pivot[0]) * mask),
        "shift_x": (mask, np.zeros_like(mask)),
        "shift_y": (np.zeros_like(mask), mask),
        "breath": (np.zeros_like(mask), -(body + 0.5 * mask * (1 - body))),
    }
    return np.stack([np.stack(fields[name], axis=-1) for name in GLOBAL_BASES]).astype(np.float32)
