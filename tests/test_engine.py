"""The session engine: one media clock, windows, idle, interrupts, motion, errors.

Every session runs on a VirtualClock (no real waiting) with a recording fake
generator that subclasses the real Generator interface: it keeps every call's
inputs and draws frames whose pixels encode the frame index, the motion and
speech flag it was given, and the call number.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from math import gcd
from typing import Any

import numpy as np
import pytest
from scipy.signal import resample_poly

from avatar.audio_in import AudioFormatError, AudioInput
from avatar.clock import VirtualClock
from avatar.frames import (
    AudioChunk,
    AvatarFrame,
    PlaybackFinished,
    PlaybackStarted,
    SessionError,
    SessionState,
    StateChanged,
)
from avatar.session import AvatarSession
from avatar.timeline import Timeline
from model.base import AudioWindow, Generator, MotionSettings, PreparedPortrait, frame_start_sample

RATE = 16000


@dataclass
class Call:
    number: int
    window: AudioWindow
    motion: MotionSettings
    state_in: Any
    state_out: Any


class RecordingGenerator(Generator):
    """Fake generator (isolates the engine): records calls; frame pixels encode
    (0,0) the frame index, (0,1) motion face/body x200 and the speech flag, (0,2)
    the call number. Raises on the call numbers in ``fail_calls``."""

    name = "recording"
    version = "1"
    fps = 25.0
    window_frames = 4
    lookahead_frames = 2
    context_frames = 3

    def __init__(self, fail_calls: set[int] | None = None, always_fail: bool = False) -> None:
        self.calls: list[Call] = []
        self._fail_calls = fail_calls or set()
        self._always_fail = always_fail

    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        return PreparedPortrait(arrays={"image": image})

    def generate(self, prepared, window, motion, state):
        number = len(self.calls)
        self.calls.append(Call(number, window, motion, state, ("state", number)))
        if self._always_fail or number in self._fail_calls:
            raise RuntimeError(f"fake failure on call {number}")
        frames = np.zeros((window.num_frames, 2, 4, 3), np.uint8)
        for k in range(window.num_frames):
            index = window.first_frame + k
            frames[k, 0, 0] = [index & 255, (index >> 8) & 255, (index >> 16) & 255]
            frames[k, 0, 1] = [round(motion.face * 200), round(motion.body * 200), 255 * bool(window.speech[k])]
            frames[k, 0, 2] = [number & 255, (number >> 8) & 255, 0]
        return frames, ("state", number)


class BlockingGenerator(RecordingGenerator):
    """RecordingGenerator whose call ``block_call`` waits (in the executor thread)
    until ``release`` is set; ``started`` is set when that call begins."""

    def __init__(self, block_call: int) -> None:
        super().__init__()
        self.block_call = block_call
        self.started = threading.Event()
        self.release = threading.Event()

    def generate(self, prepared, window, motion, state):
        if len(self.calls) == self.block_call:
            self.started.set()
            self.release.wait(timeout=30)
        return super().generate(prepared, window, motion, state)


def drawn_index(frame: AvatarFrame) -> int:
    b0, b1, b2 = frame.video.image[0, 0].astype(int)
    return int(b0 + 256 * b1 + 65536 * b2)


def drawn_motion(frame: AvatarFrame) -> tuple[float, float]:
    face, body, _ = frame.video.image[0, 1].astype(int)
    return face / 200, body / 200


def drawn_speech_flag(frame: AvatarFrame) -> bool:
    return bool(frame.video.image[0, 1, 2])


def drawn_call(frame: AvatarFrame) -> int:
    b0, b1, _ = frame.video.image[0, 2].astype(int)
    return int(b0 + 256 * b1)


def make_session(generator: Generator | None = None, **kwargs) -> AvatarSession:
    return AvatarSession(
        generator or RecordingGenerator(), PreparedPortrait(arrays={}), clock=VirtualClock(), **kwargs
    )


async def take(session: AvatarSession, count: int) -> list[AvatarFrame]:
    frames = []
    async for frame in session:
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


async def take_through_speech(
    session: AvatarSession, speech_seen: bool = False, idle_after: int = 3, limit: int = 2000
) -> list[AvatarFrame]:
    """Frames until speech was seen (here or, with ``speech_seen``, before) and then
    ``idle_after`` idle frames in a row; fails past ``limit`` frames."""
    frames, seen_speech, idle_run = [], speech_seen, 0
    async for frame in session:
        frames.append(frame)
        seen_speech |= frame.speaking
        idle_run = idle_run + 1 if seen_speech and not frame.speaking else 0
        if idle_run == idle_after:
            return frames
        assert len(frames) < limit, "the utterance never finished"
    return frames


async def push_in_chunks(session: AvatarSession, samples: np.ndarray, rate: int, seed: int, largest: int) -> None:
    rng = np.random.default_rng(seed)
    start = 0
    while start < samples.shape[0]:
        size = int(rng.integers(1, largest + 1))
        await session.push_audio(AudioChunk(samples[start:start + size], rate))
        start += size


async def finish(session: AvatarSession, events) -> list:
    """Close the session and return every event its ``events()`` iterator saw."""
    await session.aclose()
    return [event async for event in events]


def one_shot(samples: np.ndarray, rate: int) -> np.ndarray:
    """Reference conversion of a whole input at once, 16 kHz float32."""
    audio_in = AudioInput()
    return np.concatenate([audio_in.convert(AudioChunk(samples, rate)), audio_in.flush()])


def speech_input(engine_speech: np.ndarray, seconds: float, rate: int, dtype, channels: int) -> np.ndarray:
    """``seconds`` of the shared speech, tiled, at ``rate`` Hz in the given format."""
    audio = np.resize(engine_speech, round(seconds * RATE)).astype(np.float64) / 32768.0
    if rate != RATE:
        common = gcd(rate, RATE)
        audio = resample_poly(audio, rate // common, RATE // common)[: round(seconds * rate)]
    if channels == 2:
        audio = np.stack([audio, 0.5 * audio], axis=1)
    if dtype == np.int16:
        return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    return audio.astype(np.float32)


def assert_consecutive_pts(frames: list[AvatarFrame], fps: float, first: int = 0) -> None:
    for k, frame in enumerate(frames, start=first):
        start, stop = frame_start_sample(k, fps), frame_start_sample(k + 1, fps)
        assert frame.video.pts == frame.audio.pts == start
        assert frame.audio.samples.shape == (stop - start,)
        assert frame.audio.sample_rate == RATE
        assert drawn_index(frame) == k  # the image was generated for this very frame


def speaking_block(frames: list[AvatarFrame]) -> list[AvatarFrame]:
    """The speaking frames, checked to be one contiguous run."""
    positions = [k for k, f in enumerate(frames) if f.speaking]
    assert positions == list(range(positions[0], positions[-1] + 1))
    return [frames[k] for k in positions]


FORMATS = [
    (8000, np.int16, 1),
    (16000, np.int16, 1),
    (16000, np.float32, 1),
    (24000, np.float32, 2),
    (44100, np.int16, 2),
    (48000, np.float32, 1),
]


@pytest.mark.parametrize(("rate", "dtype", "channels"), FORMATS)
async def test_an_utterance_plays_whole_on_the_media_clock(engine_speech, rate, dtype, channels):
    samples = speech_input(engine_speech, 30.0, rate, dtype, channels)
    generator = RecordingGenerator()
    session = make_session(generator)
    events = session.events()
    await session.start()
    before = await take(session, 3)
    await push_in_chunks(session, samples, rate, seed=rate + channels, largest=rate // 5)
    session.end_of_speech()
    frames = before + await take_through_speech(session)
    log = await finish(session, events)

    assert_consecutive_pts(frames, 25.0)
    speech = speaking_block(frames)
    assert len(speech) == 750
    assert speech[0].video.pts == frame_start_sample(3, 25.0)  # the next frame not yet handed out
    played = np.concatenate([f.audio.samples for f in speech])
    assert np.array_equal(played, one_shot(samples, rate))
    if rate == RATE and channels == 1:
        raw = samples.astype(np.float32) / 32768.0 if dtype == np.int16 else samples
        assert np.array_equal(played, raw)
    assert all(not f.audio.samples.any() and not drawn_speech_flag(f) for f in frames if not f.speaking)
    assert np.mean([drawn_speech_flag(f) for f in speech]) > 0.6

    assert [e for e in log if isinstance(e, PlaybackStarted)] == [PlaybackStarted(speech[0].video.pts)]
    assert [e for e in log if isinstance(e, PlaybackFinished)] == [PlaybackFinished(30.0, False)]
    states = [e.state for e in log if isinstance(e, StateChanged)]
    assert states == [SessionState.LISTENING, SessionState.SPEAKING, SessionState.IDLE]
    stats = session.stats()
    assert stats["frames"] == len(frames)
    assert stats["audio_to_lip_latency_s"] is not None and stats["rtf"] > 0


async def test_clear_buffer_cuts_the_utterance_and_the_next_one_plays(engine_speech):
    generator = RecordingGenerator()
    session = make_session(generator)
    events = session.events()
    first_input = speech_input(engine_speech, 10.0, 48000, np.float32, 1)
    frames = await take(session, 2)
    await session.push_audio(AudioChunk(first_input, 48000))
    while sum(f.speaking for f in frames) < 50:
        frames += await take(session, 1)
    position, cut = await session.clear_buffer()
    after = await take(session, 10)

    assert cut is True
    assert position == pytest.approx(50 / 25.0)
    assert not any(f.speaking or f.audio.samples.any() for f in after)  # no speech frame after the call
    assert_consecutive_pts(frames + after, 25.0)
    # The generator resumed from the state of the window whose frame was shown last.
    resumed = generator.calls[drawn_call(after[0])]
    assert resumed.state_in == generator.calls[drawn_call(frames[-1])].state_out

    second_input = speech_input(engine_speech, 2.0, 48000, np.float32, 1)
    await session.push_audio(AudioChunk(second_input, 48000))
    session.end_of_speech()
    rest = await take_through_speech(session)
    log = await finish(session, events)

    assert_consecutive_pts(frames + after + rest, 25.0)
    second = speaking_block(rest)
    assert np.array_equal(np.concatenate([f.audio.samples for f in second]), one_shot(second_input, 48000))
    playback = [e for e in log if isinstance(e, (PlaybackStarted, PlaybackFinished))]
    assert playback == [
        PlaybackStarted(frame_start_sample(2, 25.0)),
        PlaybackFinished(position, True),
        PlaybackStarted(second[0].video.pts),
        PlaybackFinished(2.0, False),
    ]
    assert session.stats()["dropped_frames"] > 0


async def test_a_window_in_flight_at_clear_buffer_is_thrown_away(engine_speech):
    generator = BlockingGenerator(block_call=3)
    session = make_session(generator)
    await session.push_audio(AudioChunk(speech_input(engine_speech, 5.0, RATE, np.int16, 1), RATE))
    session.end_of_speech()
    frames = await take(session, 5)
    assert await asyncio.to_thread(generator.started.wait, 10)
    await session.clear_buffer()
    generator.release.set()
    after = await take(session, 12)
    await session.aclose()

    assert_consecutive_pts(frames + after, 25.0)
    assert not any(f.speaking for f in after)
    assert 3 not in {drawn_call(f) for f in after}
    assert generator.calls[drawn_call(after[0])].state_in == generator.calls[drawn_call(frames[-1])].state_out


async def test_clear_buffer_when_idle_reports_nothing_cut():
    session = make_session()
    events = session.events()
    await take(session, 5)
    assert await session.clear_buffer() == (0.0, False)
    assert not any(f.speaking for f in await take(session, 5))
    log = await finish(session, events)
    assert [e for e in log if isinstance(e, PlaybackFinished)] == [PlaybackFinished(0.0, False)]


async def test_set_motion_applies_from_the_next_window():
    generator = RecordingGenerator()
    session = make_session(generator, motion=MotionSettings(0.5, 0.5))
    frames = await take(session, 9)  # frame 8 opens a window
    session.set_motion(0.9, 0.1)
    frames += await take(session, 30)
    await session.aclose()

    motions = [drawn_motion(f) for f in frames]
    switch = motions.index((0.9, 0.1))
    assert switch >= 12  # frames 9..11 come from the window already generated
    assert switch % generator.window_frames == 0
    assert motions[:switch] == [(0.5, 0.5)] * switch
    assert motions[switch:] == [(0.9, 0.1)] * (len(frames) - switch)
    with pytest.raises(ValueError, match="face"):
        session.set_motion(1.5, 0.5)


async def test_silence_gives_idle_frames():
    generator = RecordingGenerator()
    session = make_session(generator)
    events = session.events()
    frames = await take(session, 30)
    log = await finish(session, events)

    assert_consecutive_pts(frames, 25.0)
    assert not any(f.speaking or f.audio.samples.any() for f in frames)
    assert generator.calls
    for call in generator.calls:
        assert not call.window.speech.any() and not call.window.audio.any()
    assert len({f.video.image.tobytes() for f in frames}) == len(frames)
    assert log == []


async def test_windows_chain_state_and_see_the_timeline_audio(engine_speech):
    generator = RecordingGenerator()
    session = make_session(generator)
    samples = speech_input(engine_speech, 3.0, RATE, np.int16, 1)
    await session.push_audio(AudioChunk(samples, RATE))
    session.end_of_speech()
    frames = await take(session, 100)
    await session.aclose()

    stream = np.concatenate([f.audio.samples for f in frames])
    window, context, lookahead = 4, generator.context_frames, generator.lookahead_frames
    assert generator.calls[0].state_in is None
    for previous, call in zip(generator.calls, generator.calls[1:]):
        assert call.state_in == previous.state_out
        assert call.window.first_frame == previous.window.first_frame + window
    checked = 0
    for call in generator.calls:
        first = call.window.first_frame
        if first + window + lookahead > len(frames):
            continue
        begin, end = frame_start_sample(first - context, 25.0), frame_start_sample(first + window + lookahead, 25.0)
        expected = np.concatenate([np.zeros(max(0, -begin), np.float32), stream[max(0, begin):end]])
        assert call.window.context_before == frame_start_sample(first, 25.0) - begin
        assert call.window.context_after == end - frame_start_sample(first + window, 25.0)
        assert np.array_equal(call.window.audio, expected)
        checked += 1
    assert checked >= 20


async def test_speech_arriving_during_idle_resumes_the_shown_window_state(engine_speech):
    generator = RecordingGenerator()
    session = make_session(generator)
    frames = await take(session, 6)  # idle; frames 6.. are queued or in flight
    await session.push_audio(AudioChunk(speech_input(engine_speech, 1.0, RATE, np.int16, 1), RATE))
    frames += await take(session, 2)
    await session.aclose()

    assert frames[6].speaking and not frames[5].speaking
    first_speech_call = generator.calls[drawn_call(frames[6])]
    assert first_speech_call.window.first_frame == 6
    assert first_speech_call.state_in == generator.calls[drawn_call(frames[5])].state_out


async def test_speech_replaces_an_idle_window_in_flight(engine_speech):
    generator = BlockingGenerator(block_call=0)
    session = make_session(generator)
    await session.start()
    assert await asyncio.to_thread(generator.started.wait, 10)  # idle frames 0..3 being generated
    await session.push_audio(AudioChunk(speech_input(engine_speech, 1.0, RATE, np.int16, 1), RATE))
    generator.release.set()
    frames = await take(session, 4)
    await session.aclose()

    assert all(f.speaking for f in frames)
    assert generator.calls[drawn_call(frames[0])].state_in is None


@pytest.mark.parametrize(
    "bad",
    [
        AudioChunk(np.zeros(400, np.int16), 4000),
        AudioChunk(np.zeros((400, 3), np.int16), RATE),
        AudioChunk(np.zeros(400, np.float64), RATE),
        AudioChunk(np.array([0.1, np.nan, 0.2], np.float32), RATE),
    ],
)
async def test_bad_audio_is_refused_and_the_session_goes_on(engine_speech, bad):
    session = make_session()
    events = session.events()
    await take(session, 2)
    with pytest.raises(AudioFormatError):
        await session.push_audio(bad)
    good = speech_input(engine_speech, 1.0, RATE, np.int16, 1)
    await session.push_audio(AudioChunk(good, RATE))
    session.end_of_speech()
    frames = await take_through_speech(session)
    log = await finish(session, events)

    errors = [e for e in log if isinstance(e, SessionError)]
    assert [e.code for e in errors] == ["bad_audio"]
    assert "\n" not in errors[0].message
    played = np.concatenate([f.audio.samples for f in speaking_block(frames)])
    assert np.array_equal(played, good / np.float32(32768.0))


async def test_a_generator_failure_is_reported_and_the_stream_goes_on(engine_speech):
    generator = RecordingGenerator(fail_calls={2})
    session = make_session(generator)
    events = session.events()
    samples = speech_input(engine_speech, 2.0, RATE, np.int16, 1)
    await session.push_audio(AudioChunk(samples, RATE))
    session.end_of_speech()
    frames = await take(session, 80)
    log = await finish(session, events)

    assert [e.code for e in log if isinstance(e, SessionError)] == ["generator_error"]
    assert_consecutive_pts(frames, 25.0)
    played = np.concatenate([f.audio.samples for f in speaking_block(frames)])
    assert np.array_equal(played, samples / np.float32(32768.0))  # no audio lost
    failed, retry = generator.calls[2], generator.calls[3]
    assert retry.window.first_frame == failed.window.first_frame
    assert retry.state_in == failed.state_in
    assert not retry.window.audio.any() and not retry.window.speech.any()  # retried as an idle window


async def test_a_generator_that_always_fails_ends_the_stream_with_an_error():
    session = make_session(RecordingGenerator(always_fail=True))
    events = session.events()
    with pytest.raises(RuntimeError, match="failed 3 times in a row"):
        await take(session, 1)
    log = await finish(session, events)
    assert [e.code for e in log if isinstance(e, SessionError)] == ["generator_error"] * 3 + ["generator_failed"]


async def test_an_utterance_that_runs_dry_keeps_the_stream_going(engine_speech):
    session = make_session()
    events = session.events()
    samples = speech_input(engine_speech, 1.0, RATE, np.int16, 1)
    await session.push_audio(AudioChunk(samples, RATE))
    frames = await take(session, 40)  # more frames than pushed audio: the utterance waits for more
    session.end_of_speech()
    frames += await take_through_speech(session, speech_seen=True)
    log = await finish(session, events)

    assert_consecutive_pts(frames, 25.0)
    speech = speaking_block(frames)
    assert len(speech) >= 40
    played = np.concatenate([f.audio.samples for f in speech])
    assert np.array_equal(played[:RATE], samples / np.float32(32768.0))
    assert not played[RATE:].any()
    assert [e for e in log if isinstance(e, PlaybackFinished)] == [PlaybackFinished(len(speech) / 25.0, False)]


async def test_23_fps_keeps_pts_and_slices_exact(engine_speech):
    fps = 23.0
    session = make_session(fps=fps)
    samples = speech_input(engine_speech, 20.0, RATE, np.int16, 1)
    frames = await take(session, 1)
    await push_in_chunks(session, samples, RATE, seed=23, largest=2000)
    session.end_of_speech()
    frames += await take_through_speech(session)
    await session.aclose()

    assert_consecutive_pts(frames, fps)
    speech = speaking_block(frames)
    first = frame_start_sample(1, fps)
    frames_needed = next(n for n in range(10_000) if frame_start_sample(1 + n, fps) - first >= samples.shape[0])
    assert len(speech) == frames_needed
    played = np.concatenate([f.audio.samples for f in speech])
    expected = np.zeros(played.shape[0], np.float32)
    expected[: samples.shape[0]] = samples / np.float32(32768.0)
    assert np.array_equal(played, expected)


async def test_frames_are_paced_by_the_clock():
    clock = VirtualClock(start=100.0)
    session = AvatarSession(RecordingGenerator(), PreparedPortrait(arrays={}), clock=clock)
    times = []
    async for frame in session:
        times.append(clock.now())
        if len(times) == 50:
            break
    await session.aclose()
    assert np.allclose(np.diff(times), 1 / 25.0)
    assert session.stats()["fps"] == pytest.approx(25.0)
    assert session.stats()["late_frames"] == 0


async def test_closing_ends_frames_and_events():
    session = make_session()
    events = session.events()
    await take(session, 3)
    await session.aclose()
    assert [f async for f in session] == []
    assert [e async for e in events] == []
    with pytest.raises(RuntimeError, match="closed"):
        await session.push_audio(AudioChunk(np.zeros(160, np.int16), RATE))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="fps"):
        make_session(fps=0)
    with pytest.raises(ValueError, match="max_lead_frames"):
        make_session(max_lead_frames=0)


def test_timeline_waits_for_lookahead_of_a_started_utterance():
    timeline = Timeline(25.0, history_frames=32, start_samples=640 * 6)
    timeline.open(0.0)
    timeline.append(np.full(640 * 3, 0.5, np.float32))
    plan = timeline.plan(0, 4, 2, 2, may_underrun=False)
    assert [f.utterance for f in plan.frames] == [None] * 4  # not ready yet: idle frames, no waiting

    timeline.append(np.full(640 * 3, 0.5, np.float32))  # 6 frames: ready
    plan = timeline.plan(0, 4, 2, 2, may_underrun=False)
    assert all(f.utterance is not None for f in plan.frames) and plan.audio[-1] == 0.5
    timeline.commit(plan)
    assert timeline.plan(4, 4, 2, 2, may_underrun=False) is None  # frames 6.. not pushed yet
    dry = timeline.plan(4, 4, 2, 2, may_underrun=True)
    assert dry.frames[1].audio[-1] == 0.5 and not dry.frames[2].audio.any()
    assert np.array_equal(dry.audio[: dry.context_before], np.full(640 * 2, 0.5, np.float32))

    timeline.end()
    ended = timeline.plan(4, 4, 2, 2, may_underrun=False)
    assert ended is not None and [f.utterance is not None for f in ended.frames] == [True, True, False, False]
    timeline.commit(ended)
    assert not timeline.has_utterances
