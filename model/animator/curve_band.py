"""Pixel coordinates of the band between two curves, for anti-aliased painting.

The mouth opening (between the inner lip contours) and a closed eye's lash line
are both the region between an upper and a lower curve that meet at two
corners. Pixels near the band get coordinates along the corner-to-corner axis
(``u``) and across it (``v``, increasing downwards), and the band's coverage of
each pixel is exact along ``v`` (the 1-D overlap of the pixel's extent with the
band), which anti-aliases the edges without supersampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CurveBand:
    """The band between ``upper`` and ``lower`` (each (n, 2) pixel points from one
    corner to the other) inside a frame of size ``shape`` (H, W).

    Attributes: ``box`` (row slice, col slice) of the frame holding the band, or
    None when it is off-frame; ``u`` position along the corner axis (-1 and 1 at
    the corners), ``v`` pixels below the band's chord, ``top`` and ``bottom`` the
    curves' ``v`` at each pixel's ``u`` (float32 arrays of the box's shape),
    ``half_width`` pixels from the centre to a corner.
    """

    box: tuple[slice, slice] | None
    u: np.ndarray
    v: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    half_width: float

    @classmethod
    def between(cls, upper: np.ndarray, lower: np.ndarray, shape: tuple[int, int], margin: float = 2.0) -> CurveBand:
        points = np.concatenate([upper, lower])
        height, width = shape
        x0 = int(max(0, np.floor(points[:, 0].min() - margin)))
        x1 = int(min(width, np.ceil(points[:, 0].max() + margin) + 1))
        y0 = int(max(0, np.floor(points[:, 1].min() - margin)))
        y1 = int(min(height, np.ceil(points[:, 1].max() + margin) + 1))
        empty = np.zeros((0, 0), np.float32)
        if x1 <= x0 or y1 <= y0:
            return cls(None, empty, empty, empty, empty, 1.0)
        corner_a, corner_b = (upper[0] + lower[0]) / 2, (upper[-1] + lower[-1]) / 2
        centre = (corner_a + corner_b) / 2
        axis = corner_b - corner_a
        half_width = max(float(np.linalg.norm(axis)) / 2, 1e-3)
        axis /= 2 * half_width
        normal = np.array([-axis[1], axis[0]])
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        rel_x, rel_y = xs - np.float32(centre[0]), ys - np.float32(centre[1])
        u = (rel_x * np.float32(axis[0]) + rel_y * np.float32(axis[1])) / np.float32(half_width)
        v = rel_x * np.float32(normal[0]) + rel_y * np.float32(normal[1])

        def along(curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rel = curve - centre
            cu, cv = (rel @ axis) / half_width, rel @ normal
            order = np.argsort(cu)
            return cu[order], cv[order]

        top_u, top_v = along(upper)
        bottom_u, bottom_v = along(lower)
        top = np.interp(u, top_u, top_v).astype(np.float32)
        bottom = np.interp(u, bottom_u, bottom_v).astype(np.float32)
        # Beyond the corners the band is empty.
        outside = (u < max(top_u[0], bottom_u[0])) | (u > min(top_u[-1], bottom_u[-1]))
        bottom[outside] = top[outside]
        return cls((slice(y0, y1), slice(x0, x1)), u, v, top, bottom, half_width)

    def coverage(self, grow: float = 0.0) -> np.ndarray:
        """Fraction in [0, 1] of each pixel's vertical extent inside the band widened
        by ``grow`` pixels on both sides (float32, the box's shape)."""
        top = np.minimum(self.top, self.bottom) - grow
        bottom = np.maximum(self.top, self.bottom) + grow
        return np.clip(np.minimum(self.v + 0.5, bottom) - np.maximum(self.v - 0.5, top), 0.0, 1.0)

    def composite(self, frame: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
        """Blend float (h, w, 3) ``colour`` (0..255) over the box of uint8 ``frame`` in
        place with float (h, w) ``alpha`` in [0, 1]."""
        if self.box is None:
            return
        region = frame[self.box].astype(np.float32)
        a = alpha[..., None]
        frame[self.box] = np.clip(region + a * (colour - region) + 0.5, 0, 255).astype(np.uint8)
