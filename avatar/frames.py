"""Every message type of the session engine, in one place.

One time base for all media: TIME_BASE = 1/16000 s, the sample clock of the
engine's 16 kHz mono audio. A pts counts samples of that clock from the start of
the session; video frame n has pts ``frame_start_sample(n, fps)``, the first
sample of the audio slice it is paired with.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

import numpy as np

from model.base import AUDIO_SAMPLE_RATE, MotionSettings, frame_start_sample

__all__ = [
    "AUDIO_SAMPLE_RATE",
    "TIME_BASE",
    "AudioChunk",
    "VideoFrame",
    "AvatarFrame",
    "EndOfSpeech",
    "Interrupt",
    "MotionSettings",
    "SessionState",
    "StateChanged",
    "PlaybackStarted",
    "PlaybackFinished",
    "SessionError",
    "frame_start_sample",
]

TIME_BASE = Fraction(1, AUDIO_SAMPLE_RATE)


@dataclass(frozen=True)
class AudioChunk:
    """Audio samples. ``samples``: float32 (n,) mono in [-1, 1] or int16 (n,) / (n, channels)
    on input; the engine's own chunks are always float32 mono at 16 kHz.
    ``sample_rate`` in Hz; ``pts`` in TIME_BASE units, None on input (the engine
    places pushed audio on its own clock)."""

    samples: np.ndarray
    sample_rate: int = AUDIO_SAMPLE_RATE
    pts: int | None = None

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return self.samples.shape[0] / self.sample_rate


@dataclass(frozen=True)
class VideoFrame:
    """One video frame. ``image``: RGB uint8 (H, W, 3); ``pts`` in TIME_BASE units."""

    image: np.ndarray
    pts: int

    @property
    def time(self) -> float:
        """Presentation time in seconds."""
        return float(self.pts * TIME_BASE)


@dataclass(frozen=True)
class AvatarFrame:
    """A video frame with the audio slice that plays during it (same pts), as the
    session's async iterator yields them. ``speaking``: the frame belongs to an
    utterance (False for idle frames, whose audio is silence)."""

    video: VideoFrame
    audio: AudioChunk
    speaking: bool


@dataclass(frozen=True)
class EndOfSpeech:
    """The current utterance is complete: play out what is queued, then go idle."""


@dataclass(frozen=True)
class Interrupt:
    """Drop all queued audio and frames and return to idle (clear_buffer)."""


class SessionState(str, Enum):
    """What the avatar is doing, as the contract's ``state`` event reports it."""

    IDLE = "idle"
    LISTENING = "listening"
    SPEAKING = "speaking"


@dataclass(frozen=True)
class StateChanged:
    """Event: the session state changed."""

    state: SessionState


@dataclass(frozen=True)
class PlaybackStarted:
    """Event: the first frame of an utterance was emitted; ``pts`` is that frame's."""

    pts: int


@dataclass(frozen=True)
class PlaybackFinished:
    """Event: an utterance ended. ``position``: seconds of it played;
    ``interrupted``: True when cut by an interrupt."""

    position: float
    interrupted: bool


@dataclass(frozen=True)
class SessionError:
    """Event: a bad message or a failure; the session goes on. ``code`` is a short
    machine-readable word (e.g. ``bad_audio``), ``message`` a sentence for people."""

    code: str
    message: str
