"""Procedural motion: blinks, head sway and nods, brows, breathing.

Everything is a function of the session's media time plus small filter states
carried between windows, so consecutive windows join without a seam and idle
frames keep moving:

* blinks: start-to-start intervals drawn uniformly from 2-6 s, each 100-200 ms
  long (fast close, slower open), timed so one frame shows the eye shut;
* head sway: per axis a sum of three slow sinusoids (0.07-0.35 Hz, random
  phases) - smooth "idle" motion - growing with speaking activity;
* nods and brow raises follow speech emphasis (the level rising above its own
  slow average), through critically damped second-order filters;
* breathing: a slow sinusoid lifting the shoulders.

Amplitudes scale with MotionSettings: ``body`` for head and breathing, ``face``
for brows (the rig widens the eyes with them); 0 leaves a trace of motion, 1 is
lively. Blinks do not scale: even a calm face blinks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.animator.body_rig import GLOBAL_BASES
from model.base import MotionSettings

BLINK_INTERVAL_S = (2.0, 6.0)
BLINK_DURATION_S = (0.1, 0.2)
FIRST_BLINK_S = (0.5, 2.5)
#: Closing share of a blink's duration.
BLINK_CLOSING = 0.35

#: Idle sway amplitude per global control at body = 0.5 (radians / pixels).
SWAY_AMPLITUDE = {"yaw": 0.03, "pitch": 0.02, "roll": 0.018, "shift_x": 0.8, "shift_y": 0.5}
SWAY_HZ = (0.07, 0.35)
#: Extra sway while speaking, as a factor of the idle amplitude.
SPEAKING_SWAY = 1.0
BREATH_PERIOD_S = (3.6, 4.6)
BREATH_AMPLITUDE_PX = 1.2

#: Emphasis: dB above the slow average of the speech level where it starts, dB more
#: to full emphasis, and the average's time constant (s).
EMPHASIS_THRESHOLD_DB = 4.0
EMPHASIS_SPAN_DB = 8.0
SLOW_LEVEL_S = 0.4
#: Speaking activity's time constant (s), and the activity below which a pause
#: ends the utterance (the speech average restarts).
ACTIVITY_S = 0.6
QUIET_ACTIVITY = 0.1
#: Nod (pitch, radians) and brow (brow control) per unit of emphasis, and their filters' natural frequency.
NOD_GAIN = 0.05
BROW_GAIN = 0.9
NOD_HZ = 1.6
BROW_HZ = 2.2
#: While speaking the brows also drift with the head's sideways sway (brow control per unit sway).
BROW_SWAY = 0.15


def body_gain(motion: MotionSettings) -> float:
    """Head/breathing amplitude factor: 0.1 at body 0, 1 at 0.5, 1.9 at 1."""
    return 0.1 + 1.8 * float(motion.body)


def face_gain(motion: MotionSettings) -> float:
    """Brow amplitude factor: 0.1 at face 0, 1 at 0.5, 1.9 at 1."""
    return 0.1 + 1.8 * float(motion.face)


@dataclass
class MotionState:
    """Random draws and filter memory of one session's procedural motion."""

    rng: np.random.Generator
    sway: np.ndarray  # (controls, 3 components, 3: frequency Hz, phase rad, weight)
    breath_period: float
    breath_phase: float
    next_blink: float  # seconds
    blink_start: float = -1.0
    blink_duration: float = 0.0
    nod: np.ndarray = field(default_factory=lambda: np.zeros(2))  # position, velocity
    brow: np.ndarray = field(default_factory=lambda: np.zeros(2))
    slow_level: float | None = None  # dB, average speech level of the current utterance
    activity: float = 0.0  # 0..1

    @classmethod
    def start(cls, seed: int) -> MotionState:
        """A fresh session's state; the same seed gives the same motion."""
        rng = np.random.default_rng(seed)
        count = len(SWAY_AMPLITUDE)
        freqs = rng.uniform(*SWAY_HZ, size=(count, 3))
        phases = rng.uniform(0, 2 * np.pi, size=(count, 3))
        weights = rng.uniform(0.5, 1.0, size=(count, 3))
        weights /= weights.sum(axis=1, keepdims=True)
        return cls(
            rng=rng,
            sway=np.stack([freqs, phases, weights], axis=-1),
            breath_period=float(rng.uniform(*BREATH_PERIOD_S)),
            breath_phase=float(rng.uniform(0, 2 * np.pi)),
            next_blink=float(rng.uniform(*FIRST_BLINK_S)),
        )


@dataclass(frozen=True)
class FrameMotion:
    """Per-frame procedural controls of n frames: ``blink`` (n,) 0 open .. 1 shut,
    ``brow`` (n,) brow control, ``global_`` (n, len(GLOBAL_BASES)) head/body controls."""

    blink: np.ndarray
    brow: np.ndarray
    global_: np.ndarray


def _ease(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return t * t * (3 - 2 * t)


def _blink_closure(state: MotionState, time: float, frame_period: float) -> float:
    """Lid closure at ``time`` (s); schedules the next blink when one is due."""
    if state.blink_start < 0 and time >= state.next_blink:
        duration = float(state.rng.uniform(*BLINK_DURATION_S))
        # Start so that this frame's successor falls exactly on full closure.
        state.blink_start = time + frame_period - BLINK_CLOSING * duration
        state.blink_duration = duration
        state.next_blink = state.blink_start + float(state.rng.uniform(*BLINK_INTERVAL_S))
    if state.blink_start < 0:
        return 0.0
    tau = time - state.blink_start
    closing = BLINK_CLOSING * state.blink_duration
    if tau >= state.blink_duration:
        state.blink_start = -1.0
        return 0.0
    if tau < closing:
        return _ease(tau / closing)
    return _ease(1.0 - (tau - closing) / (state.blink_duration - closing))


def _damped_step(memory: np.ndarray, drive: float, hz: float, dt: float) -> float:
    """Advance a critically damped oscillator x'' = w^2 (drive - x) - 2 w x' by ``dt``
    seconds (semi-implicit Euler in steps of at most 20 ms, stable at any frame rate)."""
    omega = 2 * np.pi * hz
    steps = max(1, int(np.ceil(dt / 0.02)))
    h = dt / steps
    for _ in range(steps):
        memory[1] += h * (omega * omega * (drive - memory[0]) - 2 * omega * memory[1])
        memory[0] += h * memory[1]
    return float(memory[0])


def procedural_motion(
    times: np.ndarray,
    frame_period: float,
    levels_db: np.ndarray,
    speaking: np.ndarray,
    motion: MotionSettings,
    state: MotionState,
) -> FrameMotion:
    """Procedural controls for frames at ``times`` (n,) seconds, ``frame_period``
    seconds apart, given each frame's voiced level ``levels_db`` (n,, dB) and
    whether it is speech (``speaking``, bool (n,)). Advances ``state`` in place.
    """
    count = len(times)
    dt = float(frame_period)
    body, face = body_gain(motion), face_gain(motion)
    blink = np.zeros(count, np.float32)
    brow = np.zeros(count, np.float32)
    glob = np.zeros((count, len(GLOBAL_BASES)), np.float32)
    slow_alpha = 1 - np.exp(-dt / SLOW_LEVEL_S)
    activity_alpha = 1 - np.exp(-dt / ACTIVITY_S)
    for k, time in enumerate(times):
        level = float(levels_db[k])
        talking = bool(speaking[k])
        emphasis = 0.0
        if talking:
            # The average covers speech only: an utterance's onset after silence is no emphasis.
            if state.slow_level is None:
                state.slow_level = level
            emphasis = float(np.clip((level - state.slow_level - EMPHASIS_THRESHOLD_DB) / EMPHASIS_SPAN_DB, 0.0, 1.0))
            state.slow_level += slow_alpha * (level - state.slow_level)
        elif state.activity < QUIET_ACTIVITY:
            state.slow_level = None
        state.activity += activity_alpha * (float(talking) - state.activity)

        nod = _damped_step(state.nod, emphasis, NOD_HZ, dt)
        lift = _damped_step(state.brow, emphasis, BROW_HZ, dt)
        phase = 2 * np.pi * state.sway[..., 0] * time + state.sway[..., 1]
        sway = np.sum(state.sway[..., 2] * np.sin(phase), axis=1)  # (controls,)
        liveliness = body * (1.0 + SPEAKING_SWAY * state.activity)
        for c, name in enumerate(SWAY_AMPLITUDE):
            glob[k, GLOBAL_BASES.index(name)] = liveliness * SWAY_AMPLITUDE[name] * sway[c]
        glob[k, GLOBAL_BASES.index("pitch")] += body * NOD_GAIN * nod
        breath = np.sin(2 * np.pi * time / state.breath_period + state.breath_phase)
        glob[k, GLOBAL_BASES.index("breath")] = body * BREATH_AMPLITUDE_PX * breath

        brow[k] = face * (BROW_GAIN * lift + BROW_SWAY * state.activity * sway[0])
        blink[k] = _blink_closure(state, float(time), dt)
    return FrameMotion(blink, brow, glob)
