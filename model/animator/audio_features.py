"""Per-video-frame spectral band levels of speech.

Each frame is described by the power of its audio in a few bands chosen for
lip reading: voicing and nasal murmur (80-300 Hz), low and high first-formant
regions (300-550, 550-1100 Hz: the jaw opens as F1 rises), the second-formant
region (1100-2500 Hz: lips spread as F2 rises, round as it falls) and frication
(2500-4500, 4500-8000 Hz). Three 25 ms Hann windows centred 5 ms apart on the
frame's centre are averaged: short enough that a 50 ms lip closure (M, B, P)
shows, long enough to span a pitch period.
"""
from __future__ import annotations

import numpy as np

from model.base import AUDIO_SAMPLE_RATE, AudioWindow, frame_start_sample

BANDS_HZ = ((80, 300), (300, 550), (550, 1100), (1100, 2500), (2500, 4500), (4500, 8000))
WINDOW = 400  # samples, 25 ms
FFT_SIZE = 512
OFFSETS = (-80, 0, 80)  # samples around the frame centre
#: Level floor, dB (silence reads as this).
FLOOR_DB = -90.0

_taper = np.hanning(WINDOW).astype(np.float32)
_taper /= np.sqrt(np.sum(_taper**2))
_freqs = np.fft.rfftfreq(FFT_SIZE, 1.0 / AUDIO_SAMPLE_RATE)
_band_matrix = np.stack([(_freqs >= lo) & (_freqs < hi) for lo, hi in BANDS_HZ], axis=1).astype(np.float32)


def band_levels(window: AudioWindow, first: int, count: int) -> np.ndarray:
    """Band levels of frames ``first .. first + count - 1`` (indices within the
    window, may reach one frame before or after it when the context allows).

    Returns float32 (count, len(BANDS_HZ)) levels in dB (10 log10 of the summed
    power per band of a unit-energy-windowed spectrum; full-scale speech peaks
    near 0 dB), at least FLOOR_DB. Audio outside the buffer reads as silence.
    """
    origin = frame_start_sample(window.first_frame, window.fps) - window.context_before
    centres = np.array([
        (frame_start_sample(window.first_frame + k, window.fps) + frame_start_sample(window.first_frame + k + 1, window.fps)) // 2
        - origin
        for k in range(first, first + count)
    ])
    starts = (centres[:, None] + np.array(OFFSETS)[None, :] - WINDOW // 2).ravel()
    before = max(0, -int(starts.min()))
    after = max(0, int(starts.max()) + WINDOW - len(window.audio))
    audio = np.pad(window.audio, (before, after))
    index = (starts + before)[:, None] + np.arange(WINDOW)[None, :]
    segments = audio[index] * _taper
    power = np.abs(np.fft.rfft(segments, FFT_SIZE)) ** 2
    bands = (power.astype(np.float32) @ _band_matrix).reshape(count, len(OFFSETS), -1).mean(axis=1)
    return np.maximum(10.0 * np.log10(bands + 1e-12), FLOOR_DB).astype(np.float32)
