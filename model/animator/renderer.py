"""Frame rendering from a pose: warp, then paint the mouth interior and lash lines."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.animator import landmarks as lm
from model.animator.body_rig import GLOBAL_BASES
from model.animator.eyes import paint_lash_line
from model.animator.mouth import paint_mouth
from model.animator.prepare import grid_from_meta
from model.animator.rig import LOCAL_BASES
from model.animator.warp import Warper
from model.base import PreparedPortrait

_REQUIRED = ("image", "landmarks", "local_fields", "global_fields", "palette", "lash")

# Landmarks whose target positions each frame needs, concatenated for one warp call.
_TRACKED = (
    lm.UPPER_LIP_INNER + lm.LOWER_LIP_INNER
    + lm.RIGHT_EYE_UPPER + lm.RIGHT_EYE_LOWER + lm.LEFT_EYE_UPPER + lm.LEFT_EYE_LOWER
)
_LIP_N = len(lm.UPPER_LIP_INNER)
_EYE_N = len(lm.RIGHT_EYE_UPPER)
_BLINK_RIGHT = LOCAL_BASES.index("blink_right")
_BLINK_LEFT = LOCAL_BASES.index("blink_left")


@dataclass(frozen=True)
class Pose:
    """Control coefficients of one frame: ``local`` float32 (len(LOCAL_BASES),),
    ``global_`` float32 (len(GLOBAL_BASES),), units as in rig.py / body_rig.py."""

    local: np.ndarray
    global_: np.ndarray


class FaceRenderer:
    """Renders frames of one prepared portrait. Raises ValueError when ``prepared``
    lacks the animator's arrays or controls."""

    def __init__(self, prepared: PreparedPortrait) -> None:
        missing = [key for key in _REQUIRED if key not in prepared.arrays]
        if missing or prepared.meta.get("local_bases") != list(LOCAL_BASES) or prepared.meta.get(
            "global_bases"
        ) != list(GLOBAL_BASES):
            raise ValueError(
                f"prepared portrait is not from this animator (missing {missing or 'matching controls'}); "
                "prepare the image again with CpuAnimator.prepare"
            )
        arrays = prepared.arrays
        self.face_height = float(prepared.meta["face_height"])
        self.shape = arrays["image"].shape[:2]
        self._palette = arrays["palette"]
        self._lash = arrays["lash"]
        self._points = arrays["landmarks"][list(_TRACKED), :2].astype(np.float64)
        self.warper = Warper(
            arrays["image"],
            arrays["local_fields"],
            grid_from_meta(prepared.meta["local_grid"]),
            arrays["global_fields"],
            grid_from_meta(prepared.meta["global_grid"]),
        )

    def render(self, pose: Pose) -> np.ndarray:
        """One frame, RGB uint8 (H, W, 3)."""
        local, glob = self.warper.fields(pose.local, pose.global_)
        frame = self.warper.render(local, glob)
        targets = self.warper.forward_points(self._points, local, glob)
        upper_lip, lower_lip = targets[:_LIP_N], targets[_LIP_N : 2 * _LIP_N]
        paint_mouth(frame, upper_lip, lower_lip, self._palette, self.face_height)
        eyes = targets[2 * _LIP_N :].reshape(4, _EYE_N, 2)
        paint_lash_line(frame, eyes[0], eyes[1], float(pose.local[_BLINK_RIGHT]), self._lash)
        paint_lash_line(frame, eyes[2], eyes[3], float(pose.local[_BLINK_LEFT]), self._lash)
        return frame
