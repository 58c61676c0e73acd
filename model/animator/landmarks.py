"""Landmark groups of MediaPipe's 478-point face mesh and the face's own frame.

Index lists follow the canonical face mesh (refined, with irises). Contours are
ordered so that the i-th point of an upper contour faces the i-th point of the
matching lower contour (lips: from the subject's right corner to the left;
eyes: from the outer corner to the inner corner).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UPPER_LIP_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
UPPER_LIP_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_LIP_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LOWER_LIP_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)

RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)

RIGHT_BROW = ((70, 63, 105, 66, 107), (46, 53, 52, 65, 55))
LEFT_BROW = ((300, 293, 334, 296, 336), (276, 283, 282, 295, 285))

NOSE_RIDGE = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2)
NOSE_WINGS = ((98, 64, 129, 48, 115, 220), (327, 294, 358, 278, 344, 440))

#: Closed face outline, clockwise in the image from the forehead top (landmark 10).
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
    400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
    54, 103, 67, 109, 10,
)

FOREHEAD_TOP = 10
CHIN = 152
RIGHT_EYE_OUTER = 33
LEFT_EYE_OUTER = 263


@dataclass(frozen=True)
class FaceFrame:
    """The face's axes and sizes in image pixels, from its landmarks.

    ``right``: unit vector (2,) from the subject's right eye to the left eye (the
    image's +x for an upright face); ``down``: unit vector (2,) perpendicular to it,
    pointing to the chin. ``height``: forehead-top to chin distance, pixels;
    ``width``: face-oval extent along ``right``, pixels; ``mouth_center``: (2,)
    midpoint of the inner lip corners; ``mouth_half_width``: half the inner corner
    distance, pixels.
    """

    right: np.ndarray
    down: np.ndarray
    height: float
    width: float
    mouth_center: np.ndarray
    mouth_half_width: float

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray) -> FaceFrame:
        """``landmarks``: float (478, 2 or 3) pixel coordinates."""
        pts = landmarks[:, :2].astype(np.float64)
        right = pts[LEFT_EYE_OUTER] - pts[RIGHT_EYE_OUTER]
        right /= np.linalg.norm(right)
        down = np.array([-right[1], right[0]])
        oval = pts[list(FACE_OVAL)] @ right
        corner_r, corner_l = pts[UPPER_LIP_INNER[0]], pts[UPPER_LIP_INNER[-1]]
        return cls(
            right=right,
            down=down,
            height=float(np.linalg.norm(pts[CHIN] - pts[FOREHEAD_TOP])),
            width=float(oval.max() - oval.min()),
            mouth_center=(corner_r + corner_l) / 2,
            mouth_half_width=float(np.linalg.norm(corner_l - corner_r) / 2),
        )

    def mouth_u(self, points: np.ndarray) -> np.ndarray:
        """Position along the mouth of (n, 2) pixel points: -1 at the right inner
        corner, +1 at the left one (beyond the corners outside [-1, 1])."""
        return ((points[:, :2] - self.mouth_center) @ self.right) / self.mouth_half_width
