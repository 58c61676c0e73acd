"""The session's WebSocket: control and audio in, events out.

Client to server: binary frames of PCM16LE mono audio at the rate last set by
``audio_format`` (default 16 kHz); JSON ``audio_format``, ``speech_end``,
``interrupt``, ``set_motion``, ``say``, ``ping`` (``server.schemas``). Server to
client: ``state`` (once at connect, then on every change), ``playback_started``,
``playback_finished``, ``stats`` (at connect, then every STATS_INTERVAL_S),
``error``, ``pong``. A bad message gets an error event and the session goes on.
``say`` synthesises its text (server.tts) in a task an interrupt cancels, and
plays it as one utterance (joining the one the client is streaming, if open).
Events that earlier messages caused are sent before the answer to a ``ping``.
More than ``ws_max_messages_per_s`` messages in one second: the excess is
dropped (one ``rate_limited`` error per second); a flood lasting FLOOD_CLOSE_S
closes the connection with 4429.

Close codes: 4401 no token, 4403 wrong token, 4404 unknown session, 4429
flood, 1008 a client that stops reading its events, 1000 the session ended
(after an ``error`` event ``session_ended`` giving the reason).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import Callable

import numpy as np
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from avatar.audio_in import AudioFormatError
from avatar.frames import AudioChunk, PlaybackFinished, PlaybackStarted, SessionError, StateChanged
from server.config import Settings
from server.schemas import (
    CLIENT_MESSAGE_TYPES,
    AudioFormatMessage,
    ErrorEvent,
    InterruptMessage,
    PingMessage,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    PongEvent,
    SayMessage,
    SetMotionMessage,
    SpeechEndMessage,
    StateEvent,
    StatsEvent,
    parse_client_message,
)
from server.sessions import LiveSession, SessionManager
from server.tts import UNAVAILABLE_MESSAGE, EspeakTts, TtsError, TtsUnavailable

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0
FLOOD_CLOSE_S = 5.0
#: Events waiting for a slow client before the connection is closed.
MAX_OUTGOING = 256
#: Seconds to let a queued close frame reach the client before the connection is dropped.
CLOSE_WAIT_S = 1.0
DEFAULT_SAMPLE_RATE = 16000

CLOSE_NO_TOKEN, CLOSE_BAD_TOKEN, CLOSE_NO_SESSION, CLOSE_FLOOD = 4401, 4403, 4404, 4429
CLOSE_NOT_READING = 1008


class Verdict(enum.Enum):
    """What to do with one incoming message."""

    ACCEPT = "accept"
    DROP_AND_WARN = "drop_and_warn"  # the first excess message of a second
    DROP = "drop"
    CLOSE = "close"


class RateLimiter:
    """Counts messages in one-second windows (starting at the first message
    after the previous window ended). Over ``limit`` in a window, the excess is
    dropped; when windows over the limit follow each other for ``sustain_s``
    seconds, ``check`` answers CLOSE. A window under the limit, or a second
    without messages, ends a flood. ``clock``: monotonic seconds."""

    def __init__(self, limit: int, clock: Callable[[], float], *, window_s: float = 1.0,
                 sustain_s: float = FLOOD_CLOSE_S) -> None:
        self._limit = limit
        self._clock = clock
        self._window_s = window_s
        self._sustain_s = sustain_s
        self._window_start: float | None = None
        self._count = 0
        self._window_flooded = False
        self._flood_start: float | None = None

    def check(self) -> Verdict:
        """Count one message arriving now and say what to do with it."""
        now = self._clock()
        if self._window_start is None or now - self._window_start >= self._window_s:
            calm_gap = self._window_start is None or now - self._window_start >= 2 * self._window_s
            if not self._window_flooded or calm_gap:
                self._flood_start = None
            self._window_start, self._count, self._window_flooded = now, 0, False
        self._count += 1
        if self._count <= self._limit:
            return Verdict.ACCEPT
        if self._flood_start is None:
            self._flood_start = self._window_start
        if now - self._flood_start >= self._sustain_s:
            return Verdict.CLOSE
        first = not self._window_flooded
        self._window_flooded = True
        return Verdict.DROP_AND_WARN if first else Verdict.DROP


async def serve_events(
    websocket: WebSocket,
    session_id: str,
    token: str | None,
    *,
    manager: SessionManager,
    settings: Settings,
    tts: EspeakTts,
    monotonic: Callable[[], float],
) -> None:
    """Serve one events WebSocket of session ``session_id`` until either side closes."""
    await websocket.accept()
    live = manager.get(session_id)
    if not token:
        await _close(websocket, CLOSE_NO_TOKEN, "missing token: connect with ?token=<session token>")
    elif live is None:
        await _close(websocket, CLOSE_NO_SESSION, "unknown session")
    elif not live.authorized(token):
        await _close(websocket, CLOSE_BAD_TOKEN, "wrong token for this session")
    else:
        await EventsConnection(websocket, live, settings, tts, monotonic).run()


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):  # the client may already be gone
        await websocket.close(code, reason)


class EventsConnection:
    """One attached WebSocket: a receive loop in the calling task, plus tasks
    that forward avatar events, send stats, and write the outgoing queue (the
    only writer, so a slow client never blocks the receive loop)."""

    def __init__(self, websocket: WebSocket, live: LiveSession, settings: Settings, tts: EspeakTts,
                 monotonic: Callable[[], float]) -> None:
        self._ws = websocket
        self._live = live
        self._settings = settings
        self._tts = tts
        self._limiter = RateLimiter(settings.ws_max_messages_per_s, monotonic)
        self._sample_rate = DEFAULT_SAMPLE_RATE
        self._outgoing: asyncio.Queue[dict | tuple[int, str]] = asyncio.Queue(MAX_OUTGOING + 1)
        self._closing = False  # a close frame is queued
        self._sender: asyncio.Task | None = None

    async def run(self) -> None:
        """Serve until the client disconnects or the connection is closed."""
        live = self._live
        events = live.avatar.events()  # subscribe before the state snapshot: no change is missed
        self._sender = asyncio.create_task(self._send_loop(), name="ws-sender")
        helpers = [
            asyncio.create_task(self._forward_events(events), name="ws-events"),
            asyncio.create_task(self._send_stats(), name="ws-stats"),
        ]
        live.attach(self)
        self._queue(StateEvent(state=live.state.value).model_dump())
        try:
            await self._receive_loop()
        finally:
            live.detach(self)
            for task in helpers:
                task.cancel()
            if self._closing:  # let the sender deliver the close frame, if the client still reads
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._sender), CLOSE_WAIT_S)
            self._sender.cancel()
            await asyncio.gather(*helpers, self._sender, return_exceptions=True)
            await events.aclose()

    async def close_for_session_end(self, reason: str) -> None:
        """Send ``session_ended`` with ``reason``, then close with 1000."""
        self._queue(ErrorEvent(code="session_ended", message=f"the session ended: {reason}").model_dump())
        self._close(1000, "session ended")
        if self._sender is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._sender), CLOSE_WAIT_S)

    # -- outgoing -----------------------------------------------------------------

    def _queue(self, item: dict) -> None:
        if self._closing:
            return
        if self._outgoing.qsize() >= MAX_OUTGOING:
            logger.warning("session %s: WebSocket client is not reading events; closing it", self._live.id[:8])
            self._drain_outgoing()
            self._close(CLOSE_NOT_READING, "client is not reading events")
            return
        self._outgoing.put_nowait(item)

    def _close(self, code: int, reason: str) -> None:
        """Queue a close frame after what is queued; nothing is queued after it."""
        if not self._closing:
            self._outgoing.put_nowait((code, reason))  # never full: _queue keeps a free slot
            self._closing = True

    def _drain_outgoing(self) -> None:
        while not self._outgoing.empty():
            self._outgoing.get_nowait()

    def _error(self, code: str, message: str) -> None:
        self._queue(ErrorEvent(code=code, message=message).model_dump())

    async def _send_loop(self) -> None:
        try:
            while True:
                item = await self._outgoing.get()
                if isinstance(item, tuple):
                    await self._ws.close(*item)
                    return
                await self._ws.send_text(json.dumps(item))
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            # The client vanished mid-send; the receive loop sees the disconnect.
            logger.debug("session %s: WebSocket send stopped: %s", self._live.id[:8], exc)

    async def _forward_events(self, events) -> None:
        async for event in events:
            if isinstance(event, StateChanged):
                self._queue(StateEvent(state=event.state.value).model_dump())
            elif isinstance(event, PlaybackStarted):
                self._queue(PlaybackStartedEvent(pts=event.pts).model_dump())
            elif isinstance(event, PlaybackFinished):
                self._queue(PlaybackFinishedEvent(position=event.position, interrupted=event.interrupted).model_dump())
            elif isinstance(event, SessionError):
                self._error(event.code, event.message)

    async def _send_stats(self) -> None:
        while True:
            self._queue(StatsEvent(**self._live.avatar.stats()).model_dump())
            await asyncio.sleep(STATS_INTERVAL_S)

    # -- incoming -----------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await self._ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            verdict = self._limiter.check()
            if verdict is Verdict.CLOSE:
                logger.warning("session %s: WebSocket flood; closing it", self._live.id[:8])
                self._drain_outgoing()
                self._close(CLOSE_FLOOD, "too many messages for too long")
                return
            if verdict is not Verdict.ACCEPT:
                if verdict is Verdict.DROP_AND_WARN:
                    self._error(
                        "rate_limited",
                        f"more than {self._settings.ws_max_messages_per_s} messages in one second; "
                        "the excess is dropped",
                    )
                continue
            self._live.touch()
            try:
                if message.get("bytes") is not None:
                    await self._audio(message["bytes"])
                elif message.get("text") is not None:
                    await self._text(message["text"])
            except RuntimeError as exc:  # the avatar session closed under us: the session is ending
                logger.debug("session %s: message after close: %s", self._live.id[:8], exc)
                return

    async def _audio(self, data: bytes) -> None:
        if len(data) % 2:
            self._error(
                "bad_audio",
                f"binary frames must be PCM16LE mono (an even number of bytes), got {len(data)} bytes; frame ignored",
            )
            return
        if not data:
            return
        samples = np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)
        try:
            await self._live.avatar.push_audio(AudioChunk(samples, self._sample_rate))
        except AudioFormatError:
            pass  # the avatar already sent a bad_audio error event
        # One pass of the loop per chunk: messages already buffered are read without
        # yielding, and an agent that pushes 30 s of speech at once held the loop for
        # 50 ms (bench) while frames of every session were due.
        await asyncio.sleep(0)

    async def _text(self, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            self._error("bad_json", "text frames must be JSON objects with a 'type' field; this one is not JSON")
            return
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in CLIENT_MESSAGE_TYPES:
            self._error(
                "unknown_type",
                f"unknown message type {kind!r}; accepted: {', '.join(CLIENT_MESSAGE_TYPES)}",
            )
            return
        try:
            message = parse_client_message(data)
        except ValidationError as exc:
            self._error("invalid_message", f"bad {kind!r} message: {_describe(exc)}")
            return
        await self._dispatch(message)

    async def _dispatch(self, message) -> None:
        live = self._live
        if isinstance(message, PingMessage):
            # One pass of the loop lets the event forwarder queue the events that
            # earlier messages caused, so a pong follows them (clients sync on it).
            await asyncio.sleep(0)
            self._queue(PongEvent().model_dump())
        elif isinstance(message, AudioFormatMessage):
            self._sample_rate = message.sample_rate
        elif isinstance(message, SpeechEndMessage):
            live.avatar.end_of_speech()
        elif isinstance(message, InterruptMessage):
            await live.interrupt()
        elif isinstance(message, SetMotionMessage):
            live.set_motion(message.face, message.body)
        elif isinstance(message, SayMessage):
            self._say(message.text)

    def _say(self, text: str) -> None:
        limit = self._settings.say_max_chars
        if len(text) > limit:
            self._error("text_too_long", f"say text is {len(text)} characters; at most {limit} are accepted")
            return
        if not self._tts.available:
            self._error("tts_unavailable", UNAVAILABLE_MESSAGE)
            return
        self._live.start_speech(self._speak(text))

    async def _speak(self, text: str) -> None:
        try:
            samples, rate = await self._tts.synthesize(text)
        except (TtsError, TtsUnavailable, OSError) as exc:
            logger.warning("session %s: say failed: %s", self._live.id[:8], exc)
            self._error("tts_failed", str(exc))
            return
        avatar = self._live.avatar
        try:
            await avatar.push_audio(AudioChunk(samples, rate))
            avatar.end_of_speech()
        except RuntimeError:
            pass  # the session closed meanwhile


def _describe(exc: ValidationError) -> str:
    """One line from pydantic's errors: 'field: problem; ...'."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"][1:]) or "message"  # loc[0] is the union tag
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
