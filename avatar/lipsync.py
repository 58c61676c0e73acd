"""The built-in lip-sync quality measure: mouth aperture of a video against its speech.

Three figures, each per video frame n (frame n owns audio samples
[frame_start_sample(n), frame_start_sample(n + 1)) of the 16 kHz clock):

* lag and correlation: Pearson correlation of mouth aperture with the speech
  envelope, maximised over shifts of +-200 ms; the best integer-frame shift is
  refined by fitting a parabola through the correlations at it and its two
  neighbours (so the lag is not quantised to whole frames). Positive lag: the
  video is late.
* open/closed ratio: mean aperture over frames whose centre lies in an open vowel
  (AA AE AH AO AW AY) over mean aperture in bilabials (M B P), which close the lips.
* silence jitter: std of frame-to-frame aperture differences over silent frames.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from model.base import AUDIO_SAMPLE_RATE, frame_start_sample
from model.face_mesh import FaceTracker, mouth_aperture

logger = logging.getLogger(__name__)

OPEN_VOWELS = frozenset({"AA", "AE", "AH", "AO", "AW", "AY"})
BILABIALS = frozenset({"M", "B", "P"})
SILENCE = "SIL"

MAX_LAG_S = 0.200  # seconds searched either side
SILENCE_THRESHOLD = 0.1  # of the clip's peak frame envelope, when no phones are given

# Targets: |lag| <= 40 ms, correlation >= 0.6, open/closed ratio >= 3.
TARGET_MAX_ABS_LAG_MS = 40.0
TARGET_MIN_CORRELATION = 0.6
TARGET_MIN_RATIO = 3.0


class LipSyncInputError(ValueError):
    """A video or phone file cannot be measured; the message is one line saying why."""


@dataclass(frozen=True)
class Phone:
    """One aligned phone: ARPAbet ``label`` without stress digits, ``begin`` and ``end`` in seconds."""

    label: str
    begin: float
    end: float


@dataclass(frozen=True)
class VideoApertures:
    """Mouth aperture of every frame of a video.

    ``aperture``: float32 (num_frames,), dimensionless (see ``mouth_aperture``),
    frames without a face filled by linear interpolation from their neighbours;
    ``missing``: bool (num_frames,), True where no face was found; ``fps``: frames/s.
    """

    aperture: np.ndarray
    missing: np.ndarray
    fps: float


@dataclass(frozen=True)
class LagFit:
    """Best alignment of aperture to envelope: ``lag_s`` seconds (positive: video late),
    ``correlation`` the Pearson correlation there, in [-1, 1] (nan if undefined)."""

    lag_s: float
    correlation: float


@dataclass(frozen=True)
class LipSyncReport:
    """All figures of one measurement (see module docstring).

    ``lag_ms`` and ``correlation`` from ``best_lag``; ``ratio`` (None without
    phones or without open-vowel and bilabial frames; inf when bilabials are
    fully closed); ``jitter`` (aperture units per frame, None with fewer than
    two consecutive silent frames); ``frames`` and ``missing_faces`` counts.
    """

    lag_ms: float
    correlation: float
    ratio: float | None
    jitter: float | None
    frames: int
    missing_faces: int
    fps: float

    def targets(self) -> list[tuple[str, bool | None]]:
        """(target description, passed) per target; passed is None when the figure is missing."""
        ratio_ok = None if self.ratio is None else bool(self.ratio >= TARGET_MIN_RATIO)
        corr_ok = None if math.isnan(self.correlation) else bool(self.correlation >= TARGET_MIN_CORRELATION)
        lag_ok = None if math.isnan(self.lag_ms) else bool(abs(self.lag_ms) <= TARGET_MAX_ABS_LAG_MS)
        return [
            (f"lag within +-{TARGET_MAX_ABS_LAG_MS:g} ms", lag_ok),
            (f"correlation >= {TARGET_MIN_CORRELATION:g}", corr_ok),
            (f"open/closed ratio >= {TARGET_MIN_RATIO:g}", ratio_ok),
        ]

    def passed(self) -> bool:
        """True when no measured target failed (missing figures do not fail)."""
        return all(ok is not False for _, ok in self.targets())


def speech_envelope(audio: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """Speech envelope per video frame.

    ``audio``: float32 mono (n,) at 16 kHz. Returns float32 (num_frames,): the mean
    magnitude of the analytic signal (scipy.signal.hilbert) over each frame's
    slice [frame_start_sample(k), frame_start_sample(k + 1)); 0 for frames past
    the end of the audio.
    """
    # Imported here: scipy.signal takes about two seconds to import, which would
    # delay avatar-eval's input checks that run before any measuring.
    from scipy.fft import next_fast_len
    from scipy.signal import hilbert

    audio = np.asarray(audio, dtype=np.float32)
    if audio.size == 0:
        return np.zeros(num_frames, dtype=np.float32)
    # FFT length padded to a fast size: hilbert on a prime length is very slow.
    magnitude = np.abs(hilbert(audio, N=next_fast_len(audio.size)))[: audio.size]
    envelope = np.zeros(num_frames, dtype=np.float32)
    for k in range(num_frames):
        piece = magnitude[frame_start_sample(k, fps) : frame_start_sample(k + 1, fps)]
        if piece.size:
            envelope[k] = piece.mean()
    return envelope


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def shifted_correlation(aperture: np.ndarray, envelope: np.ndarray, shift: int) -> float:
    """Pearson correlation of aperture[t] with envelope[t - shift] over the overlap.

    Both float arrays of equal length (n,); ``shift`` in frames (positive: video
    late). nan when the overlap has fewer than 3 frames or a constant series.
    """
    n = len(aperture)
    if shift >= 0:
        a, e = aperture[shift:], envelope[: n - shift]
    else:
        a, e = aperture[: n + shift], envelope[-shift:]
    return _pearson(np.asarray(a, float), np.asarray(e, float)) if len(a) >= 3 else math.nan


def best_lag(aperture: np.ndarray, envelope: np.ndarray, fps: float, max_lag_s: float = MAX_LAG_S) -> LagFit:
    """Shift of aperture against envelope that maximises their correlation.

    ``aperture`` and ``envelope``: float (n,) per video frame; ``fps`` frames/s;
    shifts searched: whole frames within +-``max_lag_s`` seconds, then refined
    with a parabola through the peak and its two neighbours (vertex = sub-frame
    lag and interpolated correlation, clipped to [-1, 1]). Raises ValueError
    for arrays of different lengths. Returns LagFit(nan, nan) when no shift has
    a defined correlation (e.g. a constant aperture).
    """
    if len(aperture) != len(envelope):
        raise ValueError(f"aperture ({len(aperture)}) and envelope ({len(envelope)}) lengths differ")
    max_shift = int(math.floor(max_lag_s * fps + 1e-9))
    shifts = np.arange(-max_shift, max_shift + 1)
    scores = np.array([shifted_correlation(aperture, envelope, int(s)) for s in shifts])
    if np.all(np.isnan(scores)):
        return LagFit(math.nan, math.nan)
    best = int(np.nanargmax(scores))
    offset, peak = 0.0, scores[best]
    if 0 < best < len(shifts) - 1 and not np.isnan(scores[best - 1 : best + 2]).any():
        left, centre, right = scores[best - 1 : best + 2]
        curvature = left - 2 * centre + right
        if curvature < 0:
            offset = 0.5 * (left - right) / curvature
            peak = centre - 0.25 * (left - right) * offset
    return LagFit(lag_s=(shifts[best] + offset) / fps, correlation=float(np.clip(peak, -1.0, 1.0)))


def load_phones(path: str | Path) -> list[Phone]:
    """Phones of a forced-alignment JSON file (format: /work/shared/data/README.md).

    The file holds nested ``w`` lists; entries without ``w`` children are phones,
    each with ``t`` (ARPAbet label; stress digits are stripped), ``b`` (begin, s)
    and ``d`` (duration, s). Returns phones sorted by begin. Raises
    LipSyncInputError for a missing file, invalid JSON, or entries lacking those fields.
    """
    path = Path(path)
    if not path.is_file():
        raise LipSyncInputError(f"phones file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LipSyncInputError(f"phones file {path.name} is not valid JSON ({exc.__class__.__name__})") from exc
    phones: list[Phone] = []
    stack = list(document) if isinstance(document, list) else [document]
    while stack:
        entry = stack.pop()
        if not isinstance(entry, dict):
            raise LipSyncInputError(
                f"phones file {path.name}: expected objects with t, b, d and optional w lists, got {type(entry).__name__}"
            )
        children = entry.get("w")
        if children:
            if not isinstance(children, list):
                raise LipSyncInputError(f"phones file {path.name}: 'w' must be a list")
            stack.extend(children)
            continue
        label, begin, duration = entry.get("t"), entry.get("b"), entry.get("d")
        if not isinstance(label, str) or not _is_number(begin) or not _is_number(duration) or duration < 0:
            raise LipSyncInputError(
                f"phones file {path.name}: every phone needs t (label), b (begin s) and d (duration s >= 0); got {entry!r:.80}"
            )
        phones.append(Phone(label.upper().rstrip("0123456789"), float(begin), float(begin) + float(duration)))
    if not phones:
        raise LipSyncInputError(f"phones file {path.name} holds no phones")
    return sorted(phones, key=lambda p: p.begin)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def frame_labels(phones: list[Phone], num_frames: int, fps: float) -> list[str | None]:
    """Label of the phone holding each frame's centre (None where no phone does).

    Frame k's centre is midway between frame_start_sample(k) and
    frame_start_sample(k + 1), in seconds of the 16 kHz clock.
    """
    labels: list[str | None] = []
    for k in range(num_frames):
        centre = 0.5 * (frame_start_sample(k, fps) + frame_start_sample(k + 1, fps)) / AUDIO_SAMPLE_RATE
        labels.append(next((p.label for p in phones if p.begin <= centre < p.end), None))
    return labels


def open_closed_ratio(aperture: np.ndarray, labels: list[str | None]) -> float | None:
    """Mean aperture over open-vowel frames / mean over bilabial frames (lag 0).

    ``aperture`` float (n,), ``labels`` n phone labels. None when either group
    has no frames; inf when the bilabial mean is 0 and the vowel mean is not.
    """
    is_open = np.array([label in OPEN_VOWELS for label in labels])
    is_closed = np.array([label in BILABIALS for label in labels])
    if not is_open.any() or not is_closed.any():
        return None
    open_mean, closed_mean = float(aperture[is_open].mean()), float(aperture[is_closed].mean())
    if closed_mean <= 0:
        return math.inf if open_mean > 0 else None
    return open_mean / closed_mean


def silence_jitter(aperture: np.ndarray, silent: np.ndarray) -> float | None:
    """Std of frame-to-frame aperture differences where both frames are silent.

    ``aperture`` float (n,); ``silent`` bool (n,). Aperture units per frame;
    None with fewer than two such differences.
    """
    both = silent[1:] & silent[:-1]
    if both.sum() < 2:
        return None
    return float(np.diff(aperture)[both].std())


def measure_video(path: str | Path) -> VideoApertures:
    """Mouth aperture of every frame of a video file (MediaPipe face mesh, tracking mode).

    Frames are numbered in decoding order from 0 (the renderer writes constant
    frame rate from pts 0). Raises LipSyncInputError for a missing or undecodable
    file, one without a video stream, no frames, or no face in any frame.
    """
    path = Path(path)
    if not path.is_file():
        raise LipSyncInputError(f"video file not found: {path}")
    values: list[float] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise LipSyncInputError(f"no video stream in {path.name}; accepted: MP4, MKV, MOV, WebM video")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            with FaceTracker() as tracker:
                for frame in container.decode(stream):
                    landmarks = tracker.track(frame.to_ndarray(format="rgb24"))
                    values.append(math.nan if landmarks is None else mouth_aperture(landmarks))
    except av.FFmpegError as exc:
        raise LipSyncInputError(
            f"cannot decode video file {path.name} ({exc.__class__.__name__}); accepted: MP4, MKV, MOV, WebM video"
        ) from exc
    if not values:
        raise LipSyncInputError(f"video file {path.name} holds no frames")
    if fps <= 0:
        raise LipSyncInputError(f"video file {path.name} has no frame rate")
    aperture = np.array(values, dtype=np.float32)
    missing = np.isnan(aperture)
    if missing.all():
        raise LipSyncInputError(f"no face found in any of the {len(values)} frames of {path.name}")
    if missing.any():
        logger.info("no face in %d of %d frames; interpolated", missing.sum(), len(values))
        index = np.arange(len(aperture))
        aperture[missing] = np.interp(index[missing], index[~missing], aperture[~missing])
    return VideoApertures(aperture=aperture, missing=missing, fps=fps)


def evaluate(
    aperture: np.ndarray,
    missing: np.ndarray,
    audio: np.ndarray,
    fps: float,
    phones: list[Phone] | None = None,
) -> tuple[LipSyncReport, np.ndarray]:
    """Every figure of the measure, and the per-frame envelope it used.

    ``aperture``: float (n,) per video frame; ``missing``: bool (n,) frames
    without a face; ``audio``: float32 mono 16 kHz speech; ``fps`` of the video;
    ``phones``: alignment for the ratio and the silent frames (else silent frames
    are those whose envelope is below SILENCE_THRESHOLD of the clip's peak).
    Returns (LipSyncReport, envelope float32 (n,)).
    """
    envelope = speech_envelope(audio, len(aperture), fps)
    fit = best_lag(aperture, envelope, fps)
    if phones is not None:
        labels = frame_labels(phones, len(aperture), fps)
        ratio = open_closed_ratio(aperture, labels)
        silent = np.array([label == SILENCE for label in labels])
    else:
        ratio = None
        silent = envelope < SILENCE_THRESHOLD * float(envelope.max(initial=0.0))
    report = LipSyncReport(
        lag_ms=fit.lag_s * 1000.0,
        correlation=fit.correlation,
        ratio=ratio,
        jitter=silence_jitter(aperture, silent),
        frames=len(aperture),
        missing_faces=int(np.count_nonzero(missing)),
        fps=fps,
    )
    return report, envelope
