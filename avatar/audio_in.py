"""Pushed audio in: format checks, streaming conversion to 16 kHz mono float32,
and per-frame voice activity.

Conversion uses FFmpeg's libswresample through PyAV's ``av.AudioResampler``. The
resampler is stateful, so chunk joins are seamless: feeding an utterance in any
chunking gives the same samples as feeding it whole (tests check this bit for
bit). Voice activity uses the WebRTC VAD (``webrtcvad``), a GMM speech/noise
classifier on 10 ms frames.
"""
from __future__ import annotations

import logging

import av
import numpy as np
import webrtcvad

from avatar.frames import AUDIO_SAMPLE_RATE, AudioChunk

logger = logging.getLogger(__name__)

#: Accepted input sample rates, Hz (inclusive).
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000

# PyAV sample-format names of the accepted dtypes (interleaved/packed layout).
_AV_FORMATS = {np.dtype(np.int16): "s16", np.dtype(np.float32): "flt"}
_AV_LAYOUTS = {1: "mono", 2: "stereo"}


class AudioFormatError(ValueError):
    """Pushed audio that the engine does not accept; the message says what was wrong
    and what is accepted."""


def validate_chunk(chunk: object) -> None:
    """Check that ``chunk`` is audio the engine accepts.

    Accepted: an ``AudioChunk`` whose ``samples`` is a numpy array of dtype int16
    (PCM16) or float32 (finite, nominally in [-1, 1]), shape (n,) or (n, channels)
    with 1 or 2 interleaved channels, and an integer ``sample_rate`` in
    [8000, 48000] Hz. Raises AudioFormatError otherwise.
    """
    if not isinstance(chunk, AudioChunk):
        raise AudioFormatError(f"expected an AudioChunk, got {type(chunk).__name__}")
    samples = chunk.samples
    if not isinstance(samples, np.ndarray):
        raise AudioFormatError(f"audio samples must be a numpy array, got {type(samples).__name__}")
    if samples.dtype not in _AV_FORMATS:
        raise AudioFormatError(f"audio samples must be int16 (PCM16) or float32, got {samples.dtype}")
    if samples.ndim not in (1, 2) or (samples.ndim == 2 and samples.shape[1] not in _AV_LAYOUTS):
        raise AudioFormatError(
            f"audio must have shape (n,) or (n, channels) with 1 or 2 channels, got shape {samples.shape}"
        )
    rate = chunk.sample_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioFormatError(
            f"audio sample rate must be an integer in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got {rate!r}"
        )
    if samples.dtype == np.float32 and not np.isfinite(samples).all():
        raise AudioFormatError("audio samples contain NaN or infinity; accepted: finite float32 in [-1, 1]")


class AudioInput:
    """Streaming converter of pushed chunks to 16 kHz mono float32.

    Feed one utterance's chunks to ``convert`` in order, then call ``flush`` at its
    end to get the samples the resampler still holds (about 1 ms). Stereo is
    averaged to mono ((L + R) / 2); int16 is scaled by 1/32768. A chunk whose rate,
    channel count or dtype differs from the previous one ends the running stream
    (its held samples come out first) and starts a new one. 16 kHz mono input
    passes through unchanged.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._stream_format: tuple[int, int, np.dtype] | None = None

    def convert(self, chunk: AudioChunk) -> np.ndarray:
        """Samples of ``chunk`` at 16 kHz: float32 (m,), m about n * 16000 / rate
        (the resampler holds back a few samples until the next chunk or ``flush``).

        Raises AudioFormatError for audio ``validate_chunk`` rejects; the stream
        is then unchanged.
        """
        validate_chunk(chunk)
        samples = chunk.samples
        channels = 1 if samples.ndim == 1 else samples.shape[1]
        stream_format = (int(chunk.sample_rate), channels, samples.dtype)
        if samples.shape[0] == 0:
            return np.zeros(0, np.float32)
        held = np.zeros(0, np.float32)
        if stream_format != self._stream_format:
            held = self.flush()
            # rematrix_maxval=1 makes the stereo-to-mono downmix (L + R) / 2 instead
            # of libswresample's default (L + R) / sqrt(2), which can exceed [-1, 1].
            self._resampler = av.AudioResampler(
                format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE, options={"rematrix_maxval": "1.0"}
            )
            self._stream_format = stream_format
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples).reshape(1, -1),
            format=_AV_FORMATS[samples.dtype],
            layout=_AV_LAYOUTS[channels],
        )
        frame.sample_rate = int(chunk.sample_rate)
        return np.concatenate([held, *self._to_arrays(self._resampler.resample(frame))])

    def flush(self) -> np.ndarray:
        """End the current stream: the samples the resampler still holds, float32
        (m,) at 16 kHz (empty when no stream is running). The next ``convert``
        starts a fresh stream."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        held = self._to_arrays(self._resampler.resample(None))
        self.reset()
        return np.concatenate([np.zeros(0, np.float32), *held])

    def reset(self) -> None:
        """Drop the current stream and the samples it holds (an interrupt)."""
        self._resampler = None
        self._stream_format = None

    @staticmethod
    def _to_arrays(frames: list[av.AudioFrame]) -> list[np.ndarray]:
        return [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]


class VoiceActivity:
    """Tags a 16 kHz audio slice (one video frame's audio) as speech or silence.

    The slice is cut into 10 ms sub-frames (160 samples; a remainder shorter than
    that is ignored) that the WebRTC VAD classifies; the slice is speech when at
    least ``min_voiced`` of them are voiced. The VAD adapts to the noise floor, so
    one instance should see an utterance's frames in order.

    ``mode``: WebRTC VAD aggressiveness, 0 (lenient) .. 3 (strict); 3 leaves the
    fewest pauses marked as speech. ``min_voiced``: fraction in (0, 1].
    Raises ValueError for values outside these ranges.
    """

    SUBFRAME_SAMPLES = AUDIO_SAMPLE_RATE // 100

    def __init__(self, mode: int = 3, min_voiced: float = 0.5) -> None:
        if mode not in (0, 1, 2, 3):
            raise ValueError(f"VAD mode must be 0, 1, 2 or 3, got {mode!r}")
        if not 0.0 < min_voiced <= 1.0:
            raise ValueError(f"min_voiced must be in (0, 1], got {min_voiced!r}")
        self._vad = webrtcvad.Vad(mode)
        self._min_voiced = min_voiced

    def is_speech(self, samples: np.ndarray) -> bool:
        """True when the float32 (n,) 16 kHz slice ``samples`` (values in [-1, 1])
        holds speech. Slices shorter than 10 ms are zero-padded to 10 ms."""
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
        step = self.SUBFRAME_SAMPLES
        if pcm.shape[0] < step:
            pcm = np.pad(pcm, (0, step - pcm.shape[0]))
        count = pcm.shape[0] // step
        voiced = sum(self._vad.is_speech(pcm[i * step:(i + 1) * step].tobytes(), AUDIO_SAMPLE_RATE) for i in range(count))
        return voiced >= self._min_voiced * count
