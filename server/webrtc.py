"""WebRTC media for one live session: an AvatarSession's frames out as one video
and one audio track, an optional microphone track in.

One media clock. The session's frames carry pts in 16 kHz samples
(``avatar.frames.TIME_BASE``); the video track stamps frame pts in 90 kHz as
``pts * 90000 // 16000`` and the audio track sends the frame's own audio slice,
upsampled exactly 3x to 48 kHz and cut into 20 ms packets (960 samples) whose
pts count 48 kHz samples from ``3 * pts``. Every timestamp comes from integer
sample counts, so audio and video cannot drift apart however long a session runs.

Pacing (as aiortc's own tracks do it): ``recv()`` returns each item at
``origin + (pts - first_pts) / rate`` on one schedule shared by both tracks
(``MediaPacer``), which follows the session's own pacing. Each track holds
at most about two frames. aiortc's Opus encoder numbers RTP timestamps by counting the
samples it is given, so the audio track never skips a packet: a gap in pts is
filled with silence, and an interrupt (``flush``) turns queued packets into
silence instead of dropping them. Video frames are dropped when their queue is
full (a slow encoder) or on ``flush``; the 90 kHz pts keep their place.

Inbound audio (a microphone): decoded frames -> 16 kHz mono (PyAV's resampler)
-> WebRTC VAD on 10 ms frames -> ``avatar.push_audio`` while voiced (with a
pre-roll of the audio just before the voice started), ``avatar.end_of_speech``
after ~500 ms of silence (``MicrophoneInput``).

ICE: no STUN/TURN servers (``RTCConfiguration(iceServers=[])``); host candidate
addresses can be pinned with ``pin_ice_host_addresses`` (aioice never offers
127.0.0.1 on its own, see /work/shared/notes/webrtc-testing.md).
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import aioice.ice
import av
import numpy as np
import webrtcvad
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription
from scipy.signal import firwin, upfirdn

from avatar.clock import Clock, SystemClock
from avatar.frames import AUDIO_SAMPLE_RATE, AudioChunk, AvatarFrame
from avatar.session import AvatarSession

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

def pin_ice_host_addresses(addresses: list[str]) -> None:
    """Make aioice gather host candidates on exactly ``addresses`` (IPv4 or IPv6
    literals, e.g. ``["127.0.0.1"]``) in this process, for every peer connection
    created afterwards. ``[]`` changes nothing (aioice lists the machine's
    interfaces itself, skipping loopback).

    This is the one place that replaces ``aioice.ice.get_host_addresses``, the only
    hook aioice offers: loopback-only tests need 127.0.0.1, which aioice never
    offers, and a server behind NAT may want to pin its public interface.
    Raises ValueError for an entry that is not an IP address literal.
    """
    if not addresses:
        return
    parsed = []
    for address in addresses:
        try:
            parsed.append(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(f"ICE host address must be an IPv4 or IPv6 literal, got {address!r}") from None

    def pinned(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [str(ip) for ip in parsed if (ip.version == 4 and use_ipv4) or (ip.version == 6 and use_ipv6)]

    aioice.ice.get_host_addresses = pinned
    logger.info("ICE host candidates pinned to %s", ", ".join(map(str, parsed)))


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


class _PacedTrack(MediaStreamTrack):
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


class AvatarVideoTrack(_PacedTrack):
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


class AvatarAudioTrack(_PacedTrack):
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


@dataclass(frozen=True)
class VadSettings:
    """Microphone turn detection. ``mode``: WebRTC VAD aggressiveness 0..3;
    ``start_ms`` voiced audio within the last ``start_window_ms`` that opens an
    utterance; ``preroll_ms`` audio before that pushed with it; ``hangover_ms``
    silence that ends it. All durations in milliseconds, multiples of 10."""

    mode: int = 2
    start_ms: int = 60
    start_window_ms: int = 100
    preroll_ms: int = 200
    hangover_ms: int = 500


class MicrophoneInput:
    """Turns a remote microphone track into utterances of an AvatarSession.

    Each received frame (any rate/layout, as aiortc decodes it) is resampled to
    16 kHz mono s16 and cut into 10 ms VAD frames. While waiting, the last
    ``preroll_ms`` are kept; when ``start_ms`` of the last ``start_window_ms`` are
    voiced, the pre-roll and everything after is pushed with
    ``avatar.push_audio`` until ``hangover_ms`` of unvoiced audio in a row, then
    ``avatar.end_of_speech()``. ``run()`` returns when the track ends.
    """

    _VAD_SAMPLES = AUDIO_SAMPLE_RATE // 100  # 10 ms

    def __init__(self, track: MediaStreamTrack, avatar: AvatarSession, settings: VadSettings = VadSettings()) -> None:
        self._track = track
        self._avatar = avatar
        self._settings = settings
        self._vad = webrtcvad.Vad(settings.mode)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_SAMPLE_RATE)
        self._pending = np.zeros(0, np.int16)
        self._preroll: deque[np.ndarray] = deque(maxlen=settings.preroll_ms // 10)
        self._recent: deque[bool] = deque(maxlen=settings.start_window_ms // 10)
        self._speaking = False
        self._silent_frames = 0
        self.utterances = 0

    async def run(self) -> None:
        """Read the track until it ends (or the avatar session closes); an
        utterance still open then is ended."""
        try:
            while True:
                try:
                    frame = await self._track.recv()
                except MediaStreamError:
                    break
                for converted in self._resampler.resample(frame):
                    await self._feed(converted.to_ndarray().reshape(-1))
            if self._speaking:
                self._end_utterance()
        except RuntimeError as exc:  # the avatar session closed under us
            logger.debug("microphone input stops: %s", exc)

    async def _feed(self, samples: np.ndarray) -> None:
        stream = np.concatenate([self._pending, samples])
        step = self._VAD_SAMPLES
        count = len(stream) // step
        self._pending = stream[count * step:]
        to_push: list[np.ndarray] = []
        for k in range(count):
            chunk = stream[k * step:(k + 1) * step]
            voiced = self._vad.is_speech(chunk.tobytes(), AUDIO_SAMPLE_RATE)
            if self._speaking:
                to_push.append(chunk)
                self._silent_frames = 0 if voiced else self._silent_frames + 1
                if self._silent_frames * 10 >= self._settings.hangover_ms:
                    await self._push(to_push)
                    to_push = []
                    self._end_utterance()
                continue
            self._preroll.append(chunk)
            self._recent.append(voiced)
            if sum(self._recent) * 10 >= self._settings.start_ms:
                self._speaking = True
                self._silent_frames = 0
                self.utterances += 1
                to_push.extend(self._preroll)
                self._preroll.clear()
                logger.debug("microphone: speech starts")
        await self._push(to_push)

    async def _push(self, chunks: list[np.ndarray]) -> None:
        if chunks:
            await self._avatar.push_audio(AudioChunk(np.concatenate(chunks), AUDIO_SAMPLE_RATE))

    def _end_utterance(self) -> None:
        self._speaking = False
        self._recent.clear()
        self._avatar.end_of_speech()
        logger.debug("microphone: speech ends")


class MediaPeer:
    """The server side of one WebRTC connection for a live AvatarSession.

    ``avatar``: the started session whose frames this peer sends (it reads the
    session's frame iterator in one task, from when every outgoing track's sender
    runs until ``close``; the session is not closed by the peer). ``on_closed``:
    called once with a reason (``"ice_failed"``, ``"closed"`` when the remote
    side closed, ``"media_error"`` when the frame stream failed); not called for
    ``close()`` itself; may return an awaitable. ``fps``: the session's frame
    rate (what counts as a late frame). ``clock``: paces the tracks (default
    SystemClock; must be the session's clock). ``vad``: microphone turn settings.
    """

    def __init__(
        self,
        avatar: AvatarSession,
        *,
        on_closed: Callable[[str], Awaitable[None] | None],
        fps: float,
        clock: Clock | None = None,
        vad: VadSettings = VadSettings(),
    ) -> None:
        self._avatar = avatar
        self._on_closed = on_closed
        self._fps = float(fps)
        self._vad = vad
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pacer = MediaPacer(clock or SystemClock())
        self._video = AvatarVideoTrack(self._pacer, self._fps)
        self._audio = AvatarAudioTrack(self._pacer)
        self._senders: list[_PacedTrack] = []
        self._tasks: set[asyncio.Task] = set()
        self._mic: MicrophoneInput | None = None
        self._closing = False
        self._notified = False
        self._flushes = 0
        self._flushed_frames = 0
        self._remote: dict = {}
        self._pc.on("connectionstatechange", self._on_connection_state)
        self._pc.on("track", self._on_track)

    @property
    def connected(self) -> bool:
        """Whether ICE and DTLS are connected (media flows)."""
        return self._pc.connectionState == "connected"

    async def answer(self, offer_sdp: str) -> str:
        """Answer a non-trickle SDP offer; returns the answer SDP with all of this
        side's ICE candidates. The offer must have a video m-line the client
        receives on; an audio m-line gets the avatar's voice, and a microphone
        if the client sends one. Raises ValueError with a one-line reason for SDP
        that cannot be parsed or offers no video, RuntimeError after ``close``."""
        if self._closing:
            raise RuntimeError("the media peer is closed")
        if not isinstance(offer_sdp, str) or "m=" not in offer_sdp:
            raise ValueError("malformed SDP offer: expected an SDP text with at least one m= line")
        try:
            media = SessionDescription.parse(offer_sdp).media
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises assorted errors for bad SDP; all mean the same to a client
            raise ValueError(f"malformed SDP offer: {_one_line(exc)}") from None
        # The client's direction: "recvonly"/"sendrecv" means it receives what we send.
        receives = {m.kind for m in media if m.direction in ("recvonly", "sendrecv")}
        if "video" not in receives:
            raise ValueError("SDP offer has no video m-line to receive the avatar on (add a recvonly video transceiver)")
        self._pc.addTrack(self._video)
        self._senders.append(self._video)
        if "audio" in receives:
            self._pc.addTrack(self._audio)
            self._senders.append(self._audio)
        try:
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        except Exception as exc:  # e.g. no codec in common
            raise ValueError(f"SDP offer cannot be answered: {_one_line(exc)}") from None
        self._spawn(self._pump_frames(), "media-pump")
        self._spawn(self._poll_remote_stats(), "media-stats")
        return self._pc.localDescription.sdp

    def flush(self) -> None:
        """Interrupt path: drop video frames queued in the track and silence the
        queued audio packets (called right after ``avatar.clear_buffer()``)."""
        frames = self._video.flush()
        self._audio.flush()
        self._flushes += 1
        self._flushed_frames += frames
        logger.debug("flushed %d queued video frames", frames)

    async def close(self) -> None:
        """Stop the media, close the connection. Idempotent; does not call
        ``on_closed`` and does not close the avatar session."""
        if self._closing:
            return
        self._closing = True
        # close() may run inside one of our tasks (on_closed from the pump): never await that one.
        others = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._video.stop()
        self._audio.stop()
        await self._pc.close()
        logger.info("media peer closed")

    def stats(self) -> dict:
        """Sender-side counts and the receiver's RTCP estimates:

        ``connection_state`` (aiortc's), ``video_frames_sent``,
        ``audio_packets_sent`` (20 ms each), ``late_frames`` (video sent more than
        one frame period after due), ``dropped_frames`` (video dropped because
        the sender fell behind), ``flushes`` and ``flushed_frames`` (interrupts),
        ``microphone_utterances``; from the latest receiver reports, per kind:
        ``{kind}_packets_lost``, ``{kind}_jitter_s`` and ``{kind}_round_trip_s``
        (absent until a report came).
        """
        return {
            "connection_state": self._pc.connectionState,
            "video_frames_sent": self._video.sent,
            "audio_packets_sent": self._audio.sent,
            "late_frames": self._video.late,
            "dropped_frames": self._video.dropped,
            "flushes": self._flushes,
            "flushed_frames": self._flushed_frames,
            "microphone_utterances": self._mic.utterances if self._mic else 0,
            **self._remote,
        }

    # -- internals -----------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_frames(self) -> None:
        """The one reader of the session's frames: waits until every outgoing
        track's sender runs (so both tracks start on the same frame), then feeds
        each frame to the tracks."""
        await asyncio.gather(*(track.started.wait() for track in self._senders))
        feeder = MediaFeeder(self._pacer, self._video, self._audio if self._audio in self._senders else None)
        try:
            async for frame in self._avatar:
                feeder.feed(frame)
        except Exception as exc:  # RuntimeError: the session's generator failed for good
            logger.error("avatar frame stream failed: %s", _one_line(exc), exc_info=not isinstance(exc, RuntimeError))
            await self._notify_closed("media_error")

    async def _poll_remote_stats(self) -> None:
        """Refresh the receiver's RTCP figures once a second."""
        while True:
            await asyncio.sleep(1.0)
            for transceiver in self._pc.getTransceivers():
                if transceiver.sender.track is None:
                    continue
                report = await transceiver.sender.getStats()
                for stat in report.values():
                    if stat.type == "remote-inbound-rtp":
                        kind = transceiver.kind
                        self._remote[f"{kind}_packets_lost"] = stat.packetsLost
                        self._remote[f"{kind}_jitter_s"] = stat.jitter / (
                            VIDEO_CLOCK_RATE if kind == "video" else OUT_AUDIO_RATE
                        )
                        self._remote[f"{kind}_round_trip_s"] = stat.roundTripTime

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self._mic is not None:
            return
        logger.info("microphone track received")
        self._mic = MicrophoneInput(track, self._avatar, self._vad)
        self._spawn(self._mic.run(), "media-microphone")

    async def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        logger.info("connection state: %s", state)
        if self._closing:
            return
        if state == "failed":
            await self._notify_closed("ice_failed")
        elif state == "closed":
            await self._notify_closed("closed")

    async def _notify_closed(self, reason: str) -> None:
        if self._notified or self._closing:
            return
        self._notified = True
        logger.info("media peer ends: %s", reason)
        try:
            result = self._on_closed(reason)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the owner's bug must not kill the media tasks silently
            logger.exception("on_closed callback failed")


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for error messages that reach a client."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
