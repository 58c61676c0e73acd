"""CpuAnimator: lip sync, idle motion, window joins, motion settings, preparation.

Behaviour is measured the way users see it: MediaPipe's face mesh on the
generated frames (mouth aperture, eye opening, nose position), with the shared
portrait and speech, fed through ``generate`` in consecutive windows as the
session engine does.
"""
from __future__ import annotations

import json
import logging
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.signal import hilbert

from model.animator import CpuAnimator
from model.animator.membrane import MembraneSolver, border_cells
from model.animator.warp import invert_displacement
from model.base import MotionSettings, PreparedPortrait, clip_windows, frame_start_sample
from model.errors import NoFaceError, PortraitError
from model.face_mesh import FaceTracker, mouth_aperture
from model.portrait import load_portrait

SHARED = Path("/work/shared/data")
SAMPLE_RATE = 16_000
OPEN_VOWELS = {"AA", "AE", "AH", "AO", "AW", "AY"}
BILABIALS = {"M", "B", "P"}
# Face-mesh landmarks: nose tip; upper/lower lid centres of both eyes; forehead and chin.
NOSE_TIP = 1
EYE_LIDS = ((159, 145), (386, 374))
FOREHEAD, CHIN = 10, 152
#: Frames MediaPipe's tracker takes to settle on a face (its landmarks wander before).
TRACKER_SETTLE = 5


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0


def read_phones(path: Path) -> list[tuple[str, float, float]]:
    """Leaf entries of a phone JSON: (label without stress digits, begin s, duration s)."""
    leaves = []

    def walk(node: dict) -> None:
        if "w" in node:
            for child in node["w"]:
                walk(child)
        else:
            leaves.append((node["t"].rstrip("012"), float(node["b"]), float(node["d"])))

    walk(json.loads(path.read_text()))
    return leaves


def animate(generator, prepared, audio, motion=MotionSettings(), window_frames=None) -> np.ndarray:
    state = None
    frames = []
    for window in clip_windows(audio, generator, window_frames=window_frames):
        out, state = generator.generate(prepared, window, motion, state)
        assert out.shape == (window.num_frames, 512, 512, 3) and out.dtype == np.uint8
        frames.append(out)
    return np.concatenate(frames)


def track(frames: np.ndarray) -> np.ndarray:
    """Face-mesh landmarks (n, 478, 3) of every frame; fails when a frame has no face."""
    found = []
    with FaceTracker() as tracker:
        for index, frame in enumerate(frames):
            landmarks = tracker.track(frame)
            assert landmarks is not None, f"no face found in frame {index}"
            found.append(landmarks)
    return np.stack(found)


def apertures(landmarks: np.ndarray) -> np.ndarray:
    return np.array([mouth_aperture(points) for points in landmarks])


def eye_opening(landmarks: np.ndarray) -> np.ndarray:
    """Mean lid distance of both eyes over face height, per frame."""
    face = np.linalg.norm(landmarks[:, CHIN, :2] - landmarks[:, FOREHEAD, :2], axis=1)
    lids = [np.linalg.norm(landmarks[:, a, :2] - landmarks[:, b, :2], axis=1) for a, b in EYE_LIDS]
    return np.mean(lids, axis=0) / face


def frames_at(fps: float, start_s: float, stop_s: float) -> slice:
    return slice(int(round(start_s * fps)), int(round(stop_s * fps)))


@pytest.fixture(scope="module")
def animator() -> CpuAnimator:
    return CpuAnimator(seed=0)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return load_portrait(SHARED / "portraits" / "astronaut.png")


@pytest.fixture(scope="module")
def prepared(animator, portrait) -> PreparedPortrait:
    return animator.prepare(portrait)


@pytest.fixture(scope="module")
def long_speech() -> np.ndarray:
    return read_wav(SHARED / "speech" / "librivox_0870.wav")


# --- preparation -----------------------------------------------------------------


def test_prepare_rejects_image_without_face(animator):
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    gradient = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128 + 0 * ramp[None, :]), -1)
    with pytest.raises(NoFaceError, match="no face"):
        animator.prepare(gradient.astype(np.uint8))


def test_prepare_rejects_non_rgb_arrays(animator, portrait):
    with pytest.raises(PortraitError, match="RGB uint8"):
        animator.prepare(portrait[..., 0])
    with pytest.raises(PortraitError, match="RGB uint8"):
        animator.prepare(portrait.astype(np.float32))


def test_prepare_uses_the_largest_of_several_faces(animator, portrait, caplog):
    # Two faces side by side: the portrait's own (left) and a mirrored copy at 85% (right).
    face = portrait[:, 96:352]
    smaller = cv2.resize(face[:, ::-1], None, fx=0.85, fy=0.85, interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 512, 3), 200, np.uint8)
    canvas[:, :256] = face
    canvas[: smaller.shape[0], 256 : 256 + smaller.shape[1]] = smaller
    with caplog.at_level(logging.WARNING, logger="model.animator"):
        two = animator.prepare(canvas)
    assert any("2 faces" in record.getMessage() and "largest" in record.getMessage() for record in caplog.records)
    assert two.arrays["landmarks"][:, 0].mean() < 256


def test_prepare_is_deterministic_and_round_trips(animator, portrait, prepared, long_speech):
    again = animator.prepare(portrait)
    assert again.to_bytes() == prepared.to_bytes()
    restored = PreparedPortrait.from_bytes(prepared.to_bytes())
    clip = long_speech[: SAMPLE_RATE // 2]
    original = animate(CpuAnimator(seed=3), prepared, clip)
    reloaded = animate(CpuAnimator(seed=3), restored, clip)
    np.testing.assert_array_equal(original, reloaded)


def test_generate_rejects_portrait_prepared_elsewhere(animator, long_speech):
    foreign = PreparedPortrait(arrays={"latents": np.zeros(4, np.float32)}, meta={"generator": "other"})
    window = next(clip_windows(long_speech, animator))
    with pytest.raises(ValueError, match="prepare the image again"):
        animator.generate(foreign, window, MotionSettings(), None)


# --- lips ------------------------------------------------------------------------


def test_aperture_follows_loud_and_quiet_stretches(animator, prepared, long_speech):
    # 0.4 s of real speech (rich in open vowels), then 0.4 s of silence, three times.
    gap = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    pieces = []
    for start in (0.7, 1.1, 1.5):
        pieces += [long_speech[int(start * SAMPLE_RATE) : int((start + 0.4) * SAMPLE_RATE)], gap]
    opening = apertures(track(animate(animator, prepared, np.concatenate(pieces))))
    fps = animator.fps
    # Skip one frame at each edge: speech and silence meet mid-way through lip motion.
    loud = np.concatenate([opening[frames_at(fps, 0.8 * i + 0.04, 0.8 * i + 0.36)] for i in range(3)])
    quiet = np.concatenate([opening[frames_at(fps, 0.8 * i + 0.48, 0.8 * i + 0.76)] for i in range(3)])
    assert loud.max() > 0.05, "the mouth never opens wide during speech"
    assert loud.mean() > 4 * quiet.mean()
    assert quiet.max() < 0.012, "the mouth stays open in the pauses"


def test_mouth_stays_closed_in_silence_and_faint_noise(animator, prepared):
    noise = np.random.default_rng(1).normal(0, 10 ** (-60 / 20), int(1.2 * SAMPLE_RATE)).astype(np.float32)
    audio = np.concatenate([np.zeros(int(0.6 * SAMPLE_RATE), np.float32), noise])
    opening = apertures(track(animate(animator, prepared, audio)))
    assert opening.max() < 0.01
    assert np.std(np.diff(opening)) < 0.002


def test_quality_targets_on_short_clip(animator, prepared):
    audio = read_wav(SHARED / "speech" / "librivox_0880.wav")
    phones = read_phones(SHARED / "speech" / "librivox_0880.phone.json")
    fps = animator.fps
    opening = apertures(track(animate(animator, prepared, audio, MotionSettings(0.5, 0.5))))
    count = len(opening)
    magnitude = np.abs(hilbert(audio))
    envelope = np.array([
        magnitude[frame_start_sample(k, fps) : frame_start_sample(k + 1, fps)].mean() for k in range(count)
    ])

    def correlation(shift: int) -> float:  # positive shift: video late
        a = opening[shift:] if shift >= 0 else opening[:shift]
        b = envelope[: count - shift] if shift >= 0 else envelope[-shift:]
        return float(np.corrcoef(a, b)[0, 1])

    max_shift = int(0.2 * fps)
    scores = {shift: correlation(shift) for shift in range(-max_shift, max_shift + 1)}
    best = max(scores, key=scores.get)
    assert scores[best] >= 0.6
    assert abs(best / fps) <= 0.04

    labels = []
    for k in range(count):
        centre = (k + 0.5) / fps
        labels.append(next((p for p, b, d in phones if b <= centre < b + d), "SIL"))
    labels = np.array(labels)
    open_mean = opening[np.isin(labels, list(OPEN_VOWELS))].mean()
    closed_mean = opening[np.isin(labels, list(BILABIALS))].mean()
    assert open_mean >= 3 * closed_mean
    silent = labels == "SIL"
    assert np.std(np.diff(opening)[silent[1:] & silent[:-1]]) < 0.003


def test_face_setting_scales_mouth_motion(animator, prepared, long_speech):
    clip = long_speech[int(0.6 * SAMPLE_RATE) : int(2.2 * SAMPLE_RATE)]
    calm = apertures(track(animate(animator, prepared, clip, MotionSettings(face=0.0, body=0.5))))
    lively = apertures(track(animate(animator, prepared, clip, MotionSettings(face=1.0, body=0.5))))
    assert lively.max() > 1.3 * calm.max()
    assert calm.max() > 0.03, "at face=0 the mouth should still open"


# --- windows and idle motion ----------------------------------------------------


def test_windows_join_without_jump(animator, prepared, long_speech):
    clip = long_speech[int(0.5 * SAMPLE_RATE) : int(2.5 * SAMPLE_RATE)]
    frames = animate(animator, prepared, clip)
    # Same audio in windows of another size gives the same video: nothing depends on where windows end.
    np.testing.assert_array_equal(frames, animate(animator, prepared, clip, window_frames=5))
    change = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    joins = np.arange(animator.window_frames - 1, len(change), animator.window_frames)
    inside = np.setdiff1d(np.arange(len(change)), joins)
    assert change[joins].mean() <= 1.25 * change[inside].mean()


def test_idle_frames_move_and_blink(animator, prepared):
    fps = animator.fps
    frames = animate(CpuAnimator(seed=0), prepared, np.zeros(int(6.0 * SAMPLE_RATE), np.float32))
    moved = np.abs(np.diff(frames.astype(np.int16), axis=0)).max(axis=(1, 2, 3))
    assert (moved > 0).all(), "some idle frames repeat the previous one exactly"
    landmarks = track(frames)
    opening = eye_opening(landmarks)
    shut = opening < 0.5 * np.median(opening)
    starts = np.flatnonzero(shut[1:] & ~shut[:-1]) + 1
    assert len(starts) >= 1, "no blink in 6 s of idle"
    assert starts[0] / fps <= 4.0
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], shut.astype(int), [0]]))))[::2]
    assert runs.max() <= 5, "a blink lasts longer than 200 ms"
    # Small head motion: the nose moves, but smoothly (no frame-to-frame jitter).
    nose = landmarks[TRACKER_SETTLE:, NOSE_TIP, :2]
    assert np.ptp(nose, axis=0).max() > 0.5
    assert np.abs(np.diff(nose, axis=0)).max() < 1.5


def test_body_setting_scales_idle_head_motion(animator, prepared):
    silence = np.zeros(int(3.0 * SAMPLE_RATE), np.float32)

    def head_range(body: float) -> float:
        landmarks = track(animate(animator, prepared, silence, MotionSettings(face=0.5, body=body)))
        # Whole-face centroid, after the tracker's first frames: steadier than any one landmark.
        centroid = landmarks[TRACKER_SETTLE:, :, :2].mean(axis=1)
        return float(np.ptp(centroid, axis=0).max())

    still, lively = head_range(0.0), head_range(1.0)
    assert lively > 1.0
    assert lively > 3 * still


# --- the math underneath ----------------------------------------------------------


def test_membrane_reproduces_harmonic_function():
    shape = (20, 30)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    harmonic = (2.0 * cols - 3.0 * rows + 0.5 * (cols**2 - rows**2)).astype(np.float64)
    pinned = border_cells(shape)
    field = MembraneSolver(shape, pinned).solve(harmonic.ravel()[pinned, None])[..., 0]
    np.testing.assert_allclose(field, harmonic, atol=1e-3)


def test_inverted_displacement_undoes_the_warp():
    rows, cols = 60, 80
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float32)
    bump = np.exp(-((xs - 40) ** 2 + (ys - 30) ** 2) / 150.0)
    forward = np.stack([3.0 * bump, 5.0 * bump], axis=-1).astype(np.float32)
    back = invert_displacement(forward, np.dstack([xs, ys]), 1.0)
    source_x, source_y = xs + back[..., 0], ys + back[..., 1]
    bump_at = np.exp(-((source_x - 40) ** 2 + (source_y - 30) ** 2) / 150.0)
    residual = np.hypot(source_x + 3.0 * bump_at - xs, source_y + 5.0 * bump_at - ys)
    assert residual.max() < 0.1
    assert residual.mean() < 0.005


def test_generate_leaves_the_given_state_unchanged(animator, prepared, long_speech):
    # The engine re-passes an older state after an interrupt drops frames: the same
    # (window, state) must give the same frames however often it is used.
    windows = list(clip_windows(long_speech[: SAMPLE_RATE], animator))
    state = None
    for window in windows[:10]:
        _, state = animator.generate(prepared, window, MotionSettings(), state)
    again = windows[10]
    first, _ = animator.generate(prepared, again, MotionSettings(), state)
    for window in windows[10:14]:
        animator.generate(prepared, window, MotionSettings(), state)
    second, _ = animator.generate(prepared, again, MotionSettings(), state)
    np.testing.assert_array_equal(first, second)
