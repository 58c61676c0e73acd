"""The session WebSocket: auth close codes, the event flow of an utterance,
interrupt, set_motion, say, bad messages, rate limits, and clients that vanish.

Sessions run on a VirtualClock (frames as fast as the fake generator makes
them); with no WebRTC peer, a test task reads the avatar's frames
(``server_consume_frames``). The server handles one connection's messages in
order, so a ping's pong says every earlier message was handled.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import websockets
from scipy.signal import resample_poly

from avatar.clock import VirtualClock
from model.base import MotionSettings
from server.app import create_app
from server.tts import EspeakTts
from server.ws import RateLimiter, Verdict

FPS = 25.0


class FakeMonotonic:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ws_server(server_settings, server_generators, server_running):
    """``async with ws_server(**settings_overrides, tts=..., monotonic=...) as srv``."""

    def start(tts=None, monotonic=None, **overrides):
        kwargs = {"tts": tts} if tts is not None else {}
        if monotonic is not None:
            kwargs["monotonic"] = monotonic
        app = create_app(
            server_settings(**overrides), generator_factory=server_generators.factory,
            clock_factory=VirtualClock, reaper_interval_s=3600, **kwargs,
        )
        return server_running(app)

    return start


async def open_session(srv, **body) -> tuple[dict, object]:
    response = await srv.http.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    session = response.json()
    return session, srv.manager.get(session["session_id"])


def events_url(srv, session, token: str | None = "same") -> str:
    url = srv.ws_url(session["events_url"])
    return url if token is None else f"{url}?token={session['token'] if token == 'same' else token}"


async def sync(ws, until) -> list[dict]:
    """Everything received up to the pong of a ping sent now."""
    await ws.send(json.dumps({"type": "ping"}))
    return await until(ws, lambda m: m["type"] == "pong")


async def close_code(url: str) -> int:
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    return closed.value.rcvd.code


# -- connecting ---------------------------------------------------------------------


async def test_token_errors_close_with_their_codes(ws_server):
    async with ws_server() as srv:
        session, _ = await open_session(srv)
        assert await close_code(events_url(srv, session, token=None)) == 4401
        assert await close_code(events_url(srv, session, token="x" * 43)) == 4403
        assert await close_code(srv.ws_url("/v1/sessions/nope/events?token=abc")) == 4404


async def test_connect_sends_state_and_stats(ws_server, server_ws_until):
    async with ws_server() as srv:
        session, live = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            first = json.loads(await ws.recv())
            seen = await server_ws_until(ws, lambda m: m["type"] == "stats")
    assert first == {"type": "state", "state": "idle"}
    assert set(live.avatar.stats()) <= set(seen[-1])


# -- an utterance ----------------------------------------------------------------------


async def test_pushed_audio_plays_with_events_in_order(ws_server, server_ws_until, server_consume_frames,
                                                      media_speech):
    clip = media_speech[: 2 * 16000]  # 2.0 s
    at_24k = resample_poly(clip.astype(np.float32), 3, 2).round().clip(-32768, 32767).astype(np.int16)
    async with ws_server() as srv:
        session, live = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            await ws.send(json.dumps({"type": "audio_format", "sample_rate": 24000}))
            for chunk in np.array_split(at_24k, 10):
                await ws.send(chunk.tobytes())
            await ws.send(json.dumps({"type": "speech_end"}))
            seen = await sync(ws, server_ws_until)
            consumer = server_consume_frames(live, 200)
            seen += await server_ws_until(ws, lambda m: m["type"] == "playback_finished")
            seen += await server_ws_until(ws, lambda m: m["type"] == "state")
            speaking = await consumer
        await srv.manager.reap()  # the reaper counts first frames and dropped frames
        metrics = (await srv.http.get("/metrics")).text
    flow = [(m["type"], m.get("state")) for m in seen if m["type"] != "stats"]
    assert flow == [("state", "idle"), ("state", "listening"), ("pong", None), ("state", "speaking"),
                    ("playback_started", None), ("playback_finished", None), ("state", "idle")]
    started = next(m for m in seen if m["type"] == "playback_started")
    finished = next(m for m in seen if m["type"] == "playback_finished")
    assert isinstance(started["pts"], int) and started["pts"] % round(16000 / FPS) == 0
    assert finished["interrupted"] is False
    assert finished["position"] == pytest.approx(2.0, abs=2 / FPS)
    assert sum(speaking) == pytest.approx(2.0 * FPS, abs=2)
    assert "avatar_audio_to_lip_seconds_count 1.0" in metrics
    assert "avatar_time_to_first_frame_seconds_count 1.0" in metrics


async def test_interrupt_cuts_playback(ws_server, server_ws_until, server_consume_frames, media_speech):
    async with ws_server() as srv:
        session, live = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            await ws.send(media_speech.tobytes())  # 3 s
            await ws.send(json.dumps({"type": "speech_end"}))
            await sync(ws, server_ws_until)
            speaking = await server_consume_frames(live, 25)  # one second of frames, then the client interrupts
            await ws.send(json.dumps({"type": "interrupt"}))
            seen = await server_ws_until(ws, lambda m: m["type"] == "playback_finished")
            seen += await server_ws_until(ws, lambda m: m["type"] == "state")
            after = await server_consume_frames(live, 10)
        metrics = (await srv.http.get("/metrics")).text
    finished = seen[-2]
    assert finished["interrupted"] is True
    assert finished["position"] == pytest.approx(sum(speaking) / FPS)
    assert 0 < finished["position"] < 1.5
    assert seen[-1] == {"type": "state", "state": "idle"}
    assert not any(after)  # nothing of the cut utterance plays after the interrupt
    assert "avatar_interrupt_latency_seconds_count 1.0" in metrics


async def test_set_motion_reaches_the_generator(ws_server, server_ws_until, server_consume_frames,
                                                server_generators):
    async with ws_server() as srv:
        session, live = await open_session(srv, motion={"face": 0.5, "body": 0.5})
        async with websockets.connect(events_url(srv, session)) as ws:
            await ws.send(json.dumps({"type": "set_motion", "face": 0.9, "body": 0.1}))
            await ws.send(json.dumps({"type": "set_motion", "face": 1.2, "body": 0.1}))
            seen = await sync(ws, server_ws_until)
            calls_before = len(server_generators.motions)
            await server_consume_frames(live, 40)
    errors = [m for m in seen if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_message"] and "face" in errors[0]["message"]
    assert live.motion == MotionSettings(0.9, 0.1)
    assert server_generators.motions[-1] == MotionSettings(0.9, 0.1)
    assert len(server_generators.motions) > calls_before


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, code",
    [
        ("not json at all", "bad_json"),
        ("[1, 2]", "unknown_type"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"no_type": 1}', "unknown_type"),
        ('{"type": "audio_format", "sample_rate": 44100}', "invalid_message"),
        ('{"type": "set_motion", "face": "high", "body": 0.5}', "invalid_message"),
        ('{"type": "say", "text": ""}', "invalid_message"),
        ('{"type": "say", "text": "' + "a" * 41 + '"}', "text_too_long"),
        (b"\x01\x02\x03", "bad_audio"),
    ],
    ids=["not-json", "array", "unknown", "no-type", "rate", "motion-type", "empty-say", "long-say", "odd-pcm"],
)
async def test_bad_messages_get_an_error_event_and_the_session_goes_on(ws_server, server_ws_until, message, code):
    async with ws_server(say_max_chars=40) as srv:
        session, live = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            await ws.send(message)
            seen = await sync(ws, server_ws_until)
            await ws.send(np.zeros(320, np.int16).tobytes())  # still accepts audio afterwards
            seen += await sync(ws, server_ws_until)
            assert not live.closed
    errors = [m for m in seen if m["type"] == "error"]
    assert [e["code"] for e in errors] == [code]
    assert errors[0]["message"] and "\n" not in errors[0]["message"]
    assert ("state", "listening") in [(m["type"], m.get("state")) for m in seen]


async def test_say_without_espeak_is_tts_unavailable(ws_server, server_ws_until):
    async with ws_server(tts=EspeakTts(search_path=False)) as srv:
        session, _ = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            await ws.send(json.dumps({"type": "say", "text": "hello"}))
            seen = await sync(ws, server_ws_until)
    error = next(m for m in seen if m["type"] == "error")
    assert error["code"] == "tts_unavailable" and "espeak-ng" in error["message"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_say_speaks_the_text(ws_server, server_ws_until, server_consume_frames):
    async with ws_server() as srv:
        session, live = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            await ws.send(json.dumps({"type": "say", "text": "Hello there, nice to meet you."}))
            await server_ws_until(ws, lambda m: m["type"] == "state" and m["state"] == "listening")
            consumer = server_consume_frames(live, 150)
            seen = await server_ws_until(ws, lambda m: m["type"] == "playback_finished")
            speaking = await consumer
    assert any(m["type"] == "playback_started" for m in seen)
    assert seen[-1]["interrupted"] is False and seen[-1]["position"] > 1.0
    assert sum(speaking) / FPS == pytest.approx(seen[-1]["position"])


# -- rate limits -----------------------------------------------------------------------------


def test_rate_limiter_drops_excess_and_closes_a_sustained_flood():
    clock = FakeMonotonic()
    limiter = RateLimiter(3, clock, sustain_s=5.0)
    assert [limiter.check() for _ in range(5)] == [Verdict.ACCEPT] * 3 + [Verdict.DROP_AND_WARN, Verdict.DROP]
    clock.now += 1.0
    assert [limiter.check() for _ in range(3)] == [Verdict.ACCEPT] * 3  # a new second
    clock.now += 1.0  # the last second stayed under the limit: the flood ended
    for _ in range(5):
        assert [limiter.check() for _ in range(4)][-1] is Verdict.DROP_AND_WARN
        clock.now += 1.0
    assert [limiter.check() for _ in range(4)][-1] is Verdict.CLOSE
    clock.now += 2.5  # a quiet gap ends any flood
    assert [limiter.check() for _ in range(4)] == [Verdict.ACCEPT] * 3 + [Verdict.DROP_AND_WARN]


async def test_message_flood_is_rate_limited_then_closed(ws_server, server_ws_until):
    clock = FakeMonotonic()
    async with ws_server(monotonic=clock, ws_max_messages_per_s=5) as srv:
        session, live = await open_session(srv)
        async with websockets.connect(events_url(srv, session)) as ws:
            for second in range(5):
                for _ in range(7):
                    await ws.send(json.dumps({"type": "ping"}))
                seen = await server_ws_until(ws, lambda m: m["type"] == "error")
                assert seen[-1]["code"] == "rate_limited"
                assert sum(m["type"] == "pong" for m in seen) == 5
                clock.now += 1.0
            for _ in range(6):
                await ws.send(json.dumps({"type": "ping"}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
        assert closed.value.rcvd.code == 4429
        assert not live.closed  # the session outlives the connection


# -- clients that vanish ------------------------------------------------------------------------


async def test_a_client_vanishing_mid_stream_leaves_the_server_and_other_sessions_fine(
    ws_server, server_ws_until, server_consume_frames, media_speech
):
    async with ws_server() as srv:
        vanishing, live = await open_session(srv)
        other, _ = await open_session(srv)
        async with websockets.connect(events_url(srv, other)) as steady:
            ws = await websockets.connect(events_url(srv, vanishing))
            await ws.send(media_speech.tobytes())
            await ws.send(json.dumps({"type": "speech_end"}))
            await sync(ws, server_ws_until)
            consumer = server_consume_frames(live, 60)
            await server_ws_until(ws, lambda m: m["type"] == "playback_started")
            ws.transport.abort()  # gone without a close frame, events still on their way
            speaking = await consumer
            assert (await sync(steady, server_ws_until))[-1] == {"type": "pong"}
            async with websockets.connect(events_url(srv, vanishing)) as again:  # the session is still there
                assert json.loads(await again.recv())["type"] == "state"
                assert (await sync(again, server_ws_until))[-1] == {"type": "pong"}
            health = (await srv.http.get("/healthz")).json()
    assert sum(speaking) > 25  # playback went on after the client vanished
    assert health["sessions"] == 2
