"""Reading speech from audio files (any container and codec FFmpeg decodes, via PyAV)."""
from __future__ import annotations

import logging
from math import gcd
from pathlib import Path

import av
import numpy as np

from model.base import AUDIO_SAMPLE_RATE

logger = logging.getLogger(__name__)

MIN_SAMPLE_RATE = 8_000  # Hz
MAX_SAMPLE_RATE = 48_000  # Hz
ACCEPTED_FORMATS = "audio files FFmpeg decodes, e.g. WAV, MP3, FLAC, OGG/Opus, M4A/AAC"


class AudioFileError(ValueError):
    """An audio file cannot be used; the message is one line saying why and what is accepted."""


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a file.

    Returns ``(samples, sample_rate)``: float32 (n, channels) in [-1, 1] (as
    decoded; integer PCM is scaled by its full range) and the rate in Hz.
    Raises AudioFileError for a missing file, a file FFmpeg cannot open or
    decode, one without an audio stream, one with no samples, or a sample rate
    outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] Hz.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                raise AudioFileError(f"no audio stream in {path.name}; accepted: {ACCEPTED_FORMATS}")
            samples, rate = _decode(container, container.streams.audio[0])
    except av.FFmpegError as exc:
        raise AudioFileError(
            f"cannot decode audio file {path.name} ({exc.__class__.__name__}); accepted: {ACCEPTED_FORMATS}"
        ) from exc
    if samples.shape[0] == 0:
        raise AudioFileError(f"audio file {path.name} holds no samples (empty audio)")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioFileError(
            f"audio sample rate {rate} Hz is not supported; accepted: {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
        )
    logger.debug("loaded %s: %d samples, %d channel(s), %d Hz", path, samples.shape[0], samples.shape[1], rate)
    return samples, rate


def _decode(container, stream) -> tuple[np.ndarray, int]:
    # A resampler to packed float32 at the stream's own rate and layout turns every
    # sample format (s16, s32, fltp, u8...) into the one array layout we return.
    resampler = None
    chunks: list[np.ndarray] = []
    rate = stream.rate or 0
    channels = stream.channels or 1
    for frame in container.decode(stream):
        if resampler is None:
            rate, channels = frame.sample_rate, len(frame.layout.channels)
            resampler = av.AudioResampler(format="flt", layout=frame.layout, rate=rate)
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1, channels))
    if resampler is not None:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1, channels))
    if not chunks:
        return np.zeros((0, channels), dtype=np.float32), rate
    return np.concatenate(chunks).astype(np.float32, copy=False), rate


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mix down to mono and resample to AUDIO_SAMPLE_RATE (16 kHz).

    ``samples``: float32 (n,) or (n, channels) at ``sample_rate`` Hz. Returns
    float32 (m,), m = round(n * 16000 / sample_rate). Resampling is polyphase
    (scipy.signal.resample_poly, Kaiser-windowed anti-alias filter).
    """
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = mono.astype(np.float32, copy=False)
    if sample_rate == AUDIO_SAMPLE_RATE:
        return mono
    # Imported here: scipy.signal takes about two seconds to import, and most
    # callers of this module (avatar-render) never resample.
    from scipy.signal import resample_poly

    divisor = gcd(AUDIO_SAMPLE_RATE, sample_rate)
    resampled = resample_poly(mono, AUDIO_SAMPLE_RATE // divisor, sample_rate // divisor)
    return resampled.astype(np.float32)
