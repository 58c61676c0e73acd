"""Placement of a displacement-field grid in the image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FieldGrid:
    """Where a field grid lies in the image: cell (row i, col j) is at pixel
    (x0 + j / scale, y0 + i / scale); ``shape`` = (rows, cols)."""

    x0: float
    y0: float
    scale: float
    shape: tuple[int, int]

    def to_grid(self, points: np.ndarray) -> np.ndarray:
        """(n, 2) pixel points -> (n, 2) grid coordinates (x = column, y = row)."""
        return (points[:, :2] - (self.x0, self.y0)) * self.scale

    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (xs, ys) of every cell, float64 arrays of ``shape``."""
        rows, cols = self.shape
        ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float64)
        return self.x0 + xs / self.scale, self.y0 + ys / self.scale
