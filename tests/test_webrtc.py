"""WebRTC media (server/webrtc.py, media_tracks.py, microphone.py): one media clock for both tracks, pacing,
interrupt flushing, the microphone's turn detection, and real aiortc peers over
loopback (host candidates pinned to 127.0.0.1, no STUN).

Track-level tests run on a VirtualClock; loopback tests drive an AvatarSession
with a fake generator (subclassing the real Generator) whose frames show the
loudness of their own audio slice, so the receiver can see lips and voice.
"""
from __future__ import annotations

import asyncio
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from scipy.signal import resample_poly

from avatar.clock import VirtualClock
from avatar.frames import AudioChunk, AvatarFrame, SessionState, StateChanged, VideoFrame
from avatar.session import AvatarSession
from model.base import Generator, PreparedPortrait, frame_start_sample
from server.media_tracks import (
    PACKET_SAMPLES,
    AvatarAudioTrack,
    AvatarVideoTrack,
    MediaFeeder,
    MediaPacer,
    Packetizer,
    Upsampler3x,
    video_pts,
)
from server.microphone import MicrophoneInput, VadSettings
from server.video_encoder import AvatarVp8Encoder
from server.webrtc import MediaPeer, pin_ice_host_addresses

RATE = 16000
# Received int16 audio quieter than this is silence (Opus leaves a little noise).
SILENT_PEAK = 200
# Frame brightness of the fake generator above this shows speech.
LOUD_LEVEL = 40


class LevelGenerator(Generator):
    """Fake generator (isolates the media path): gray frames whose top band is as
    bright as the RMS of the frame's own audio slice (x 1000, capped at 255), a
    stand-in for a moving mouth. ``fail``: every call raises."""

    name = "level"
    version = "1"
    fps = 25.0
    window_frames = 2
    lookahead_frames = 1
    context_frames = 1

    def __init__(self, height: int = 96, width: int = 128, fail: bool = False) -> None:
        self.size = (height, width)
        self.fail = fail

    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        return PreparedPortrait(arrays={"image": image})

    def generate(self, prepared, window, motion, state):
        if self.fail:
            raise RuntimeError("fake generator failure")
        frames = np.full((window.num_frames, *self.size, 3), 90, np.uint8)
        for k in range(window.num_frames):
            rms = float(np.sqrt(np.mean(window.frame_audio(k) ** 2))) if window.frame_audio(k).size else 0.0
            frames[k, : self.size[0] // 4] = min(255, round(rms * 1000))
        return frames, None


def tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """A 220 Hz sine at 16 kHz, float32."""
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def synthetic_frame(index: int, fps: float, audio: np.ndarray | None = None) -> AvatarFrame:
    start, stop = frame_start_sample(index, fps), frame_start_sample(index + 1, fps)
    samples = np.zeros(stop - start, np.float32) if audio is None else audio[start:stop]
    image = np.full((4, 4, 3), index % 256, np.uint8)
    return AvatarFrame(VideoFrame(image, start), AudioChunk(samples, pts=start), speaking=audio is not None)


# -- one media clock -------------------------------------------------------------------


@pytest.mark.parametrize("fps", [25.0, 30.0, 23.976, 60.0])
def test_video_pts_of_an_hour_never_drift_from_the_frame_index(fps):
    frames = np.arange(round(3600 * fps) + 1)
    ticks = np.array([video_pts(frame_start_sample(int(n), fps)) for n in frames])
    ideal = frames * 90000 / fps
    # Rounding to 16 kHz (half a sample) plus flooring to 90 kHz (one tick), never accumulating.
    assert np.abs(ticks - ideal).max() <= 90000 * 0.5 / RATE + 1
    assert np.all(np.diff(ticks) > 0)


def test_packetizer_cuts_an_hour_of_frame_slices_into_contiguous_packets():
    fps = 30.0
    packetizer = Packetizer()
    expected_pts, total = 0, 0
    for n in range(round(3600 * fps)):
        size = 3 * (frame_start_sample(n + 1, fps) - frame_start_sample(n, fps))
        for pts, pcm in packetizer.add(np.zeros(size, np.float32), 3 * frame_start_sample(n, fps)):
            assert pts == expected_pts and pcm.shape == (PACKET_SAMPLES,) and pcm.dtype == np.int16
            expected_pts += PACKET_SAMPLES
        total += size
    assert total == 3 * 3600 * RATE
    assert expected_pts == total  # an hour is a whole number of 20 ms packets: nothing held back


def test_upsampler_is_exactly_3x_whatever_the_chunking_and_lags_by_its_stated_delay():
    rng = np.random.default_rng(1)
    t = np.arange(RATE) / RATE
    signal = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    whole = Upsampler3x().process(signal)
    chunked_upsampler, parts, start = Upsampler3x(), [], 0
    while start < len(signal):
        size = int(rng.integers(1, 700))
        parts.append(chunked_upsampler.process(signal[start:start + size]))
        assert len(parts[-1]) == 3 * len(signal[start:start + size])
        start += size
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)
    t48 = np.arange(len(whole)) / 48000
    ideal = 0.5 * np.sin(2 * np.pi * 1000 * (t48 - Upsampler3x.DELAY_S))
    steady = slice(4800, -4800)
    assert np.abs(whole[steady] - ideal[steady]).max() < 0.01


async def test_tracks_on_a_virtual_clock_send_every_sample_once_on_the_frame_schedule():
    fps, minutes = 30.0, 3
    clock = VirtualClock(start=50.0)
    pacer = MediaPacer(clock)
    video, audio = AvatarVideoTrack(pacer, fps), AvatarAudioTrack(pacer)
    feeder = MediaFeeder(pacer, video, audio)
    count = round(minutes * 60 * fps)
    speech = np.random.default_rng(2).uniform(-0.5, 0.5, frame_start_sample(count, fps)).astype(np.float32)
    sent_audio: list = []  # (release time, frame)
    for n in range(count):
        await clock.sleep_until(50.0 + n / fps)  # the session hands frame n out on time
        feeder.feed(synthetic_frame(n, fps, speech))
        frame = await video.recv()
        pts16 = frame_start_sample(n, fps)
        assert frame.pts == video_pts(pts16) and frame.time_base == Fraction(1, 90000)
        # Sent when due (pts rounds to a 16 kHz sample, so at most half a sample off the frame index): no drift.
        assert abs(clock.now() - (50.0 + n / fps)) <= 0.5 / RATE + 1e-9
        # One task drives both tracks, so the virtual clock cannot run ahead of either.
        complete_packets = 3 * frame_start_sample(n + 1, fps) // PACKET_SAMPLES
        while len(sent_audio) < complete_packets:
            packet = await audio.recv()
            sent_audio.append((clock.now(), packet))

    pts = np.array([f.pts for _, f in sent_audio])
    sizes = np.array([f.samples for _, f in sent_audio])
    assert pts[0] == 0 and np.all(pts[1:] == pts[:-1] + sizes[:-1])  # contiguous: no gap, no repeat
    for released, packet in sent_audio:
        # On time (the schedule follows arrivals, which round to half a 16 kHz sample), or as soon as its
        # last sample arrived with the next frame (a packet spans two frames): never drifting.
        assert -0.5 / RATE - 1e-9 <= released - (50.0 + packet.pts / 48000) <= PACKET_SAMPLES / 48000 + 1e-9
    received = np.concatenate([f.to_ndarray().reshape(-1) for _, f in sent_audio])
    expected = (np.clip(Upsampler3x().process(speech), -1, 1) * 32767).astype(np.int16)
    np.testing.assert_array_equal(received, expected[: len(received)])
    assert len(expected) - len(received) < PACKET_SAMPLES
    assert video.dropped == 0 and video.late == 0


async def test_flush_drops_queued_video_and_silences_queued_audio_keeping_the_clock():
    fps = 25.0  # one frame = 1920 samples at 48 kHz = 2 packets
    clock = VirtualClock()
    pacer = MediaPacer(clock)
    video, audio = AvatarVideoTrack(pacer, fps), AvatarAudioTrack(pacer)
    feeder = MediaFeeder(pacer, video, audio)
    loud = tone(1.0)
    feeder.feed(synthetic_frame(0, fps, loud))
    feeder.feed(synthetic_frame(1, fps, loud))
    first = await video.recv()
    packets = [await audio.recv() for _ in range(2)]  # frame 0's audio is out
    flushed = video.flush()  # frame 1 and its audio were still queued
    audio.flush()
    feeder.feed(synthetic_frame(2, fps, loud))
    packets += [await audio.recv() for _ in range(4)]
    second = await video.recv()

    assert flushed == 1
    assert [first.pts, second.pts] == [video_pts(0), video_pts(frame_start_sample(2, fps))]
    assert [p.pts for p in packets] == [PACKET_SAMPLES * k for k in range(6)]  # no gap in the audio clock
    peaks = [int(np.abs(p.to_ndarray()).max()) for p in packets]
    assert peaks[1] > 5000  # frame 0 played (its first packet holds the filter's onset)
    assert peaks[2:4] == [0, 0]  # frame 1: silenced in the queue
    assert min(peaks[4:6]) > 5000  # frame 2 plays on


async def test_audio_track_fills_a_pts_gap_with_silence():
    clock = VirtualClock()
    pacer = MediaPacer(clock)
    audio = AvatarAudioTrack(pacer)
    pacer.observe(0)
    loud = np.full(PACKET_SAMPLES, 1000, np.int16)
    audio.put(loud, 0)
    audio.put(loud, 3 * PACKET_SAMPLES)
    frames = [await audio.recv() for _ in range(4)]
    assert [f.pts for f in frames] == [0, 960, 1920, 2880]
    assert [int(f.to_ndarray().max()) for f in frames] == [1000, 0, 0, 1000]


async def test_video_track_drops_the_oldest_frame_when_its_sender_falls_behind():
    clock = VirtualClock()
    pacer = MediaPacer(clock)
    video = AvatarVideoTrack(pacer, 25.0)
    for n in range(3):
        pacer.observe(frame_start_sample(n, 25.0))
        video.put(np.zeros((4, 4, 3), np.uint8), frame_start_sample(n, 25.0))
    frame = await video.recv()
    assert video.dropped == 1
    assert frame.pts == video_pts(frame_start_sample(1, 25.0))


async def test_pacer_follows_the_source_schedule():
    clock = VirtualClock()
    pacer = MediaPacer(clock)
    pacer.observe(0)
    await clock.sleep_until(1.1)  # the item for 1.0 s arrives 0.1 s late: a hiccup, keep the schedule
    pacer.observe(RATE)
    assert pacer.due(RATE, RATE) == pytest.approx(1.0)
    await clock.sleep_until(3.0)  # the item for 2.0 s arrives 1 s late: the source re-paced
    pacer.observe(2 * RATE)
    assert pacer.due(2 * RATE, RATE) == pytest.approx(3.0)
    assert pacer.due(3 * 2 * RATE, 48000) == pytest.approx(3.0)  # the same origin for 48 kHz audio
    await clock.sleep_until(3.5)  # the item for 4.0 s (old schedule) arrives early: the schedule moves to it
    pacer.observe(3 * RATE)
    assert pacer.due(3 * RATE, RATE) == pytest.approx(3.5)


async def test_video_keeps_flowing_when_the_first_frames_come_in_a_burst():
    """The session hands out frames late by up to 0.25 s at once before it is back
    on schedule: the tracks must not keep that first frame's lateness as their
    schedule (frames would wait, overflow and be dropped before their turn)."""
    fps = 25.0
    clock = VirtualClock()
    pacer = MediaPacer(clock)
    video = AvatarVideoTrack(pacer, fps)
    feeder = MediaFeeder(pacer, video, None)
    await clock.sleep_until(0.2)  # frames 0..5 were due at 0.0 .. 0.2: all arrive now
    for n in range(6):
        feeder.feed(synthetic_frame(n, fps))
    burst = [await video.recv() for _ in range(2)]  # what the 2-frame queue kept
    sent = []
    for n in range(6, 60):  # then on schedule
        await clock.sleep_until(n / fps)
        feeder.feed(synthetic_frame(n, fps))
        sent.append(await video.recv())
        assert clock.now() == pytest.approx(n / fps)  # sent on arrival: nothing waits for a stale schedule
    assert [round(f.pts / 3600) for f in burst] == [4, 5] and video.dropped == 4
    assert [round(f.pts / 3600) for f in sent] == list(range(6, 60))


def test_pinning_rejects_anything_but_ip_literals():
    with pytest.raises(ValueError, match="IPv4 or IPv6 literal"):
        pin_ice_host_addresses(["localhost"])


# -- microphone --------------------------------------------------------------------------


class SamplesTrack(MediaStreamTrack):
    """Fake microphone track (isolates MicrophoneInput): 20 ms frames of 48 kHz
    stereo s16, as aiortc's Opus decoder gives them, then MediaStreamError."""

    kind = "audio"

    def __init__(self, samples16k: np.ndarray) -> None:
        super().__init__()
        upsampled = resample_poly(samples16k.astype(np.float64), 3, 1)
        pcm = np.clip(upsampled, -32768, 32767).astype(np.int16)
        self._frames = [pcm[k:k + PACKET_SAMPLES] for k in range(0, len(pcm) - PACKET_SAMPLES + 1, PACKET_SAMPLES)]
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if not self._frames:
            raise MediaStreamError
        mono = self._frames.pop(0)
        frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self._pts, Fraction(1, 48000)
        self._pts += PACKET_SAMPLES
        return frame


class RecordingAvatar(AvatarSession):
    """An AvatarSession that records what the microphone pushes (isolates MicrophoneInput)."""

    def __init__(self) -> None:
        generator = LevelGenerator()
        super().__init__(generator, generator.prepare(np.zeros((4, 4, 3), np.uint8)), clock=VirtualClock())
        self.calls: list[tuple[str, int]] = []  # ("push", samples) / ("end", 0)

    async def push_audio(self, chunk: AudioChunk) -> None:
        assert chunk.sample_rate == RATE and chunk.samples.dtype == np.int16
        self.calls.append(("push", len(chunk.samples)))

    def end_of_speech(self) -> None:
        self.calls.append(("end", 0))


async def test_microphone_pushes_one_utterance_with_preroll_and_ends_it_after_silence(media_speech):
    onset, last_voice = 0.21, 2.99  # speech starts at 0.21 s (phone alignment) and runs to the end
    silence = np.zeros(RATE, np.int16)
    avatar = RecordingAvatar()
    settings = VadSettings()
    microphone = MicrophoneInput(SamplesTrack(np.concatenate([media_speech, silence])), avatar, settings)
    await microphone.run()

    kinds = [kind for kind, _ in avatar.calls]
    assert kinds.count("end") == 1 and kinds[-1] == "end" and kinds[0] == "push"
    pushed_s = sum(n for kind, n in avatar.calls if kind == "push") / RATE
    started = onset - settings.preroll_ms / 1000  # at the earliest, pre-roll before the onset
    ended = last_voice + settings.hangover_ms / 1000
    assert ended - started - 0.15 <= pushed_s <= ended - started + 0.15
    assert microphone.utterances == 1


async def test_microphone_ignores_silence_and_splits_utterances_at_long_pauses(media_speech):
    avatar = RecordingAvatar()
    await MicrophoneInput(SamplesTrack(np.zeros(2 * RATE, np.int16)), avatar).run()
    assert avatar.calls == []

    avatar = RecordingAvatar()
    pause = np.zeros(RATE, np.int16)
    microphone = MicrophoneInput(SamplesTrack(np.concatenate([media_speech, pause, media_speech, pause])), avatar)
    await microphone.run()
    assert [kind for kind, _ in avatar.calls].count("end") == 2
    assert microphone.utterances == 2


# -- real peers over loopback --------------------------------------------------------------


class Receiver:
    """The client side in tests: an aiortc peer receiving video and audio
    (recvonly) and optionally sending a microphone track. Records every
    received frame with its arrival time (loop seconds)."""

    def __init__(self, microphone: MediaStreamTrack | None = None, audio: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        if microphone is not None:
            self.pc.addTransceiver(microphone, direction="sendrecv")
        elif audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.video: list[tuple[float, int, np.ndarray]] = []  # (arrival, pts 90 kHz, RGB image)
        self.audio: list[tuple[float, int, int]] = []  # (arrival, pts 48 kHz, peak int16)
        self.changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = loop.time()
            if track.kind == "video":
                self.video.append((now, frame.pts, frame.to_ndarray(format="rgb24")))
            else:
                self.audio.append((now, frame.pts, int(np.abs(frame.to_ndarray()).max())))
            async with self.changed:
                self.changed.notify_all()

    async def connect(self, peer: MediaPeer) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await peer.answer(self.pc.localDescription.sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def wait_until(self, predicate, timeout: float = 5.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()


def level(image: np.ndarray) -> float:
    """Brightness of the fake generator's band (its stand-in for an open mouth)."""
    return float(image[: image.shape[0] // 8].mean())


class ClosedCalls:
    """An on_closed callback that records its reasons and sets ``called``."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.called = asyncio.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.called.set()


@pytest.fixture
async def media_live(media_loopback_ice):
    """A started AvatarSession (LevelGenerator, real clock) and its MediaPeer;
    yields (avatar, peer, ClosedCalls); closes both."""
    generator = LevelGenerator()
    avatar = AvatarSession(generator, generator.prepare(np.zeros((4, 4, 3), np.uint8)))
    await avatar.start()
    closed = ClosedCalls()
    peer = MediaPeer(avatar, on_closed=closed, fps=avatar.fps)
    yield avatar, peer, closed
    await peer.close()
    await avatar.aclose()


async def test_loopback_peer_streams_paced_video_and_audio_in_step(media_live):
    avatar, peer, _ = media_live
    receiver = Receiver()
    await receiver.connect(peer)
    await receiver.wait_until(lambda: len(receiver.video) >= 10 and len(receiver.audio) >= 20)
    assert peer.connected
    assert receiver.video[0][2].shape == (96, 128, 3)
    await avatar.push_audio(AudioChunk(tone(1.0), RATE))
    avatar.end_of_speech()
    loud_video = lambda: any(level(image) > LOUD_LEVEL for _, _, image in receiver.video)  # noqa: E731
    loud_audio = lambda: any(peak > 5000 for _, _, peak in receiver.audio)  # noqa: E731
    await receiver.wait_until(lambda: loud_video() and loud_audio() and len(receiver.video) >= 40)

    video_steps = np.diff([pts for _, pts, _ in receiver.video])
    assert np.all(video_steps % 3600 == 0) and np.median(video_steps) == 3600  # 25 fps in 90 kHz, skips only whole frames
    assert np.all(np.diff([pts for _, pts, _ in receiver.audio]) == PACKET_SAMPLES)
    arrivals = [t for t, _, _ in receiver.video]
    assert (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) == pytest.approx(25.0, rel=0.15)
    # One clock: the voice and the "mouth" start at the same media time (both tracks start on one frame).
    voice_at = next(pts for _, pts, peak in receiver.audio if peak > 5000) / 48000
    mouth_at = next(pts for _, pts, image in receiver.video if level(image) > LOUD_LEVEL) / 90000
    assert abs(voice_at - mouth_at) <= 1 / 25 + 0.02 + 0.01
    stats = peer.stats()
    assert stats["video_frames_sent"] >= 40 and stats["audio_packets_sent"] >= 80
    (video_sender,) = [s for s in peer._pc.getSenders() if s.track is not None and s.track.kind == "video"]
    assert isinstance(video_sender._RTCRtpSender__encoder, AvatarVp8Encoder)  # the tuned encoder sent them
    await receiver.close()


async def test_interrupt_silences_the_receiver_within_100ms(media_live):
    avatar, peer, _ = media_live
    receiver = Receiver()
    await receiver.connect(peer)
    await avatar.push_audio(AudioChunk(tone(4.0), RATE))
    avatar.end_of_speech()
    await receiver.wait_until(lambda: sum(peak > 5000 for _, _, peak in receiver.audio) >= 10)

    interrupted_at = asyncio.get_running_loop().time()
    sent_before = peer.stats()["audio_packets_sent"]
    position, cut = await avatar.clear_buffer()
    peer.flush()
    await receiver.wait_until(lambda: receiver.audio[-1][0] > interrupted_at + 0.4)

    assert cut and 0 < position < 4.0
    # Audio: how much loud audio left the server after the interrupt, in media time. (aiortc's
    # receiver holds 4 packets, 80 ms, in its jitter buffer before decoding: not the server's delay.)
    last_loud = max(pts for _, pts, peak in receiver.audio if peak > SILENT_PEAK) // PACKET_SAMPLES
    assert (last_loud + 1 - sent_before) * PACKET_SAMPLES / 48000 <= 0.1
    assert all(peak <= SILENT_PEAK for _, pts, peak in receiver.audio if pts > last_loud * PACKET_SAMPLES)
    # Video: frames arriving 100 ms after the interrupt show the idle face.
    frames_after = [image for t, _, image in receiver.video if t > interrupted_at + 0.1]
    assert frames_after and all(level(image) < LOUD_LEVEL for image in frames_after)
    assert peer.stats()["flushes"] == 1
    await receiver.close()


async def test_microphone_track_makes_the_avatar_speak(media_live):
    from aiortc.contrib.media import MediaPlayer

    avatar, peer, _ = media_live
    events = avatar.events()
    player = MediaPlayer("/work/shared/data/speech/librivox_0880.wav")
    receiver = Receiver(microphone=player.audio)
    await receiver.connect(peer)

    async def speaking() -> None:
        async for event in events:
            if isinstance(event, StateChanged) and event.state is SessionState.SPEAKING:
                return

    await asyncio.wait_for(speaking(), timeout=5.0)
    await receiver.wait_until(lambda: any(level(image) > LOUD_LEVEL for _, _, image in receiver.video))
    assert peer.stats()["microphone_utterances"] >= 1
    player.audio.stop()
    await receiver.close()


async def test_remote_close_calls_on_closed_once_and_local_close_never(media_live):
    avatar, peer, closed = media_live
    receiver = Receiver()
    await receiver.connect(peer)
    await receiver.wait_until(lambda: len(receiver.video) >= 2)
    await receiver.close()
    await asyncio.wait_for(closed.called.wait(), timeout=5.0)
    await peer.close()
    assert closed.reasons == ["closed"]
    assert not peer.connected

    again = ClosedCalls()
    other = MediaPeer(avatar, on_closed=again, fps=avatar.fps)
    receiver = Receiver()
    await receiver.connect(other)
    await receiver.wait_until(lambda: len(receiver.video) >= 2)  # the session's frames go to the new peer
    await other.close()
    await receiver.close()
    assert again.reasons == []


async def test_a_peer_that_never_connects_ends_as_ice_failed(media_live):
    avatar, _, _ = media_live
    closed = ClosedCalls()
    peer = MediaPeer(avatar, on_closed=closed, fps=avatar.fps, connect_timeout_s=0.5)
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client.addTransceiver("video", direction="recvonly")
    await client.setLocalDescription(await client.createOffer())
    await client.close()  # its candidates now point at a closed socket: no check can succeed
    try:
        await peer.answer(client.localDescription.sdp)
        await asyncio.wait_for(closed.called.wait(), timeout=10.0)
        assert closed.reasons == ["ice_failed"] and not peer.connected
    finally:
        await peer.close()


async def test_generator_failure_ends_the_media_with_on_closed(media_loopback_ice):
    generator = LevelGenerator(fail=True)
    avatar = AvatarSession(generator, generator.prepare(np.zeros((4, 4, 3), np.uint8)))
    await avatar.start()
    closed = ClosedCalls()
    peer = MediaPeer(avatar, on_closed=closed, fps=25.0)
    receiver = Receiver()
    await receiver.connect(peer)
    await asyncio.wait_for(closed.called.wait(), timeout=5.0)
    assert closed.reasons == ["media_error"]
    await peer.close()
    await avatar.aclose()
    await receiver.close()


@pytest.mark.parametrize(
    ("sdp", "reason"),
    [
        ("", "malformed SDP offer"),
        ("hello", "malformed SDP offer"),
        ("v=0\r\nm=video garbage\r\n", "malformed SDP offer"),
    ],
)
async def test_answer_rejects_malformed_sdp_with_one_line(media_live, sdp, reason):
    _, peer, _ = media_live
    with pytest.raises(ValueError, match=reason) as caught:
        await peer.answer(sdp)
    assert "\n" not in str(caught.value)


async def test_answer_requires_a_video_m_line_to_receive_on(media_live):
    _, peer, _ = media_live
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client.addTransceiver("audio", direction="recvonly")
    await client.setLocalDescription(await client.createOffer())
    with pytest.raises(ValueError, match="no video m-line"):
        await peer.answer(client.localDescription.sdp)
    await client.close()
