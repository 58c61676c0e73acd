"""Mouth shape from band levels: jaw opening, lip spreading and rounding.

A small hand-built mapping, tuned on phone-aligned speech (open vowels AA AE AH
AO AW AY against the bilabials M B P):

* opening follows the level of the first-formant region (550-1100 Hz plus 0.3 of
  300-550 Hz) relative to an automatic gain reference (the peak level of the
  speech so far: set at the first speech frame, instant rise, slow fall), so open
  vowels open wide while the nasal murmur of M (energy below 300 Hz only) and the
  silent closure of B/P leave the lips shut; a power curve keeps small levels
  small. A noise-floor tracker (minimum statistics: instant fall, slow rise) keeps
  the lips shut in background noise;
* only voiced frames open (F1 region above the 4.5-8 kHz band);
* rounding (OW, UW, W) when the second-formant region (1100-4500 Hz) is weak
  against the first, spreading (IY, EH, AE) when it is strong, both only while
  voiced.

Smoothing uses the frame before and after (no lag): openings are averaged with
their neighbours but never raised above the frame's own value, so brief closures
survive; opening speed is limited per frame like a real jaw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.animator.audio_features import FLOOR_DB

#: Gain reference: level above the first speech frame it starts at, allowed range,
#: fall per speaking frame (dB).
REFERENCE_HEADROOM_DB = 4.0
REFERENCE_RANGE_DB = (-25.0, 15.0)
REFERENCE_FALL_DB = 0.02
#: Noise floor: rise per frame (dB); speech is this far above it (dB).
FLOOR_RISE_DB = 0.1
SPEECH_ABOVE_FLOOR_DB = 15.0
#: Lowest level that can count as speech, dB.
SPEECH_MIN_DB = -50.0
#: Opening: level below the reference where the lips start to open (but at least
#: OPEN_ABOVE_FLOOR_DB above the noise floor), and the span to full opening (dB).
OPEN_BELOW_REFERENCE_DB = 26.0
OPEN_ABOVE_FLOOR_DB = 12.0
OPEN_SPAN_DB = 20.0
OPEN_CURVE = 1.3
#: F1-region level over the 4.5-8 kHz level (dB) for full voicing (0 dB: none).
VOICING_SPAN_DB = 10.0
#: Largest increase of the opening from one frame to the next.
OPEN_RISE_PER_FRAME = 0.45


@dataclass
class VisemeState:
    """Carried between windows: gain reference (dB, None before any speech), noise
    floor (dB, None until the first frame that is not digital silence) and the last
    frame's opening."""

    reference_db: float | None = None
    floor_db: float | None = None
    last_open: float = 0.0

    def speaking(self, level_db: float) -> bool:
        """Whether a frame at ``level_db`` counts as speech against the noise floor."""
        floor = level_db if self.floor_db is None else self.floor_db
        return level_db > max(floor + SPEECH_ABOVE_FLOOR_DB, SPEECH_MIN_DB)

    def update(self, level_db: float) -> None:
        """Track the noise floor and the gain reference with one frame's level (dB)."""
        if level_db <= FLOOR_DB + 1.0:
            # Digital silence (the engine's idle padding) says nothing about the input's noise.
            return
        # The first sound sets the floor; a session that opens mid-speech finds
        # its true floor at the first pause.
        self.floor_db = level_db if self.floor_db is None else min(level_db, self.floor_db + FLOOR_RISE_DB)
        if not self.speaking(level_db):
            return
        lo_ref, hi_ref = REFERENCE_RANGE_DB
        if self.reference_db is None:
            self.reference_db = level_db + REFERENCE_HEADROOM_DB
        else:
            self.reference_db = max(self.reference_db - REFERENCE_FALL_DB, level_db)
        self.reference_db = float(np.clip(self.reference_db, lo_ref, hi_ref))


def _power_sum(levels: np.ndarray, weights: dict[int, float]) -> np.ndarray:
    return 10.0 * np.log10(sum(w * 10.0 ** (levels[:, i] / 10.0) for i, w in weights.items()) + 1e-12)


@dataclass(frozen=True)
class MouthShape:
    """Per-frame mouth controls, float32 (n,) each: ``open`` 0..1 (1: wide-open
    vowel), ``wide`` 0..1 (spread lips), ``round`` 0..1 (rounded lips); and
    ``speaking`` bool (n,): the frame is speech by level against the noise floor."""

    open: np.ndarray
    wide: np.ndarray
    round: np.ndarray
    speaking: np.ndarray


def mouth_shape(levels: np.ndarray, state: VisemeState) -> tuple[MouthShape, VisemeState]:
    """Mouth controls of n frames from their band levels.

    ``levels``: (n + 2, 6) band levels in dB (audio_features.band_levels) of the
    n frames plus one frame before and one after. Returns the shape and the state
    for the next window (``state`` is not modified).
    """
    state = VisemeState(state.reference_db, state.floor_db, state.last_open)
    formant1 = _power_sum(levels, {2: 1.0, 1: 0.3})
    formant2 = _power_sum(levels, {3: 1.0, 4: 1.0})
    low = _power_sum(levels, {1: 1.0, 2: 1.0})
    voiced_level = _power_sum(levels, {0: 1.0, 1: 1.0, 2: 1.0})
    count = len(levels) - 2
    opening = np.zeros(count, np.float32)
    wide = np.zeros(count, np.float32)
    rnd = np.zeros(count, np.float32)
    speaking = np.zeros(count, bool)
    taps = np.array([0.25, 0.5, 0.25])
    for k in range(count):
        state.update(float(formant1[k + 1]))
        speaking[k] = state.speaking(float(formant1[k + 1]))
        if state.reference_db is None:
            state.last_open = 0.0
            continue
        start = max(state.reference_db - OPEN_BELOW_REFERENCE_DB, state.floor_db + OPEN_ABOVE_FLOOR_DB)
        # Voiced speech has far more energy around F1 than above 4.5 kHz; broadband
        # noise (and frication) has less, so it cannot open the jaw.
        voicing = np.clip((formant1[k : k + 3] - levels[k : k + 3, 5]) / VOICING_SPAN_DB, 0.0, 1.0)
        raw = voicing * np.clip((formant1[k : k + 3] - start) / OPEN_SPAN_DB, 0.0, 1.0) ** OPEN_CURVE
        smoothed = min(raw[1], 0.25 * raw[0] + 0.5 * raw[1] + 0.25 * raw[2])
        value = min(0.5 * (raw[1] + smoothed), state.last_open + OPEN_RISE_PER_FRAME)
        opening[k] = state.last_open = float(value)

        voiced = np.clip((voiced_level[k : k + 3] - (start - 4.0)) / 10.0, 0.0, 1.0)
        slope = formant2[k : k + 3] - low[k : k + 3]
        rnd[k] = float(taps @ (np.clip((-9.0 - slope) / 8.0, 0.0, 1.0) * voiced))
        wide[k] = float(taps @ (np.clip((slope + 7.0) / 8.0, 0.0, 1.0) * voiced)) * (1.0 - 0.5 * value)
    return MouthShape(opening, wide, rnd, speaking), state
