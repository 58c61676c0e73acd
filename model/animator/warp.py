"""Per-frame image warp from control coefficients.

A frame's forward displacement is D = sum_k c_k * D_k over precomputed basis
fields: local face fields (full detail, face region only) composed with coarse
head/body fields (whole image). Rendering needs the backward map (for each output
pixel, where to sample the portrait). It solves p + D(p) = q for p with a damped
fixed-point iteration, p <- p - a * (p + D(p) - q), each step one cv2.remap of the
field; damping a < 1 keeps it convergent where the warp stretches the skin up to
about 2.5x (a blink, a dropped jaw), where the plain iteration oscillates.
"""
from __future__ import annotations

import cv2
import numpy as np

from model.animator.grid import FieldGrid

#: Fixed-point steps and damping of the inversion. On the demo portrait the residual
#: stays under 0.3 px except inside the lip gap at the widest jaw opening and around
#: shut lids (there the warp collapses or folds, and paint covers the result).
INVERSION_STEPS = 5
INVERSION_DAMPING = 0.75
#: Extra border around the face region (pixels) for where head motion may carry it.
HEAD_MARGIN = 16


def _identity(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = shape
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return xs, ys


def invert_displacement(
    forward: np.ndarray, grid_xs: np.ndarray, grid_ys: np.ndarray, scale: float
) -> np.ndarray:
    """Backward displacement of a forward displacement field on a grid.

    ``forward``: float32 (rows, cols, 2) pixel displacements at the grid cells;
    ``grid_xs``, ``grid_ys``: float32 (rows, cols) cell column/row indices;
    ``scale``: grid cells per pixel. Returns float32 (rows, cols, 2) b with
    q + b + D(q + b) ~= q at every cell q (pixels); zero field outside the grid.
    """
    back = -forward
    for _ in range(INVERSION_STEPS):
        at = cv2.remap(
            forward, grid_xs + back[..., 0] * scale, grid_ys + back[..., 1] * scale,
            cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
        )
        back -= INVERSION_DAMPING * (back + at)
    return back


def sample_field(field: np.ndarray, grid: FieldGrid, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of a (rows, cols, 2) field at (n, 2) pixel points -> (n, 2);
    zero outside the grid."""
    at = grid.to_grid(points).astype(np.float32)
    out = cv2.remap(field, at[None, :, 0], at[None, :, 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return out[0].astype(np.float64)


class Warper:
    """Warps one portrait by control coefficients.

    ``image``: RGB uint8 (H, W, 3). ``local_fields``: float32 (K, r, c, 2) on
    ``local_grid``; ``global_fields``: float32 (G, r', c', 2) on ``global_grid``
    (COARSE_STEP-times downsampled, aligned for cv2.resize).
    """

    def __init__(
        self,
        image: np.ndarray,
        local_fields: np.ndarray,
        local_grid: FieldGrid,
        global_fields: np.ndarray,
        global_grid: FieldGrid,
    ) -> None:
        self.image = image
        self.local_grid = local_grid
        self.global_grid = global_grid
        self._local = local_fields.reshape(len(local_fields), -1)
        self._global = global_fields.reshape(len(global_fields), -1)
        self._local_shape = (*local_grid.shape, 2)
        self._global_shape = (*global_grid.shape, 2)
        self._local_ids = _identity(local_grid.shape)
        self._global_ids = _identity(global_grid.shape)
        height, width = image.shape[:2]
        self._pixel_xs, self._pixel_ys = _identity((height, width))
        rows, cols = local_grid.shape
        x0 = int(max(0, np.floor(local_grid.x0) - HEAD_MARGIN))
        y0 = int(max(0, np.floor(local_grid.y0) - HEAD_MARGIN))
        x1 = int(min(width, np.ceil(local_grid.x0 + cols / local_grid.scale) + HEAD_MARGIN))
        y1 = int(min(height, np.ceil(local_grid.y0 + rows / local_grid.scale) + HEAD_MARGIN))
        self._face_box = (slice(y0, y1), slice(x0, x1))

    def fields(self, local_coeffs: np.ndarray, global_coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward displacement fields for the coefficients: (local (r, c, 2), global (r', c', 2)), float32."""
        local = (np.asarray(local_coeffs, np.float32) @ self._local).reshape(self._local_shape)
        glob = (np.asarray(global_coeffs, np.float32) @ self._global).reshape(self._global_shape)
        return local, glob

    def forward_points(self, points: np.ndarray, local: np.ndarray, glob: np.ndarray) -> np.ndarray:
        """Where (n, 2) portrait pixel points land in the frame: face warp, then head/body warp."""
        moved = points[:, :2] + sample_field(local, self.local_grid, points)
        return moved + sample_field(glob, self.global_grid, moved)

    def render(self, local: np.ndarray, glob: np.ndarray) -> np.ndarray:
        """The warped portrait, RGB uint8 (H, W, 3), for forward fields from ``fields``."""
        height, width = self.image.shape[:2]
        gx, gy = self._global_ids
        back_global = invert_displacement(glob, gx, gy, self.global_grid.scale)
        back_global = cv2.resize(back_global, (width, height), interpolation=cv2.INTER_LINEAR)
        map_x = self._pixel_xs + back_global[..., 0]
        map_y = self._pixel_ys + back_global[..., 1]

        lx, ly = self._local_ids
        grid = self.local_grid
        back_local = invert_displacement(local, lx, ly, grid.scale)
        # Face warp is applied first, so it is undone last: sample the local backward
        # field where the head/body backward map lands.
        box_x, box_y = map_x[self._face_box], map_y[self._face_box]
        at_local = cv2.remap(
            back_local, (box_x - grid.x0) * grid.scale, (box_y - grid.y0) * grid.scale,
            cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
        )
        box_x += at_local[..., 0]
        box_y += at_local[..., 1]
        return cv2.remap(self.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
