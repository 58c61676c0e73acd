"""The mouth interior: colours taken from the portrait and the painted opening.

The portrait's own mouth (teeth of a smile, or nothing) is never shown: at
prepare time the lip gap is inpainted with lip colour, so that when the warp
closes the lips they meet lip-on-lip; each frame then paints a synthetic
interior (dark cavity, upper teeth, lower teeth and tongue at large openings)
between the target inner-lip contours, with anti-aliased edges. At (nearly)
closed lips the same paint draws the darker seam between the lips.
"""
from __future__ import annotations

import cv2
import numpy as np

from model.animator import landmarks as lm
from model.animator.curve_band import CurveBand

#: Visible upper-teeth height at the centre, in face heights.
TEETH_HEIGHT = 0.055
#: Most lower teeth shown at large openings, in face heights.
LOWER_TEETH_HEIGHT = 0.015
#: Tooth edges across the mouth (u = -1 .. 1): incisors widest at the centre.
_TOOTH_EDGES = np.array([-0.78, -0.66, -0.53, -0.38, -0.2, 0.0, 0.2, 0.38, 0.53, 0.66, 0.78], np.float32)
#: Teeth colour used when the portrait shows none (RGB 0..255).
_DEFAULT_TEETH = np.array([232.0, 226.0, 210.0])

PALETTE_NAMES = ("lip", "teeth", "cavity", "tongue", "seam")


def _polygon_pixels(image: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """RGB pixels (n, 3) float64 inside a pixel polygon (n, 2)."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.rint(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return image[mask.astype(bool)].astype(np.float64)


def mouth_palette(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Colours of the painted mouth, float32 (len(PALETTE_NAMES), 3) RGB 0..255.

    ``lip``: median of the lower lip; ``teeth``: brightest third of the portrait's
    lip gap when it shows teeth (brighter than the lip), else a neutral off-white
    scaled to the lip's brightness; ``cavity``, ``tongue``, ``seam``: darkened lip
    colour.
    """
    pts = landmarks[:, :2]
    lower_lip = np.concatenate([pts[list(lm.LOWER_LIP_OUTER)], pts[list(lm.LOWER_LIP_INNER)][::-1]])
    lip_pixels = _polygon_pixels(image, lower_lip)
    lip = np.median(lip_pixels, axis=0) if len(lip_pixels) else np.array([190.0, 120.0, 120.0])
    gap = np.concatenate([pts[list(lm.UPPER_LIP_INNER)], pts[list(lm.LOWER_LIP_INNER)][::-1]])
    gap_pixels = _polygon_pixels(image, gap)
    teeth = _DEFAULT_TEETH * min(1.0, lip.mean() / 150.0 + 0.2)
    if len(gap_pixels) >= 12:
        luma = gap_pixels @ np.array([0.299, 0.587, 0.114])
        bright = gap_pixels[luma >= np.percentile(luma, 67)]
        candidate = np.median(bright, axis=0)
        if candidate.mean() > lip.mean() * 1.1:
            teeth = candidate
    cavity = lip * np.array([0.3, 0.14, 0.14])
    tongue = lip * np.array([0.62, 0.33, 0.33])
    seam = lip * 0.55
    return np.stack([lip, teeth, cavity, tongue, seam]).astype(np.float32)


def fill_lip_gap(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Copy of ``image`` (RGB uint8) with its mouth opening painted over with lip
    colour (cv2.inpaint, Telea's method, from the surrounding lips).

    The region is the opening between the inner lip contours grown by one pixel,
    plus the dark mouth-corner shadows that the contours miss (pixels within
    0.15 mouth widths of a corner darker than 0.7 of the lip's brightness).
    """
    pts = landmarks[:, :2].astype(np.float64)
    upper = pts[list(lm.UPPER_LIP_INNER)]
    lower = pts[list(lm.LOWER_LIP_INNER)]
    mask = np.zeros(image.shape[:2], np.uint8)
    polygon = np.concatenate([upper, lower[::-1]])
    cv2.fillPoly(mask, [np.rint(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))

    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lip = _polygon_pixels(image, np.concatenate([pts[list(lm.LOWER_LIP_OUTER)], lower[::-1]]))
    lip_luma = float(np.median(lip @ np.array([0.299, 0.587, 0.114]))) if len(lip) else 128.0
    radius = 0.15 * np.linalg.norm(upper[-1] - upper[0])
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    for corner in (upper[0], upper[-1]):
        near = (xs - corner[0]) ** 2 + (ys - corner[1]) ** 2 <= radius**2
        mask[near & (luma < 0.7 * lip_luma)] = 255
    return cv2.inpaint(image, mask, 2, cv2.INPAINT_TELEA)


def _smooth_edge(x: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 ramp of ``width`` pixels centred on x = 0."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def paint_mouth(frame: np.ndarray, upper: np.ndarray, lower: np.ndarray, palette: np.ndarray, face_height: float) -> None:
    """Paint the mouth interior into ``frame`` (RGB uint8, in place).

    ``upper``, ``lower``: (11, 2) target pixel positions of the inner lip contours
    (corner to corner); ``palette``: mouth_palette's colours; ``face_height``:
    pixels. Where the lips touch, draws a one-pixel seam in the seam colour.
    """
    band = CurveBand.between(upper, lower, frame.shape[:2])
    if band.box is None:
        return
    _, teeth, cavity, tongue, seam = palette
    u, depth = band.u, band.v - band.top
    gap = band.bottom - band.top
    height_above_lower = band.bottom - band.v
    profile = np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))

    # Cavity, darkest at the back (middle of the opening).
    middle = 1.0 - np.abs(depth - gap / 2) / np.maximum(gap / 2, 1.0)
    colour = np.broadcast_to(cavity, (*u.shape, 3)) * (1.0 - 0.35 * middle[..., None])

    # At wider openings the lower teeth and, behind them, the tongue rise from the bottom.
    lower_teeth_h = np.clip(gap - TEETH_HEIGHT * face_height - 3.0, 0.0, LOWER_TEETH_HEIGHT * face_height) * profile
    tongue_top = lower_teeth_h + 0.4 * np.clip(gap - 0.6 * TEETH_HEIGHT * face_height, 0.0, None) * profile
    tongue_a = _smooth_edge(tongue_top - height_above_lower, 2.5) * 0.8
    colour = colour + tongue_a[..., None] * (tongue - colour)

    # Lower teeth just behind the lower lip, narrower and shaded.
    lower_a = _smooth_edge(lower_teeth_h - height_above_lower, 0.8) * np.clip((0.55 - np.abs(u)) / 0.2, 0.0, 1.0)
    colour = colour + lower_a[..., None] * (teeth * 0.85 * (1.0 - 0.5 * u * u)[..., None] - colour)

    # Upper teeth hanging from the upper lip; darker towards the corners and just
    # under the lip, with faint gaps between teeth.
    teeth_h = TEETH_HEIGHT * face_height * (0.45 + 0.55 * profile)
    teeth_a = _smooth_edge(teeth_h - depth, 0.9) * np.clip((0.92 - np.abs(u)) / 0.2, 0.0, 1.0)
    shade = (1.0 - 0.5 * u * u) * (0.8 + 0.2 * np.clip(depth / 1.5, 0.0, 1.0))
    edge_px = np.min(np.abs(u[..., None] - _TOOTH_EDGES), axis=-1) * band.half_width
    shade = shade * (1.0 - 0.16 * np.clip(1.0 - edge_px / 0.5, 0.0, 1.0))
    colour = colour + teeth_a[..., None] * (teeth * shade[..., None] - colour)

    # Nearly closed: the opening turns into the lips' seam.
    openness = np.clip(gap / 2.5, 0.0, 1.0)[..., None]
    colour = seam + openness * (colour - seam)
    # The seam fades towards the corners, where closed lips meet softly.
    taper = 0.35 + 0.65 * np.clip((1.0 - np.abs(u)) / 0.35, 0.0, 1.0)
    open_ = openness[..., 0]
    alpha = band.coverage(grow=0.45) * (0.7 + 0.3 * open_) * (taper + (1.0 - taper) * open_)
    band.composite(frame, colour, alpha)
