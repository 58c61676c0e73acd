"""Membrane (harmonic) interpolation of values given on curves, over a pixel grid.

Idea: the smoothest field that takes given values on some grid cells solves
Laplace's equation on the remaining cells (a stretched membrane). Prescribing
values along facial contours (lips, lids, brows, face outline) gives a
displacement field that moves each feature rigidly where it is pinned and
stretches the skin in between, without the overshoot of radial-basis
interpolation. The system matrix depends only on which cells are pinned, so one
sparse LU factorisation serves every basis field.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla


def rasterize_polylines(
    polylines: list[np.ndarray],
    values: list[np.ndarray],
    shape: tuple[int, int],
    step: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Pin grid cells along polylines.

    ``polylines``: list of (n_i, 2) float arrays of (x, y) in grid units (cell
    centres at integers); ``values``: list of (n_i, C) values at those vertices,
    linearly interpolated along each segment, sampled every ``step`` cells.
    Returns (flat cell indices (m,) int64, sorted and unique; values (m, C)
    float64, the mean of the samples that fell in each cell). Samples outside the
    grid of ``shape`` (rows, cols) are dropped.
    """
    height, width = shape
    points, samples = [], []
    for line, vals in zip(polylines, values):
        line = np.asarray(line, np.float64)
        vals = np.asarray(vals, np.float64).reshape(len(line), -1)
        for a in range(len(line) - 1):
            n = max(2, int(np.ceil(np.linalg.norm(line[a + 1] - line[a]) / step)) + 1)
            t = np.linspace(0.0, 1.0, n)[:, None]
            points.append(line[a] * (1 - t) + line[a + 1] * t)
            samples.append(vals[a] * (1 - t) + vals[a + 1] * t)
        if len(line) == 1:
            points.append(line)
            samples.append(vals)
    pts = np.concatenate(points)
    vals = np.concatenate(samples)
    cols = np.rint(pts[:, 0]).astype(np.int64)
    rows = np.rint(pts[:, 1]).astype(np.int64)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    flat = rows[inside] * width + cols[inside]
    cells, inverse = np.unique(flat, return_inverse=True)
    sums = np.zeros((len(cells), vals.shape[1]))
    np.add.at(sums, inverse, vals[inside])
    counts = np.bincount(inverse, minlength=len(cells))[:, None]
    return cells, sums / counts


def border_cells(shape: tuple[int, int]) -> np.ndarray:
    """Flat indices (sorted) of the outermost rows and columns of a grid of ``shape``."""
    mask = np.zeros(shape, bool)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return np.flatnonzero(mask)


class MembraneSolver:
    """Solves Laplace's equation on a (rows, cols) grid with pinned cells.

    ``pinned``: flat cell indices whose values are given (at least one per
    connected region, or the system is singular: pin the border). Cells at the
    grid edge have fewer neighbours (free, zero-slope edge where not pinned).
    Raises ValueError when no cell is pinned.
    """

    def __init__(self, shape: tuple[int, int], pinned: np.ndarray) -> None:
        if len(pinned) == 0:
            raise ValueError("a membrane needs at least one pinned cell")
        self.shape = shape
        count = shape[0] * shape[1]
        self._pinned = np.asarray(pinned, np.int64)
        is_pinned = np.zeros(count, bool)
        is_pinned[self._pinned] = True
        self._free = np.flatnonzero(~is_pinned)
        index = np.arange(count).reshape(shape)
        # Undirected neighbour pairs (right and down neighbours of every cell).
        a = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
        b = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
        adjacency = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(count, count)).tocsr()
        adjacency = adjacency + adjacency.T
        laplacian = sp.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
        laplacian = laplacian.tocsr()
        self._free_free = laplacian[self._free][:, self._free].tocsc()
        self._free_pinned = laplacian[self._free][:, self._pinned].tocsr()
        self._lu = spla.splu(self._free_free)

    def solve(self, pinned_values: np.ndarray) -> np.ndarray:
        """``pinned_values``: (len(pinned), C) values of the pinned cells, in the
        order given to the constructor. Returns float32 (rows, cols, C)."""
        pinned_values = np.asarray(pinned_values, np.float64).reshape(len(self._pinned), -1)
        rhs = -(self._free_pinned @ pinned_values)
        field = np.zeros((self.shape[0] * self.shape[1], pinned_values.shape[1]))
        field[self._pinned] = pinned_values
        field[self._free] = self._lu.solve(rhs)
        return field.reshape(*self.shape, -1).astype(np.float32)
