"""CpuAnimator: the project's default generator, a real-time CPU face rig.

Per frame: band levels of the frame's audio -> mouth shape (visemes.py); media
time and speech emphasis -> blinks, brows, head and breathing (motion.py); the
resulting control coefficients warp the prepared portrait (warp.py) and a
synthetic mouth interior and lash lines are painted (mouth.py, eyes.py).
"""
from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.animator.audio_features import band_levels
from model.animator.motion import MotionState, procedural_motion
from model.animator.prepare import prepare_portrait
from model.animator.renderer import FaceRenderer, Pose
from model.animator.rig import LOCAL_BASES
from model.animator.visemes import VisemeState, mouth_shape
from model.base import AudioWindow, Generator, MotionSettings, PreparedPortrait, check_prepared_by

logger = logging.getLogger(__name__)

#: Mouth controls at face = 0.5 per unit of viseme output, and their change per unit of face.
OPEN_SCALE, OPEN_FACE_SLOPE = 1.0, 0.9
WIDE_SCALE, ROUND_SCALE = 0.6, 0.8
#: Largest jaw opening control (1 = 0.1 face heights between the lips).
OPEN_MAX = 1.35

_INDEX = {name: i for i, name in enumerate(LOCAL_BASES)}


@dataclass
class AnimatorState:
    """What one session carries between ``generate`` calls."""

    visemes: VisemeState
    motion: MotionState
    next_frame: int


class CpuAnimator(Generator):
    """Real-time talking-portrait animator on one CPU core (MediaPipe face rig).

    ``seed``: seeds blinks and idle motion (same seed, same audio: same frames).
    Windows of 2 frames with 1 frame of audio lookahead (40 ms at 25 fps) and 2
    frames of context before. Speech is told from silence by level against a
    tracked noise floor; ``window.speech`` (VAD) is not needed.
    """

    name = "animator"
    version = "1"
    fps = 25.0
    window_frames = 2
    lookahead_frames = 1
    context_frames = 2

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._renderers: dict[int, tuple[weakref.ref, FaceRenderer]] = {}

    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        """Landmarks, basis fields, colours of an RGB uint8 (H, W, 3) portrait.

        Raises NoFaceError without a face, PortraitError for an unusable image.
        """
        return prepare_portrait(image, self.name, self.version)

    def _renderer(self, prepared: PreparedPortrait) -> FaceRenderer:
        # Building a renderer allocates full-frame maps: keep one per live prepared portrait.
        key = id(prepared)
        entry = self._renderers.get(key)
        if entry is not None and entry[0]() is prepared:
            return entry[1]
        check_prepared_by(prepared, self)
        self._renderers = {k: v for k, v in self._renderers.items() if v[0]() is not None}
        renderer = FaceRenderer(prepared)
        self._renderers[key] = (weakref.ref(prepared), renderer)
        return renderer

    def generate(
        self,
        prepared: PreparedPortrait,
        window: AudioWindow,
        motion: MotionSettings,
        state: Any | None,
    ) -> tuple[np.ndarray, Any]:
        """Frames RGB uint8 (window.num_frames, H, W, 3) of one window, and the state
        for the next (an AnimatorState). Raises ValueError for a portrait prepared
        by another generator or version."""
        renderer = self._renderer(prepared)
        if state is None:
            state = AnimatorState(VisemeState(), MotionState.start(self.seed), window.first_frame)
        else:
            # The engine may pass the same state again after dropping frames: never advance it in place.
            state = copy.deepcopy(state)
        if state.next_frame != window.first_frame:
            logger.debug("window starts at frame %d, expected %d", window.first_frame, state.next_frame)
        count = window.num_frames
        height, width = renderer.shape
        frames = np.empty((count, height, width, 3), np.uint8)
        if count == 0:
            return frames, state

        levels = band_levels(window, -1, count + 2)
        shape, visemes = mouth_shape(levels, state.visemes)
        voiced = 10.0 * np.log10(np.sum(10.0 ** (levels[1:-1, :3] / 10.0), axis=1))
        times = (window.first_frame + np.arange(count)) / window.fps
        procedural = procedural_motion(times, 1.0 / window.fps, voiced, shape.speaking, motion, state.motion)

        face = float(motion.face)
        mouth_gain = OPEN_SCALE + OPEN_FACE_SLOPE * (face - 0.5)
        local = np.zeros((count, len(LOCAL_BASES)), np.float32)
        local[:, _INDEX["close"]] = 1.0
        local[:, _INDEX["open"]] = np.minimum(mouth_gain * shape.open, OPEN_MAX)
        local[:, _INDEX["wide"]] = WIDE_SCALE * mouth_gain * shape.wide
        local[:, _INDEX["round"]] = ROUND_SCALE * mouth_gain * shape.round
        local[:, _INDEX["blink_right"]] = procedural.blink
        local[:, _INDEX["blink_left"]] = procedural.blink
        local[:, _INDEX["brow"]] = procedural.brow
        for k in range(count):
            frames[k] = renderer.render(Pose(local[k], procedural.global_[k]))
        state.visemes = visemes
        state.next_frame = window.first_frame + count
        return frames, state
