"""The face rig: how each animation control moves the face's landmarks.

Each local control (basis) gives a displacement, in pixels, of the landmarks on
the pinned contours (lips, lids, brows, nose, face outline) for a coefficient of
1. ``build_local_fields`` spreads them over a face region with a membrane
(``membrane.py``) into dense forward displacement fields; a frame's face is the
linear combination of those fields (``warp.py``).

Controls and their unit amounts (face height H, inner mouth half-width w):
``close``: inner lips meet (the portrait may show teeth; coefficient 1 = at rest);
``open``: jaw drop opening the lips by 0.1 H at the centre; ``wide``: corners
out by 0.12 w; ``round``: corners in by 0.22 w, lips pushed out;
``blink_right`` / ``blink_left``: upper lid down onto the lower lid (subject's
right/left eye); ``brow``: brows up by 0.045 H.
"""
from __future__ import annotations

import numpy as np

from model.animator import landmarks as lm
from model.animator.grid import FieldGrid
from model.animator.landmarks import FaceFrame
from model.animator.membrane import MembraneSolver, border_cells, rasterize_polylines

LOCAL_BASES = ("close", "open", "wide", "round", "blink_right", "blink_left", "brow")

#: Opening of the inner lips at the centre for ``open`` = 1, in face heights.
OPEN_GAP = 0.10
#: Where closed lips meet, as the fraction of the portrait's lip gap the upper lip travels.
UPPER_LIP_SHARE = 0.35
#: Target field resolution: grid cells per face height (faces larger than this use a coarser grid).
CELLS_PER_FACE_HEIGHT = 128.0

# Contours pinned in the membrane, as landmark index polylines.
_CONTOURS = (
    lm.UPPER_LIP_OUTER, lm.UPPER_LIP_INNER, lm.LOWER_LIP_INNER, lm.LOWER_LIP_OUTER,
    lm.RIGHT_EYE_UPPER, lm.RIGHT_EYE_LOWER, lm.LEFT_EYE_UPPER, lm.LEFT_EYE_LOWER,
    *lm.RIGHT_BROW, *lm.LEFT_BROW, lm.NOSE_RIDGE, *lm.NOSE_WINGS, lm.FACE_OVAL,
)


def _elliptic(u: np.ndarray) -> np.ndarray:
    """Opening profile across the mouth: 1 at the centre, 0 at and beyond the corners."""
    return np.sqrt(np.clip(1.0 - u**2, 0.0, None))


def _jaw_weight(points: np.ndarray, frame: FaceFrame, chin: np.ndarray) -> np.ndarray:
    """How much each (n, 2) point follows the jaw: 0 at mouth height, 1 at the chin (smoothstep)."""
    depth = (points - frame.mouth_center) @ frame.down
    t = np.clip(depth / max((chin - frame.mouth_center) @ frame.down, 1e-6), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def landmark_displacements(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Per control, float64 (478, 2) pixel displacement of every landmark for a
    coefficient of 1 (zero for landmarks a control does not move).

    ``landmarks``: (478, 2 or 3) pixel coordinates of the portrait's face.
    """
    pts = landmarks[:, :2].astype(np.float64)
    frame = FaceFrame.from_landmarks(landmarks)
    down, right = frame.down, frame.right
    ui, li = list(lm.UPPER_LIP_INNER), list(lm.LOWER_LIP_INNER)
    uo, lo = list(lm.UPPER_LIP_OUTER), list(lm.LOWER_LIP_OUTER)
    lips = sorted(set(ui + li + uo + lo))
    oval = list(lm.FACE_OVAL[:-1])
    jaw = _jaw_weight(pts[oval], frame, pts[lm.CHIN])
    out = {name: np.zeros_like(pts) for name in LOCAL_BASES}

    # close: each inner-lip pair meets; outer contours travel with their inner ones.
    gap = pts[li] - pts[ui]
    close = out["close"]
    close[ui] = UPPER_LIP_SHARE * gap
    close[li] = -(1 - UPPER_LIP_SHARE) * gap
    close[uo] = close[ui]
    close[lo] = 0.9 * close[li]
    centre = len(li) // 2
    close[oval] += 0.5 * (close[li[centre]] @ down) * jaw[:, None] * down

    # open: lower lip and jaw drop, upper lip lifts a little, corners narrow.
    gap_px = OPEN_GAP * frame.height
    op = out["open"]
    op[ui] = -0.2 * gap_px * _elliptic(frame.mouth_u(pts[ui]))[:, None] * down
    op[uo] = -0.2 * gap_px * _elliptic(frame.mouth_u(pts[uo]))[:, None] * down
    op[li] = 0.8 * gap_px * _elliptic(frame.mouth_u(pts[li]))[:, None] * down
    op[lo] = 0.8 * gap_px * _elliptic(frame.mouth_u(pts[lo]) / 1.1)[:, None] * down
    for corner in (ui[0], ui[-1], uo[0], uo[-1]):
        side = np.sign(frame.mouth_u(pts[[corner]])[0])
        op[corner] = 0.12 * gap_px * down - side * 0.05 * frame.mouth_half_width * right
    op[oval] = 0.55 * gap_px * jaw[:, None] * down

    # wide / round: corners out / in along the mouth, proportional to the position on it.
    u_lips = frame.mouth_u(pts[lips])[:, None]
    out["wide"][lips] = 0.12 * frame.mouth_half_width * u_lips * right
    out["wide"][lips] -= 0.04 * frame.mouth_half_width * np.abs(u_lips) * down
    rnd = out["round"]
    rnd[lips] = -0.22 * frame.mouth_half_width * u_lips * right
    rnd[uo] -= 0.08 * frame.mouth_half_width * _elliptic(frame.mouth_u(pts[uo]))[:, None] * down
    rnd[lo] += 0.08 * frame.mouth_half_width * _elliptic(frame.mouth_u(pts[lo]) / 1.1)[:, None] * down

    # blinks: the lids overshoot each other slightly (92% + 12% of the gap) so no
    # sliver of eye survives between them.
    for name, upper, lower in (
        ("blink_right", lm.RIGHT_EYE_UPPER, lm.RIGHT_EYE_LOWER),
        ("blink_left", lm.LEFT_EYE_UPPER, lm.LEFT_EYE_LOWER),
    ):
        lid_gap = pts[list(lower)] - pts[list(upper)]
        out[name][list(upper)] = 0.92 * lid_gap
        out[name][list(lower)] = -0.12 * lid_gap

    # brow: brows up, upper lids follow a little (eyes widen).
    lift = -0.045 * frame.height * down
    for brow in (*lm.RIGHT_BROW, *lm.LEFT_BROW):
        out["brow"][list(brow)] = lift
    for lid in (lm.RIGHT_EYE_UPPER, lm.LEFT_EYE_UPPER):
        out["brow"][list(lid[1:-1])] = 0.2 * lift
    return out


def local_grid(landmarks: np.ndarray, image_shape: tuple[int, int]) -> FieldGrid:
    """The face region the local fields cover: the face outline's box widened by
    20% of the face width at the sides, 10% of its height above and 45% below
    (room for the jaw to drop), clipped to the image, at a resolution of at most
    CELLS_PER_FACE_HEIGHT cells per face height."""
    pts = landmarks[:, :2]
    frame = FaceFrame.from_landmarks(landmarks)
    oval = pts[list(lm.FACE_OVAL)]
    height, width = image_shape
    x0 = max(0.0, np.floor(oval[:, 0].min() - 0.2 * frame.width))
    x1 = min(width - 1.0, np.ceil(oval[:, 0].max() + 0.2 * frame.width))
    y0 = max(0.0, np.floor(oval[:, 1].min() - 0.1 * frame.height))
    y1 = min(height - 1.0, np.ceil(oval[:, 1].max() + 0.45 * frame.height))
    scale = min(1.0, CELLS_PER_FACE_HEIGHT / frame.height)
    shape = (int((y1 - y0) * scale) + 1, int((x1 - x0) * scale) + 1)
    return FieldGrid(float(x0), float(y0), float(scale), shape)


def build_local_fields(landmarks: np.ndarray, grid: FieldGrid) -> np.ndarray:
    """Dense forward displacement fields of the local controls.

    Returns float32 (len(LOCAL_BASES), rows, cols, 2): (dx, dy) in image pixels
    at each grid cell for a coefficient of 1; zero on the grid border.
    """
    disp = landmark_displacements(landmarks)
    stacked = np.concatenate([disp[name] for name in LOCAL_BASES], axis=1)  # (478, 2K)
    pts = grid.to_grid(landmarks)
    lines = [pts[list(c)] for c in _CONTOURS]
    vals = [stacked[list(c)] for c in _CONTOURS]
    cells, values = rasterize_polylines(lines, vals, grid.shape)
    border = np.setdiff1d(border_cells(grid.shape), cells)
    pinned = np.concatenate([cells, border])
    values = np.concatenate([values, np.zeros((len(border), values.shape[1]))])
    field = MembraneSolver(grid.shape, pinned).solve(values)  # (rows, cols, 2K)
    rows, cols = grid.shape
    return np.ascontiguousarray(field.reshape(rows, cols, len(LOCAL_BASES), 2).transpose(2, 0, 1, 3))
