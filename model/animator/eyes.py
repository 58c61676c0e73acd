"""Closed-eye detail: the lash line where the lids meet during a blink.

When the warp pulls the upper lid onto the lower one, the compressed eye can
leave a sub-pixel sliver of white between them; a soft dark line in the
portrait's own lash colour, faded in as the eye closes, covers it the way real
lashes do.
"""
from __future__ import annotations

import numpy as np

from model.animator import landmarks as lm
from model.animator.curve_band import CurveBand

#: Closure (0 open .. 1 shut) where the lash line starts to show, and where it is full.
LASH_START, LASH_FULL = 0.45, 0.9


def lash_colour(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Float32 (3,) RGB: median of the darkest third of the pixels under both upper-lid contours."""
    samples = []
    for lid in (lm.RIGHT_EYE_UPPER, lm.LEFT_EYE_UPPER):
        pts = np.rint(landmarks[list(lid), :2]).astype(int)
        pts[:, 0] = np.clip(pts[:, 0], 0, image.shape[1] - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, image.shape[0] - 1)
        samples.append(image[pts[:, 1], pts[:, 0]].astype(np.float64))
    pixels = np.concatenate(samples)
    luma = pixels @ np.array([0.299, 0.587, 0.114])
    return np.median(pixels[luma <= np.percentile(luma, 34)], axis=0).astype(np.float32)


def paint_lash_line(frame: np.ndarray, upper: np.ndarray, lower: np.ndarray, closure: float, colour: np.ndarray) -> None:
    """Draw the lash line of one eye into ``frame`` (RGB uint8, in place).

    ``upper``, ``lower``: (9, 2) target pixel positions of the lid contours (outer
    to inner corner); ``closure``: blink amount, 0 open .. 1 shut (nothing is
    drawn below LASH_START); ``colour``: (3,) RGB.
    """
    strength = float(np.clip((closure - LASH_START) / (LASH_FULL - LASH_START), 0.0, 1.0))
    if strength <= 0.0:
        return
    middle = (upper + lower) / 2
    band = CurveBand.between(middle, middle, frame.shape[:2])
    if band.box is None:
        return
    taper = np.clip((1.0 - np.abs(band.u)) / 0.25, 0.0, 1.0)
    alpha = band.coverage(grow=0.6) * taper * (0.8 * strength)
    band.composite(frame, np.broadcast_to(colour, (*alpha.shape, 3)), alpha)
