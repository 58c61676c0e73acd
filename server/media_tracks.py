"""Outgoing media of a live session: an AvatarSession's frames as one video and
one audio track, paced on one media clock.

The session's frames carry pts in 16 kHz samples (``avatar.frames.TIME_BASE``);
the video track stamps frame pts in 90 kHz as ``pts * 90000 // 16000`` and the
audio track sends the frame's own audio slice, upsampled exactly 3x to 48 kHz
and cut into 20 ms packets (960 samples) whose pts count 48 kHz samples from
``3 * pts``. Every timestamp comes from integer sample counts, so audio and
video cannot drift apart however long a session runs.

Pacing (as aiortc's own tracks do it): ``recv()`` returns each item at
``origin + (pts - first_pts) / rate`` on one schedule shared by both tracks
(``MediaPacer``), which follows the session's own pacing. Each track holds
at most about two frames. aiortc's Opus encoder numbers RTP timestamps by counting the
samples it is given, so the audio track never skips a packet: a gap in pts is
filled with silence, and an interrupt (``flush``) turns queued packets into
silence instead of dropping them. Video frames are dropped when their queue is
full (a slow encoder) or on ``flush``; the 90 kHz pts keep their place.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from fractions import Fraction

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from scipy.signal import firwin, upfirdn

from avatar.clock import Clock
from avatar.frames import AUDIO_SAMPLE_RATE, AvatarFrame

logger = logging.getLogger(__name__)

#: RTP clock rate of video, Hz.
VIDEO_CLOCK_RATE = 90_000
#: Sample rate of the outgoing audio track, Hz (Opus' native rate).
OUT_AUDIO_RATE = 48_000
#: Samples per outgoing audio packet (20 ms at 48 kHz).
PACKET_SAMPLES = 960
#: Video frames a track holds before the oldest is dropped.
VIDEO_QUEUE_FRAMES = 2
#: Audio packets the audio track holds before the oldest is dropped (1 s).
AUDIO_QUEUE_PACKETS = 50
# A source item this late (s) moves the shared pacing origin (the session itself
# re-paced after a stall) instead of sending every later item at once.
_RESYNC_AFTER_S = 0.25


def video_pts(pts: int) -> int:
    """A 16 kHz media-clock pts (samples) as a 90 kHz video pts (ticks), rounded
    down: exact integer arithmetic, so the error never exceeds one tick."""
    return pts * VIDEO_CLOCK_RATE // AUDIO_SAMPLE_RATE


class Upsampler3x:
    """Streaming exact 3x upsampler, 16 kHz -> 48 kHz, float32 mono.

    Polyphase FIR (zero-stuffing then a 97-tap Kaiser-windowed low-pass at
    7.6 kHz, scipy ``upfirdn``); the filter's history carries over between calls,
    so any chunking gives the same output as the whole signal, and ``n`` samples
    in always give exactly ``3 * n`` out. Linear phase: the output lags the input
    by DELAY_S (1 ms), the same for every sample.
    """

    FACTOR = 3
    _HALF_INPUT_TAPS = 16
    DELAY_S = _HALF_INPUT_TAPS / AUDIO_SAMPLE_RATE

    def __init__(self) -> None:
        taps = 2 * self.FACTOR * self._HALF_INPUT_TAPS + 1
        self._filter = (firwin(taps, 7600, window=("kaiser", 8.0), fs=OUT_AUDIO_RATE) * self.FACTOR).astype(np.float64)
        # Inputs the filter reaches back over: enough that each output sees only real history.
        self._history = np.zeros(math.ceil((taps - 1) / self.FACTOR), np.float64)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """float32 (n,) at 16 kHz -> float32 (3n,) at 48 kHz."""
        joined = np.concatenate([self._history, samples.astype(np.float64, copy=False)])
        start = self.FACTOR * len(self._history)
        out = upfirdn(self._filter, joined, up=self.FACTOR)[start:start + self.FACTOR * len(samples)]
        self._history = joined[len(joined) - len(self._history):]
        return out.astype(np.float32)


class Packetizer:
    """Cuts a contiguous 48 kHz sample stream into PACKET_SAMPLES packets.

    ``add(samples, pts)``: float32 (n,) samples in [-1, 1] (clipped, scaled by
    32767 to int16); ``pts`` is the 48 kHz sample index of ``samples[0]`` and
    must continue the previous call's samples (only the first call's pts is
    used). Returns the completed packets as (pts, int16 (960,)) pairs; a
    remainder waits for the next call.
    """

    def __init__(self) -> None:
        self._held = np.zeros(0, np.float32)
        self._held_pts: int | None = None

    def add(self, samples: np.ndarray, pts: int) -> list[tuple[int, np.ndarray]]:
        if self._held_pts is None:
            self._held_pts = pts
        stream = np.concatenate([self._held, samples])
        count = len(stream) // PACKET_SAMPLES
        pcm = (np.clip(stream[:count * PACKET_SAMPLES], -1.0, 1.0) * 32767.0).astype(np.int16)
        packets = [(self._held_pts + k * PACKET_SAMPLES, pcm[k * PACKET_SAMPLES:(k + 1) * PACKET_SAMPLES])
                   for k in range(count)]
        self._held = stream[count * PACKET_SAMPLES:]
        self._held_pts += count * PACKET_SAMPLES
        return packets


class MediaPacer:
    """One wall-clock schedule for both outgoing tracks, following the source.

    An item with pts p (16 kHz samples, or any rate given to ``due``) is due at
    ``origin + (p - first_pts) / rate``. The first item seen (``observe``) sets
    origin = clock now; later items move the origin so the schedule follows the
    session's own pacing, for both tracks at once: an item that arrives before
    its due time moves the origin earlier to its arrival (the session hands a
    frame out no earlier than it is due, so the earliest arrivals are the true
    schedule, and no item waits in a track for a late origin); one arriving
    more than 0.25 s late (the session re-paced after a stall) moves it later by
    that lateness. ``clock``: an avatar Clock (SystemClock live, VirtualClock in
    tests).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._origin: float | None = None
        self._first_pts = 0

    def observe(self, pts: int) -> None:
        """A source item with 16 kHz pts ``pts`` has arrived now."""
        now = self.clock.now()
        if self._origin is None:
            self._origin, self._first_pts = now, pts
            return
        lateness = now - self.due(pts, AUDIO_SAMPLE_RATE)
        if lateness < 0.0:
            self._origin += lateness
        elif lateness > _RESYNC_AFTER_S:
            logger.info("media source %.3f s late: pacing origin moves", lateness)
            self._origin += lateness

    def due(self, pts: int, rate: int) -> float:
        """Clock time at which the item with ``pts`` (units of 1/``rate`` s) is due."""
        first = self._first_pts * rate // AUDIO_SAMPLE_RATE
        return self._origin + (pts - first) / rate

    async def wait(self, pts: int, rate: int) -> float:
        """Sleep until the item is due; returns how late it is then (s, >= 0)."""
        due = self.due(pts, rate)
        await self.clock.sleep_until(due)
        return max(0.0, self.clock.now() - due)


class PacedTrack(MediaStreamTrack):
    """Common part of the outgoing tracks: a short queue fed by the peer's pump,
    drained by aiortc's sender through ``recv``; ``started`` is set by the first
    ``recv`` (the sender is running)."""

    def __init__(self, pacer: MediaPacer, capacity: int) -> None:
        super().__init__()
        self._pacer = pacer
        self._queue: deque = deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        self.started = asyncio.Event()
        self.sent = 0
        self.late = 0
        self.dropped = 0

    def _put(self, item) -> None:
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(item)
        self._ready.set()

    async def _next_item(self):
        """The oldest queued item, waiting for one; MediaStreamError once stopped."""
        self.started.set()
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        return self._queue[0]

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class AvatarVideoTrack(PacedTrack):
    """Outgoing video: RGB frames from the session, pts in 90 kHz from the frame's
    16 kHz pts. Holds at most VIDEO_QUEUE_FRAMES frames (the oldest is dropped
    and counted in ``dropped`` when the sender falls behind). ``fps`` sets what
    counts as late (more than one frame period)."""

    kind = "video"

    def __init__(self, pacer: MediaPacer, fps: float) -> None:
        super().__init__(pacer, VIDEO_QUEUE_FRAMES)
        self._period = 1.0 / fps

    def put(self, image: np.ndarray, pts: int) -> None:
        """Queue an RGB uint8 (H, W, 3) frame with 16 kHz pts ``pts``."""
        if image.shape[0] % 2 == 0 and image.shape[1] % 2 == 0:
            # The encoder wants I420; OpenCV's BT.601 video-range conversion gives
            # swscale's values at a seventh of its cost (0.09 vs 0.7 ms at 512x512).
            frame = av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        else:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = video_pts(pts)
        frame.time_base = Fraction(1, VIDEO_CLOCK_RATE)
        self._put((pts, frame))

    def flush(self) -> int:
        """Drop every queued frame; returns how many."""
        count = len(self._queue)
        self._queue.clear()
        return count

    async def recv(self) -> av.VideoFrame:
        while True:
            pts, frame = await self._next_item()
            lateness = await self._pacer.wait(pts, AUDIO_SAMPLE_RATE)
            if self._queue and self._queue[0][1] is frame:
                break
            # Flushed or dropped while we waited: the next one in the queue replaces it.
        self._queue.popleft()
        if lateness > self._period:
            self.late += 1
        self.sent += 1
        return frame


class AvatarAudioTrack(PacedTrack):
    """Outgoing audio: 20 ms packets of 48 kHz s16 mono, pts counting 48 kHz
    samples. Never skips: a pts gap (packets dropped on overflow) is filled with
    silence, so aiortc's sample-counting RTP timestamps stay on the media clock."""

    kind = "audio"

    def __init__(self, pacer: MediaPacer) -> None:
        super().__init__(pacer, AUDIO_QUEUE_PACKETS)
        self._next_pts: int | None = None

    def put(self, pcm: np.ndarray, pts: int) -> None:
        """Queue one packet: int16 (960,) at 48 kHz whose first sample is ``pts``."""
        self._put((pts, pcm))

    def flush(self) -> int:
        """Silence every queued packet (keeping its pts); returns how many."""
        for k, (pts, pcm) in enumerate(self._queue):
            self._queue[k] = (pts, np.zeros_like(pcm))
        return len(self._queue)

    async def recv(self) -> av.AudioFrame:
        while True:
            pts, _ = await self._next_item()
            if self._next_pts is None:
                self._next_pts = pts
            if pts >= self._next_pts:
                break
            self._queue.popleft()  # already covered by silence: never send a sample twice
        pts = self._next_pts
        await self._pacer.wait(pts, OUT_AUDIO_RATE)
        # Take the packet only now: a flush while we waited has silenced it.
        head = self._queue[0][0] if self._queue else None
        if head == pts:
            pcm = self._queue.popleft()[1]
        else:  # a gap (packets dropped on overflow): silence up to the next packet
            gap = head - pts if head is not None and head > pts else PACKET_SAMPLES
            pcm = np.zeros(min(PACKET_SAMPLES, gap), np.int16)
        self._next_pts = pts + len(pcm)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUT_AUDIO_RATE
        frame.pts = pts
        frame.time_base = Fraction(1, OUT_AUDIO_RATE)
        self.sent += 1
        return frame


class MediaFeeder:
    """Splits each AvatarFrame over the outgoing tracks: the image to the video
    track, the audio slice upsampled to 48 kHz and packetized to the audio track
    (``audio`` None: video only). Frames must come in order with consecutive pts,
    as an AvatarSession's iterator gives them."""

    def __init__(self, pacer: MediaPacer, video: AvatarVideoTrack, audio: AvatarAudioTrack | None) -> None:
        self._pacer = pacer
        self._video = video
        self._audio = audio
        self._upsampler = Upsampler3x()
        self._packetizer = Packetizer()

    def feed(self, frame: AvatarFrame) -> None:
        """Queue one frame's image and audio (both with the frame's pts)."""
        self._pacer.observe(frame.video.pts)
        self._video.put(frame.video.image, frame.video.pts)
        if self._audio is not None:
            audio = self._upsampler.process(frame.audio.samples)
            for pts, pcm in self._packetizer.add(audio, frame.audio.pts * Upsampler3x.FACTOR):
                self._audio.put(pcm, pts)
