"""Counters behind ``AvatarSession.stats()``."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from model.base import AUDIO_SAMPLE_RATE

logger = logging.getLogger(__name__)

# Weight of the newest window in the running estimate of generation time.
_SMOOTHING = 0.2


@dataclass
class SessionStats:
    """What a session measures. Times are session-clock seconds except the
    generation times, which are wall time (``time.perf_counter``) even on a
    VirtualClock. ``window_seconds`` is a running estimate of one generate call,
    seeded with ``initial_window_seconds``."""

    fps: float
    initial_window_seconds: float
    started_at: float | None = None
    first_frame_at: float | None = None
    last_frame_at: float | None = None
    frames_out: int = 0
    late_frames: int = 0
    dropped_frames: int = 0
    generation_seconds: float = 0.0
    generated_frames: int = 0
    lip_latency: float | None = None

    def __post_init__(self) -> None:
        self.window_seconds = self.initial_window_seconds

    def frame_out(self, now: float) -> None:
        """Count a frame handed out at clock time ``now``."""
        if self.first_frame_at is None:
            self.first_frame_at = now
        self.last_frame_at = now
        self.frames_out += 1

    def window_generated(self, frames: int, seconds: float) -> None:
        """Count an accepted generate call of ``frames`` frames that took ``seconds``."""
        self.generation_seconds += seconds
        self.generated_frames += frames
        self.window_seconds += _SMOOTHING * (seconds - self.window_seconds)

    def as_dict(self, queued_samples: int) -> dict:
        """The ``AvatarSession.stats()`` dictionary (see there); ``queued_samples``:
        16 kHz speech samples pushed or generated but not yet handed out."""
        elapsed = (self.last_frame_at or 0.0) - (self.first_frame_at or 0.0)
        return {
            "fps": (self.frames_out - 1) / elapsed if elapsed > 0 else self.fps,
            "frames": self.frames_out,
            "time_to_first_frame_s": (
                None if self.first_frame_at is None else self.first_frame_at - self.started_at
            ),
            "audio_to_lip_latency_s": self.lip_latency,
            "rtf": self.generation_seconds * self.fps / self.generated_frames if self.generated_frames else None,
            "queued_ms": 1000.0 * queued_samples / AUDIO_SAMPLE_RATE,
            "dropped_frames": self.dropped_frames,
            "late_frames": self.late_frames,
        }
