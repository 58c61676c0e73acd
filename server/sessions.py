"""Live sessions: creation within limits, the objects a session holds, and their end.

A ``LiveSession`` owns one ``AvatarSession`` (the frame stream), at most one
media peer (WebRTC, attached by the offer route) and the WebSocket connections
attached to it. ``SessionManager`` creates sessions up to ``max_sessions``, and
while load admission (``server.load``) finds the CPU can carry one more, and
ends them on DELETE, idle timeout (no WebSocket and no connected peer for
``idle_timeout_s``), ``max_duration_s``, the peer's failure, and shutdown. A
reaper pass (``reap``, run every REAP_INTERVAL_S by ``run_reaper``) applies the
timeouts, refreshes the store records and updates the session metrics; its
clock is injectable so tests drive it without waiting. Each pass also feeds load
admission a CPU reading.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from avatar.clock import Clock
from avatar.frames import PlaybackStarted, SessionState, StateChanged
from avatar.generator_process import ProcessGenerator, factory_module, limit_math_threads, start_fork_server
from avatar.session import AvatarSession
from model.base import Generator, MotionSettings, PreparedPortrait
from server.config import Settings
from server.load import LoadAdmission
from server.metrics import ServerMetrics
from server.store import SessionStore, StoreUnavailable

logger = logging.getLogger(__name__)

#: Seconds between reaper passes.
REAP_INTERVAL_S = 1.0
#: Seconds between refreshes of a session's store record, and the record's time to live.
RECORD_REFRESH_S = 10.0
RECORD_TTL_S = 30.0
#: Retry-After (seconds) suggested when all session slots are taken.
RETRY_AFTER_S = 10


class SessionLimitReached(RuntimeError):
    """No session may start now: ``code`` ``too_many_sessions`` (all
    ``max_sessions`` slots are taken) or ``cpu_busy`` (load admission refused)."""

    def __init__(self, message: str, code: str = "too_many_sessions") -> None:
        super().__init__(message)
        self.code = code


class PeerConflict(RuntimeError):
    """A media peer is already connected to the session."""


class Closable(Protocol):
    """A WebSocket connection as a session sees it: something to close when the session ends."""

    async def close_for_session_end(self, reason: str) -> None:
        """Tell the client why and close the connection (must not raise)."""


class LiveSession:
    """One live session. Attributes: ``id``, ``token`` (256-bit URL-safe secret),
    ``avatar`` (started AvatarSession), ``clock`` (its pacing clock), ``peer``
    (a ``server.webrtc.MediaPeer`` or None),
    ``created_at`` and ``last_activity`` (monotonic seconds of the manager's
    clock), ``motion``, ``fps``, ``portrait_id``, ``state`` (latest avatar state).
    """

    def __init__(
        self,
        avatar: AvatarSession,
        *,
        clock: Clock,
        portrait_id: str,
        generator: Generator,
        motion: MotionSettings,
        store: SessionStore,
        metrics: ServerMetrics,
        monotonic: Callable[[], float],
    ) -> None:
        self.id = uuid.uuid4().hex
        self.token = secrets.token_urlsafe(32)
        self.avatar = avatar
        self.clock = clock
        self.peer: Any | None = None
        self.motion = motion
        self.fps = avatar.fps
        self.portrait_id = portrait_id
        self.generator_name = generator.name
        self._generator = generator
        self.state = SessionState.IDLE
        self._store = store
        self._metrics = metrics
        self._monotonic = monotonic
        self.created_at = monotonic()
        self.last_activity = self.created_at
        self.record_refreshed_at = self.created_at
        self.offer_lock = asyncio.Lock()  # one offer at a time per session
        self._connections: set[Closable] = set()
        self._speech_tasks: set[asyncio.Task] = set()
        self._closed = False
        self._first_frame_seen = False
        self._dropped_counted = 0
        self._monitor = asyncio.create_task(self._watch_events(), name=f"session-{self.id[:8]}-events")

    # -- access -----------------------------------------------------------------

    def authorized(self, token: str | None) -> bool:
        """Whether ``token`` is this session's token (constant-time comparison)."""
        return token is not None and secrets.compare_digest(token.encode(), self.token.encode())

    @property
    def closed(self) -> bool:
        """Whether the session has ended."""
        return self._closed

    @property
    def active(self) -> bool:
        """Whether a WebSocket is attached or a media peer is connected."""
        return bool(self._connections) or (self.peer is not None and bool(self.peer.connected))

    def touch(self) -> None:
        """Note activity now (the idle timeout counts from the last activity)."""
        self.last_activity = self._monotonic()

    def record(self) -> dict:
        """The store record of this session (JSON-able)."""
        return {
            "id": self.id,
            "portrait_id": self.portrait_id,
            "generator": self.generator_name,
            "fps": self.fps,
            "motion": {"face": self.motion.face, "body": self.motion.body},
            "created_at_unix": time.time() - (self._monotonic() - self.created_at),
        }

    # -- connections ------------------------------------------------------------

    def attach(self, connection: Closable) -> None:
        """Attach a WebSocket connection (closed when the session ends)."""
        self._connections.add(connection)
        self.touch()

    def detach(self, connection: Closable) -> None:
        """Detach a WebSocket connection; the idle timeout counts from now."""
        self._connections.discard(connection)
        self.touch()

    # -- control ----------------------------------------------------------------

    def set_motion(self, face: float, body: float) -> None:
        """Motion for every window generated from now on; ValueError outside [0, 1]."""
        self.motion = MotionSettings(face=face, body=body)
        self.avatar.set_motion(face, body)

    def start_speech(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run ``work`` (e.g. synthesise text and push it) as a task that an
        interrupt or the session's end cancels."""
        task = asyncio.create_task(work, name=f"session-{self.id[:8]}-speech")
        self._speech_tasks.add(task)
        task.add_done_callback(self._speech_tasks.discard)
        return task

    async def interrupt(self) -> tuple[float, bool]:
        """Cancel pending speech work, drop queued audio and frames in the avatar
        and in the media peer's tracks. Returns (seconds of the cut utterance
        played, whether one was cut); the avatar emits PlaybackFinished."""
        started = time.perf_counter()
        for task in list(self._speech_tasks):
            task.cancel()
        position, cut = await self.avatar.clear_buffer()
        if self.peer is not None:
            self.peer.flush()
        self._metrics.interrupt_latency.observe(time.perf_counter() - started)
        return position, cut

    async def close(self, reason: str) -> None:
        """End the session: close its WebSockets (telling them ``reason``), its
        media peer and avatar session; remove its store record. Idempotent;
        never raises (a failing part is logged and the rest still closes)."""
        if self._closed:
            return
        self._closed = True
        logger.info("session %s ends: %s", self.id[:8], reason)
        for task in list(self._speech_tasks):
            task.cancel()
        for connection in list(self._connections):
            await connection.close_for_session_end(reason)
        self._connections.clear()
        if self.peer is not None:
            try:
                await self.peer.close()
            except Exception:
                logger.exception("closing the media peer of session %s failed", self.id[:8])
        await self.avatar.aclose()  # also ends the monitor's event subscription
        await asyncio.gather(self._monitor, return_exceptions=True)
        try:
            await asyncio.to_thread(self._generator.close)
        except Exception:
            logger.exception("closing the generator of session %s failed", self.id[:8])
        try:
            await self._store.delete_session(self.id)
        except StoreUnavailable as exc:
            logger.warning("session %s record not removed (it expires by itself): %s", self.id[:8], exc)

    # -- measurement ------------------------------------------------------------

    def update_metrics(self) -> dict:
        """Count this session's new dropped frames and its first frame in the
        metrics; returns ``avatar.stats()``."""
        stats = self.avatar.stats()
        dropped = stats["dropped_frames"] + int(self._peer_stats().get("dropped_frames", 0) or 0)
        if dropped > self._dropped_counted:
            self._metrics.dropped_frames.inc(dropped - self._dropped_counted)
            self._dropped_counted = dropped
        if not self._first_frame_seen and stats["time_to_first_frame_s"] is not None:
            self._first_frame_seen = True
            self._metrics.time_to_first_frame.observe(stats["time_to_first_frame_s"])
        return stats

    def _peer_stats(self) -> dict:
        if self.peer is None:
            return {}
        try:
            return dict(self.peer.stats())
        except Exception:
            logger.exception("media peer stats failed")
            return {}

    async def _watch_events(self) -> None:
        # The session's own subscription: state for late WebSocket joiners, lip latency for metrics.
        async for event in self.avatar.events():
            if isinstance(event, StateChanged):
                self.state = event.state
            elif isinstance(event, PlaybackStarted):
                latency = self.avatar.stats()["audio_to_lip_latency_s"]
                if latency is not None:
                    self._metrics.audio_to_lip.observe(latency)


class SessionManager:
    """Creates, finds and ends live sessions.

    ``generator_factory``: a new Generator per session (generators keep
    per-portrait render caches, so sessions do not share one);
    ``clock_factory``: the pacing clock of each AvatarSession (SystemClock live,
    VirtualClock in fast tests); ``monotonic``: seconds for timeouts (injectable);
    ``admission``: load admission, fed by the reaper and shown in the metrics;
    it refuses sessions when ``settings.admit_by_load`` says so (None: no
    measurement, only ``max_sessions`` limits).
    """

    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        metrics: ServerMetrics,
        *,
        generator_factory: Callable[[], Generator],
        clock_factory: Callable[[], Clock],
        monotonic: Callable[[], float] = time.monotonic,
        admission: LoadAdmission | None = None,
    ) -> None:
        self._settings = settings
        self._admission = admission
        self._store = store
        self._metrics = metrics
        self._generator_factory = generator_factory
        self._clock_factory = clock_factory
        self._monotonic = monotonic
        self._sessions: dict[str, LiveSession] = {}
        self._reserved = 0
        # Sessions run side by side, also in this process without worker processes.
        limit_math_threads()
        self._store_warned = False
        if settings.generator_processes:
            threading.Thread(target=start_fork_server, args=(factory_module(generator_factory),),
                             name="fork-server-start", daemon=True).start()

    def _new_generator(self) -> Generator:
        """A session's generator: in a worker process when the settings say so
        (blocking: the first one starts the fork server)."""
        if self._settings.generator_processes:
            return ProcessGenerator(self._generator_factory)
        return self._generator_factory()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> LiveSession | None:
        """The live session ``session_id``, or None."""
        return self._sessions.get(session_id)

    def check_capacity(self) -> None:
        """Raise SessionLimitReached when no session slot is free or the CPU
        cannot carry one more session."""
        sessions = len(self._sessions) + self._reserved
        if sessions >= self._settings.max_sessions:
            raise SessionLimitReached(
                f"the server already runs its maximum of {self._settings.max_sessions} sessions; try again later"
            )
        if self._admission is None or not self._settings.admit_by_load:
            return
        refusal = self._admission.refusal(sessions)
        if refusal is not None:
            logger.info("session refused: %s", refusal)
            raise SessionLimitReached(refusal, "cpu_busy")

    async def create(
        self, prepared: PreparedPortrait, *, portrait_id: str, motion: MotionSettings, fps: float
    ) -> LiveSession:
        """Start a session on a prepared portrait. Raises SessionLimitReached,
        StoreUnavailable (the record cannot be written; nothing is left running)
        and ValueError for a bad ``fps``."""
        self.check_capacity()
        self._reserved += 1  # hold the slot across the awaits below
        try:
            generator = await asyncio.to_thread(self._new_generator)
            try:
                clock = self._clock_factory()
                avatar = AvatarSession(generator, prepared, fps=fps, motion=motion, clock=clock)
                await avatar.start()
            except BaseException:
                generator.close()
                raise
            live = LiveSession(
                avatar,
                clock=clock,
                portrait_id=portrait_id,
                generator=generator,
                motion=motion,
                store=self._store,
                metrics=self._metrics,
                monotonic=self._monotonic,
            )
            try:
                await self._store.put_session(live.record(), RECORD_TTL_S)
            except StoreUnavailable:
                await live.close("the session store is unreachable")
                raise
        finally:
            self._reserved -= 1
        self._sessions[live.id] = live
        self._metrics.sessions.set(len(self._sessions))
        logger.info("session %s started (%s, %.0f fps)", live.id[:8], generator.name, live.fps)
        return live

    async def end(self, session_id: str, reason: str) -> bool:
        """End a session; False when it is not (or no longer) live."""
        live = self._sessions.pop(session_id, None)
        if live is None:
            return False
        self._metrics.sessions.set(len(self._sessions))
        await live.close(reason)
        return True

    async def connect_peer(self, live: LiveSession, offer_sdp: str, make_peer: Callable[..., Any]) -> str:
        """Answer ``offer_sdp`` with a new media peer ``make_peer(avatar,
        on_closed=..., fps=..., clock=...)`` (``server.webrtc.MediaPeer``), replacing a
        peer of ``live`` that never connected. The peer's ``on_closed(reason)``
        ends the session, unless that peer was replaced meanwhile. Returns the
        answer SDP. Raises PeerConflict when a peer is connected, ValueError
        for a malformed offer (the new peer is closed)."""
        async with live.offer_lock:
            if live.peer is not None and live.peer.connected:
                raise PeerConflict("a media peer is already connected to this session")
            stale, live.peer = live.peer, None
            if stale is not None:
                await stale.close()
            peer = None

            async def on_closed(reason: str) -> None:
                if peer is not None and live.peer is peer:
                    await self.end(live.id, f"media peer closed: {reason}")

            peer = make_peer(live.avatar, on_closed=on_closed, fps=live.fps, clock=live.clock)
            try:
                answer = await peer.answer(offer_sdp)
            except BaseException:
                await peer.close()
                raise
            live.peer = peer
            live.touch()
            return answer

    async def reap(self) -> list[str]:
        """One reaper pass: end sessions past max duration or idle too long,
        refresh store records, update metrics. Returns the ids it ended."""
        now = self._monotonic()
        ended: list[str] = []
        for live in list(self._sessions.values()):
            if now - live.created_at > self._settings.max_duration_s:
                reason = f"maximum duration of {self._settings.max_duration_s:g} s reached"
            elif live.active:
                live.touch()
                continue
            elif now - live.last_activity > self._settings.idle_timeout_s:
                reason = f"idle for more than {self._settings.idle_timeout_s:g} s"
            else:
                continue
            await self.end(live.id, reason)
            ended.append(live.id)
        await self._refresh_records(now)
        rtfs = [stats["rtf"] for stats in (live.update_metrics() for live in self._sessions.values())]
        self._metrics.rtf.set(max((r for r in rtfs if r is not None), default=0.0))
        if self._admission is not None:
            # Reading /proc takes milliseconds: off the loop that paces media.
            reading = await asyncio.to_thread(self._admission.meter.read, now)
            self._admission.observe(reading, len(self._sessions))
            self._metrics.session_cores.set(self._admission.session_cores)
            self._metrics.free_sessions.set(self._admission.free_sessions(len(self._sessions)))
        return ended

    async def _refresh_records(self, now: float) -> None:
        for live in list(self._sessions.values()):
            if now - live.record_refreshed_at < RECORD_REFRESH_S:
                continue
            try:
                await self._store.put_session(live.record(), RECORD_TTL_S)
            except StoreUnavailable as exc:
                # Media does not depend on the store: the session goes on.
                if not self._store_warned:
                    logger.warning("session records not refreshed; sessions go on: %s", exc)
                self._store_warned = True
                return
            live.record_refreshed_at = now
            self._store_warned = False

    async def run_reaper(self, interval_s: float = REAP_INTERVAL_S) -> None:
        """Run ``reap`` every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reap()
            except Exception:
                logger.exception("reaper pass failed")

    async def close_all(self, reason: str = "server shutting down") -> None:
        """End every session (server shutdown)."""
        for session_id in list(self._sessions):
            await self.end(session_id, reason)
