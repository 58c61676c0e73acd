"""AvatarSession: pushed speech in, an endless paced stream of paired video/audio frames out.

Design (after livekit agents' avatar runner, pipecat interruptions and aiortc
pacing):

* One media clock. Frame n has pts ``frame_start_sample(n, fps)`` (TIME_BASE =
  1/16000 s) and carries exactly the 16 kHz samples [start(n), start(n+1)) that
  play during it, so audio and video cannot drift: both derive from the integer
  frame index.
* A producer task plans windows of ``generator.window_frames`` frames on the
  timeline (``avatar.timeline``) and runs ``generator.generate`` in an executor,
  at most ``max_lead_frames`` ahead of playback. Each call gets the state the
  previous accepted call returned.
* The frame iterator hands frame n out at ``origin + n / fps`` on the session's
  clock (``VirtualClock``: at once).
* One truncation path: new speech that is ready to play drops queued idle frames;
  ``clear_buffer`` drops every queued frame and all queued audio. Both discard the
  result of the generation in flight (an epoch counter; a running call cannot be
  stopped) and resume the generator from the state returned by the window of the
  last frame kept. When that window had frames after it that were dropped, the
  generator continues from a state a few frames ahead of the last frame shown:
  a jump of at most ``window_frames - 1`` frames of motion.
* Speech start: an utterance is placed once one window plus lookahead of its
  audio is queued (or it ended), a small jitter buffer so a streamed utterance
  does not run dry at once; idle frames play until then.
* Underrun: when a playing utterance's audio runs out before it ends, the
  producer waits for more until the frames are nearly due, then fills the gap
  with silent speaking frames; later audio follows the gap (never a freeze).
* Pacing: a frame more than 0.25 s late moves the pacing origin (no burst of
  catch-up frames); pts stay consecutive.
* Failures: a generator exception becomes a SessionError event and the same
  frames are retried as an idle window (their speech audio still plays); after
  MAX_CONSECUTIVE_FAILURES failures in a row the frame iterator raises.
* Generators must treat the state they are given as read-only (return a new
  object): a state may be passed again after a truncation.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from avatar.audio_in import AudioFormatError, AudioInput, VoiceActivity, validate_chunk
from avatar.clock import Clock, SystemClock
from avatar.frames import (
    AUDIO_SAMPLE_RATE,
    AudioChunk,
    AvatarFrame,
    PlaybackFinished,
    PlaybackStarted,
    SessionError,
    SessionState,
    StateChanged,
    VideoFrame,
)
from avatar.session_stats import SessionStats
from avatar.signals import Broadcast, ChangeSignal
from avatar.timeline import Timeline, Utterance, WindowPlan
from model.base import AudioWindow, Generator, MotionSettings, PreparedPortrait, frame_start_sample

logger = logging.getLogger(__name__)

#: push_audio waits while more than this much pushed audio (seconds) is not yet framed.
MAX_QUEUED_AUDIO_S = 60.0
#: Consecutive generator failures after which the frame stream stops with an error.
MAX_CONSECUTIVE_FAILURES = 3
# A frame this late (s) moves the pacing origin instead of bursting frames to catch up.
_RESYNC_AFTER_S = 0.25

Event = StateChanged | PlaybackStarted | PlaybackFinished | SessionError


@dataclass(eq=False)
class _QueuedFrame:
    """A generated frame waiting to be handed out; ``window_state`` is the generator
    state returned by the call that made it."""

    index: int
    image: np.ndarray
    audio: np.ndarray
    utterance: Utterance | None
    window_state: Any


class _FrameIterator:
    """Async iterator over a session's frames (see ``AvatarSession.__aiter__``)."""

    def __init__(self, session: AvatarSession) -> None:
        self._session = session

    def __aiter__(self) -> _FrameIterator:
        return self

    async def __anext__(self) -> AvatarFrame:
        return await self._session._next_frame()


class AvatarSession:
    """A live talking-avatar session around one generator and one prepared portrait.

    Parameters: ``generator`` and ``prepared`` (from ``generator.prepare``);
    ``fps`` frames per second in (0, 100] (default ``generator.fps``); ``motion``
    initial motion settings; ``clock`` paces the stream (default ``SystemClock``;
    ``VirtualClock`` for tests and offline rendering); ``executor`` runs
    ``generator.generate`` (default: a single-thread pool owned and shut down by
    the session); ``max_lead_frames`` (>= 1) how many frames generation may run
    ahead of playback (never less than one window). Raises ValueError for a bad
    ``fps`` or ``max_lead_frames``.

    Use inside a running event loop::

        async with AvatarSession(gen, prepared, clock=VirtualClock()) as session:
            await session.push_audio(AudioChunk(samples, 24000))
            session.end_of_speech()
            async for frame in session:   # AvatarFrame, paced, endless
                ...

    Frames: ``AvatarFrame`` with an RGB uint8 (H, W, 3) image and float32 16 kHz
    mono audio, both with pts ``frame_start_sample(n, fps)`` for frame n = 0, 1, ...
    ``speaking`` is True for frames of an utterance and False for idle frames
    (silent audio). Only one task may read frames at a time.
    """

    def __init__(
        self,
        generator: Generator,
        prepared: PreparedPortrait,
        *,
        fps: float | None = None,
        motion: MotionSettings = MotionSettings(),
        clock: Clock | None = None,
        executor: concurrent.futures.Executor | None = None,
        max_lead_frames: int = 12,
    ) -> None:
        fps = float(generator.fps if fps is None else fps)
        if not 0.0 < fps <= 100.0:
            raise ValueError(f"fps must be in (0, 100], got {fps}")
        if max_lead_frames < 1:
            raise ValueError(f"max_lead_frames must be at least 1, got {max_lead_frames}")
        self.fps = fps
        self._generator = generator
        self._prepared = prepared
        self._motion = motion
        self._clock = clock or SystemClock()
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="avatar-generate")
        window = generator.window_frames
        self._window = window
        self._lead = max(max_lead_frames, window)
        start_frames = window + generator.lookahead_frames
        self._timeline = Timeline(
            fps,
            history_frames=generator.context_frames + self._lead + window,
            start_samples=frame_start_sample(start_frames, fps),
        )
        self._audio_in = AudioInput()
        self._vad = VoiceActivity()
        self._changed = ChangeSignal()
        self._events: Broadcast[Event] = Broadcast()
        self._state = SessionState.IDLE

        # Media clock: frames before _next_emit were handed out, frames up to
        # _gen_cursor - 1 are queued, _gen_state continues from _gen_cursor.
        self._queue: deque[_QueuedFrame] = deque()
        self._next_emit = 0
        self._gen_cursor = 0
        self._gen_state: Any = None
        self._last_emitted_state: Any = None
        self._epoch = 0  # bumped by every truncation: in-flight results of older epochs are dropped
        self._inflight: WindowPlan | None = None
        self._failures = 0
        self._fatal: str | None = None
        self._playing: Utterance | None = None
        self._played_frames = 0

        self._producer: asyncio.Task | None = None
        self._closed = False
        self._reading = False
        self._holding: _QueuedFrame | None = None  # the frame the reader is waiting to hand out
        self._pace_origin: float | None = None
        self._stats = SessionStats(fps, initial_window_seconds=window / fps)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start generating (idle frames until speech comes). Idempotent.
        Raises RuntimeError after ``aclose``."""
        self._check_open()
        if self._producer is None:
            self._stats.started_at = self._clock.now()
            self._producer = asyncio.create_task(self._produce(), name="avatar-session-producer")

    async def __aenter__(self) -> AvatarSession:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: the frame iterator and every ``events()`` iterator end; an
        executor the session created is shut down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._changed.notify()
        if self._producer is not None:
            self._producer.cancel()
            try:
                await self._producer
            except asyncio.CancelledError:
                pass
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._events.close()
        logger.debug("session closed after %d frames", self._stats.frames_out)

    # -- input ----------------------------------------------------------------

    async def push_audio(self, chunk: AudioChunk) -> None:
        """Queue speech: ``chunk.samples`` int16 or float32, shape (n,) or (n, 1|2),
        ``chunk.sample_rate`` in [8000, 48000] Hz; converted to 16 kHz mono.

        The first chunk after idle (or after ``end_of_speech``) opens a new
        utterance. Once one window plus lookahead of its audio is queued (or at
        ``end_of_speech``) it is placed at the next frame not yet handed out (the
        one after, when the reader is already waiting to hand that one out),
        dropping the idle frames generated from there; idle frames play until then.
        Awaits only while more than MAX_QUEUED_AUDIO_S of audio is queued.
        Raises AudioFormatError for bad audio (also sent as a SessionError event
        with code ``bad_audio``; the session goes on) and RuntimeError after
        ``aclose``.
        """
        self._check_open()
        try:
            validate_chunk(chunk)
        except AudioFormatError as exc:
            logger.warning("rejected pushed audio: %s", exc)
            self._emit(SessionError("bad_audio", str(exc)))
            raise
        if chunk.samples.shape[0] == 0:
            return
        limit = MAX_QUEUED_AUDIO_S * AUDIO_SAMPLE_RATE
        await self._changed.wait_for(lambda: self._closed or self._timeline.pending_samples() < limit)
        self._check_open()
        if self._timeline.open_utterance is None:
            self._timeline.open(self._clock.now())
            if self._state is SessionState.IDLE:
                self._set_state(SessionState.LISTENING)
        utterance = self._timeline.open_utterance
        was_ready = utterance.ready
        self._timeline.append(self._audio_in.convert(chunk))
        if utterance.ready and not was_ready:
            self._place_speech()
        self._changed.notify()

    def end_of_speech(self) -> None:
        """The current utterance is complete: play out what is queued, then go
        idle. Does nothing when no utterance is open. RuntimeError after ``aclose``."""
        self._check_open()
        utterance = self._timeline.open_utterance
        if utterance is None:
            logger.debug("end_of_speech with no open utterance: ignored")
            return
        was_ready = utterance.ready
        self._timeline.append(self._audio_in.flush())
        completed = self._timeline.end()
        if completed is None:
            if not was_ready:
                self._place_speech()
        elif completed.last_frame is None:
            logger.debug("utterance %d ended without audio: nothing to play", completed.uid)
            if self._playing is None and not self._speech_ahead():
                self._set_state(SessionState.IDLE)
        else:
            # All its audio is framed already; frames planned after it in flight
            # (silence while it waited for audio) must become idle frames.
            if self._inflight is not None and any(f.utterance is completed for f in self._inflight.frames):
                self._epoch += 1
            if self._playing is completed and self._next_emit > completed.last_frame:
                self._finish_playback(interrupted=False)
        self._changed.notify()

    async def clear_buffer(self) -> tuple[float, bool]:
        """Interrupt: drop all queued audio, every generated frame not yet handed
        out and any generation in flight; the next frame is idle.

        Returns (seconds of the playing utterance handed out so far, whether an
        utterance was cut). Always emits PlaybackFinished(position, interrupted=cut)
        and goes idle. RuntimeError after ``aclose``.
        """
        self._check_open()
        cut = self._playing is not None or self._speech_ahead()
        self._timeline.clear()
        self._audio_in.reset()
        self._truncate(self._next_emit)
        position = self._finish_playback(interrupted=cut)
        self._set_state(SessionState.IDLE)
        logger.info("interrupted at %.3f s (cut=%s)", position, cut)
        return position, cut

    def set_motion(self, face: float, body: float) -> None:
        """Motion intensities in [0, 1] (see MotionSettings) for every window
        generated from now on; frames already generated keep theirs. ValueError
        outside [0, 1]."""
        self._motion = MotionSettings(face=face, body=body)

    # -- output ---------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[AvatarFrame]:
        """Endless stream of ``AvatarFrame``: frame n at clock time origin + n / fps
        (origin: when frame 0 was ready), until ``aclose()``. Starts the session
        if needed. Raises RuntimeError when a second task reads concurrently, or
        when the generator failed MAX_CONSECUTIVE_FAILURES times in a row."""
        return _FrameIterator(self)

    def events(self) -> AsyncIterator[Event]:
        """Events from now on, in order: StateChanged (idle / listening /
        speaking), PlaybackStarted(pts) when an utterance's first frame is handed
        out, PlaybackFinished(position s, interrupted) when its last frame is
        handed out and after every ``clear_buffer``, SessionError (``bad_audio``,
        ``generator_error``, ``generator_failed``, ``internal_error``). Ends at
        ``aclose``. Each call gets its own iterator of all later events."""
        return self._events.subscribe()

    def stats(self) -> dict:
        """Measurements so far (None where not yet known):

        ``fps`` frames handed out per clock second (the configured fps until two
        frames are out); ``frames`` handed out; ``time_to_first_frame_s`` from
        ``start`` to the first frame; ``audio_to_lip_latency_s`` from the first
        push of the latest started utterance to its first frame; ``rtf``
        generation wall time / media time generated (< 1: faster than real time);
        ``queued_ms`` speech pushed or generated but not yet handed out;
        ``dropped_frames`` generated frames discarded by truncations;
        ``late_frames`` frames handed out more than one frame period late.
        """
        queued = self._timeline.pending_samples() + sum(f.audio.shape[0] for f in self._queue if f.utterance)
        return self._stats.as_dict(queued)

    # -- frame hand-out ---------------------------------------------------------

    async def _next_frame(self) -> AvatarFrame:
        if self._producer is None:
            await self.start()
        if self._reading:
            raise RuntimeError("another task is already reading this session's frames")
        self._reading = True
        try:
            while True:
                await self._changed.wait_for(lambda: self._closed or bool(self._queue) or self._fatal is not None)
                if self._closed:
                    raise StopAsyncIteration
                if not self._queue:
                    raise RuntimeError(self._fatal)
                frame = self._queue[0]
                if self._pace_origin is None:
                    self._pace_origin = self._clock.now() - frame.index / self.fps
                deadline = self._pace_origin + frame.index / self.fps
                self._holding = frame
                try:
                    await self._clock.sleep_until(deadline)
                finally:
                    self._holding = None
                if self._closed:
                    raise StopAsyncIteration
                if self._queue and self._queue[0] is frame:
                    return self._hand_out(frame, deadline)
                # Dropped while we waited (speech placed or an interrupt): take its replacement.
        finally:
            self._reading = False

    def _hand_out(self, frame: _QueuedFrame, deadline: float) -> AvatarFrame:
        now = self._clock.now()
        lateness = now - deadline
        if lateness > 1.0 / self.fps:
            self._stats.late_frames += 1
            if lateness > _RESYNC_AFTER_S:
                logger.warning("frame %d is %.3f s late: pacing restarts from it", frame.index, lateness)
                self._pace_origin += lateness
        self._queue.popleft()
        self._next_emit = frame.index + 1
        self._last_emitted_state = frame.window_state
        pts = frame_start_sample(frame.index, self.fps)
        utterance = frame.utterance
        if utterance is not None:
            if utterance is not self._playing:
                self._playing = utterance
                self._played_frames = 0
                self._stats.lip_latency = now - utterance.opened_at
                self._set_state(SessionState.SPEAKING)
                self._emit(PlaybackStarted(pts))
                logger.info("utterance %d starts at frame %d", utterance.uid, frame.index)
            self._played_frames += 1
            if utterance.last_frame == frame.index:
                self._finish_playback(interrupted=False)
        self._stats.frame_out(now)
        self._changed.notify()
        return AvatarFrame(
            video=VideoFrame(image=frame.image, pts=pts),
            audio=AudioChunk(samples=frame.audio, sample_rate=AUDIO_SAMPLE_RATE, pts=pts),
            speaking=utterance is not None,
        )

    def _finish_playback(self, interrupted: bool) -> float:
        """Emit PlaybackFinished for the playing utterance (position 0 when none)
        and return its position, seconds."""
        position = self._played_frames / self.fps
        self._playing = None
        self._played_frames = 0
        self._emit(PlaybackFinished(position=position, interrupted=interrupted))
        if not interrupted:
            # A queued utterance plays from the very next frame: still speaking.
            self._set_state(SessionState.SPEAKING if self._speech_ahead() else SessionState.IDLE)
        return position

    # -- truncation (new speech, interrupts) ---------------------------------------

    def _place_speech(self) -> None:
        """A ready utterance starts at the first idle frame not yet handed out,
        sparing the one the reader is already waiting on (that gives the generator
        one more frame period to make the first speech window in time)."""
        first_idle = next(
            (f.index for f in self._queue if f.utterance is None and f is not self._holding), None
        )
        if first_idle is not None:
            self._truncate(first_idle)
        elif self._inflight is not None and any(f.utterance is None for f in self._inflight.frames):
            self._epoch += 1

    def _truncate(self, frame: int) -> None:
        """Drop queued frames ``frame`` and later (``frame`` >= next frame to hand
        out) and the generation in flight; generation resumes at ``frame`` from the
        state of the window of frame ``frame - 1``."""
        kept = deque(f for f in self._queue if f.index < frame)
        self._stats.dropped_frames += len(self._queue) - len(kept)
        logger.debug("truncating at frame %d: %d frames dropped", frame, len(self._queue) - len(kept))
        self._queue = kept
        self._timeline.truncate(frame)
        self._gen_cursor = frame
        self._gen_state = kept[-1].window_state if kept else self._last_emitted_state
        self._epoch += 1
        self._changed.notify()

    # -- generation ---------------------------------------------------------------

    async def _produce(self) -> None:
        window = self._window
        try:
            while not self._closed:
                await self._changed.wait_for(
                    lambda: self._closed or self._gen_cursor + window - self._next_emit <= self._lead
                )
                if self._closed:
                    return
                deadline_near = self._gen_cursor - self._next_emit < self._guard_frames()
                plan = self._timeline.plan(
                    self._gen_cursor,
                    window,
                    self._generator.context_frames,
                    self._generator.lookahead_frames,
                    may_underrun=deadline_near,
                )
                if plan is None:  # waiting for speech or lookahead audio
                    await self._changed.wait()
                    continue
                if not await self._generate(plan):
                    return
        except Exception as exc:  # an engine bug: end the stream with a clear error rather than hang
            logger.exception("session producer failed")
            self._fatal = f"session engine failed: {type(exc).__name__}: {exc}"
            self._emit(SessionError("internal_error", self._fatal))
            self._changed.notify()

    def _guard_frames(self) -> int:
        """Frames of lead below which the producer stops waiting for audio: enough
        to generate one window before its first frame is due."""
        return math.ceil(self._stats.window_seconds * self.fps) + 1

    async def _generate(self, plan: WindowPlan) -> bool:
        """Run the generator on ``plan`` and queue its frames. Returns False when
        the generator has failed too often and the stream must stop."""
        epoch = self._epoch
        idle_retry = self._failures > 0  # after a failure, retry the frames without speech
        window = self._audio_window(plan, silent=idle_retry)
        self._inflight = plan
        started = time.perf_counter()
        try:
            images, state = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._generator.generate, self._prepared, window, self._motion, self._gen_state
            )
            self._check_images(images, len(plan.frames))
        except Exception as exc:
            if epoch == self._epoch:
                return self._generator_failed(plan, exc)
            return True
        finally:
            self._inflight = None
        elapsed = time.perf_counter() - started
        if epoch != self._epoch:
            logger.debug("discarding window at frame %d: truncated meanwhile", plan.first_frame)
            return True
        self._failures = 0
        self._stats.window_generated(len(plan.frames), elapsed)
        self._timeline.commit(plan)
        for k, planned in enumerate(plan.frames):
            self._queue.append(_QueuedFrame(planned.index, images[k], planned.audio, planned.utterance, state))
        self._gen_cursor = plan.frames[-1].index + 1
        self._gen_state = state
        self._changed.notify()
        return True

    def _audio_window(self, plan: WindowPlan, silent: bool) -> AudioWindow:
        if silent:
            audio = np.zeros_like(plan.audio)
            speech = np.zeros(len(plan.frames), bool)
        else:
            audio = plan.audio
            speech = np.array(
                [f.utterance is not None and self._vad.is_speech(f.audio) for f in plan.frames], dtype=bool
            )
        return AudioWindow(
            audio=audio,
            first_frame=plan.first_frame,
            num_frames=len(plan.frames),
            fps=self.fps,
            context_before=plan.context_before,
            context_after=plan.context_after,
            speech=speech,
        )

    @staticmethod
    def _check_images(images: object, count: int) -> None:
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[0] != count
            or images.shape[3] != 3
        ):
            described = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"generate() must return uint8 frames of shape ({count}, H, W, 3), got {described}")

    def _generator_failed(self, plan: WindowPlan, exc: Exception) -> bool:
        self._failures += 1
        last = plan.frames[-1].index
        message = f"generator failed on frames {plan.first_frame}..{last}: {type(exc).__name__}: {exc}"
        logger.error(message, exc_info=exc)
        self._emit(SessionError("generator_error", message))
        if self._failures < MAX_CONSECUTIVE_FAILURES:
            return True
        self._fatal = f"generator failed {self._failures} times in a row; last error: {type(exc).__name__}: {exc}"
        self._emit(SessionError("generator_failed", self._fatal))
        self._changed.notify()
        return False

    # -- helpers ----------------------------------------------------------------

    def _speech_ahead(self) -> bool:
        """Whether any speech is queued: audio not yet framed or frames not yet out."""
        return self._timeline.has_utterances or any(f.utterance is not None for f in self._queue)

    def _set_state(self, state: SessionState) -> None:
        if state is not self._state:
            self._state = state
            self._emit(StateChanged(state))

    def _emit(self, event: Event) -> None:
        self._events.publish(event)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the avatar session is closed")
