"""The HTTP API: portraits and their cache, sessions and their limits, auth,
errors, health, metrics, timeouts, shutdown, and a Redis that goes away.

Servers run in uvicorn on loopback inside the test's event loop
(``server_running``) with a recording fake generator (``server_generators``),
except where the real animator's face check is the point.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import websockets
from PIL import Image

from avatar.clock import VirtualClock
from avatar.frames import AudioChunk
from server.app import create_app
from server.config import DEFAULT_PORTRAIT, Settings, SettingsError
from server.load import CpuMeter, CpuReading

ERROR_KEYS = {"code", "message"}


class FakeMonotonic:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header (with a valid CRC) claims ``width`` x ``height``
    pixels: decoding it would fail, so only a header check can reject it by size."""
    data = bytearray(png_bytes(1, 1))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert "Traceback" not in response.text
    return body["error"]


async def upload(srv, data: bytes, field: str = "image", **headers):
    return await srv.http.post("/v1/portraits", files={field: ("face.png", data, "image/png")}, headers=headers)


async def new_session(srv, **body):
    response = await srv.http.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def app_with(server_settings, server_generators):
    """``app_with(**settings_overrides, **create_app_kwargs)``: an app on the recording generator."""
    app_kwargs = ("clock_factory", "store_factory", "tts", "monotonic", "reaper_interval_s", "generator_factory",
                  "cpu_meter")

    def make(**overrides):
        kwargs = {k: overrides.pop(k) for k in app_kwargs if k in overrides}
        kwargs.setdefault("generator_factory", server_generators.factory)
        return create_app(server_settings(**overrides), **kwargs)

    return make


# -- portraits ------------------------------------------------------------------------


async def test_upload_prepares_once_and_sessions_reuse_the_cache(app_with, server_running, server_generators):
    data = png_bytes(160, 200)
    async with server_running(app_with()) as srv:
        first = await upload(srv, data)
        assert first.status_code == 201
        assert first.json() == {"portrait_id": hashlib.sha256(data).hexdigest(), "width": 160, "height": 200}
        again = await upload(srv, data)
        assert again.status_code == 201 and again.json() == first.json()
        await new_session(srv, portrait_id=first.json()["portrait_id"])
        await new_session(srv, portrait_id=first.json()["portrait_id"])
        assert server_generators.prepare_calls == 1
        other = await upload(srv, png_bytes(160, 200, seed=1))
        assert other.json()["portrait_id"] != first.json()["portrait_id"]
        assert server_generators.prepare_calls == 2


async def test_concurrent_uploads_of_one_image_prepare_it_once(app_with, server_running, server_generators):
    data = png_bytes(128, 128)
    async with server_running(app_with()) as srv:
        answers = await asyncio.gather(*(upload(srv, data) for _ in range(4)))
    assert [a.status_code for a in answers] == [201] * 4
    assert server_generators.prepare_calls == 1


async def test_default_portrait_is_prepared_once(app_with, server_running, server_generators):
    async with server_running(app_with()) as srv:
        await new_session(srv)
        await new_session(srv)
    assert server_generators.prepare_calls == 1


async def test_real_animator_accepts_a_face_and_refuses_a_faceless_image(server_settings, server_running):
    from model.animator import CpuAnimator

    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    async with server_running(create_app(server_settings(), generator_factory=CpuAnimator)) as srv:
        accepted = await upload(srv, DEFAULT_PORTRAIT.read_bytes())
        refused = await upload(srv, buffer.getvalue())
    assert accepted.status_code == 201 and accepted.json()["width"] == 512
    assert refused.status_code == 422
    assert error_of(refused)["code"] == "no_face"


async def test_upload_over_the_limit_is_refused_while_reading(app_with, server_running):
    async with server_running(app_with(max_upload_bytes=4096)) as srv:
        declared = await upload(srv, png_bytes(64, 64) + b"\0" * 40_000)

        async def stream():  # no Content-Length: the limit must hold while reading
            yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\n\r\n"
            for _ in range(10):
                yield b"\0" * 4096

        chunked = await srv.http.post(
            "/v1/portraits", content=stream(), headers={"Content-Type": "multipart/form-data; boundary=b"}
        )
        just_over = await upload(srv, b"\x89PNG" + b"\0" * 4093)
    for response in (declared, chunked, just_over):
        assert response.status_code == 413
        assert error_of(response)["code"] == "upload_too_large"
        assert "4096" in error_of(response)["message"]


@pytest.mark.parametrize(
    "data, code",
    [
        (b"this is not an image", "not_an_image"),
        (png_header_claiming(30_000, 30_000), "too_many_pixels"),
        (png_bytes(100, 300), "too_small"),
    ],
    ids=["text", "pixel-bomb-header", "small"],
)
async def test_unusable_images_get_422_with_the_reason(app_with, server_running, server_generators, data, code):
    async with server_running(app_with()) as srv:
        response = await upload(srv, data)
    assert response.status_code == 422
    assert error_of(response)["code"] == code
    assert server_generators.prepare_calls == 0


async def test_upload_needs_a_multipart_image_field(app_with, server_running):
    async with server_running(app_with()) as srv:
        wrong_field = await upload(srv, png_bytes(128, 128), field="photo")
        not_a_form = await srv.http.post("/v1/portraits", json={"image": "abc"})
    assert error_of(wrong_field)["code"] == "missing_image" and wrong_field.status_code == 422
    assert error_of(not_a_form)["code"] == "not_multipart" and not_a_form.status_code == 422


# -- sessions -----------------------------------------------------------------------


async def test_session_creation_answers_urls_and_a_strong_token(app_with, server_running):
    async with server_running(app_with()) as srv:
        first = await new_session(srv, motion={"face": 0.2, "body": 0.9}, fps=30)
        second = await new_session(srv)
        live = srv.manager.get(first["session_id"])
        assert live is not None and live.fps == 30.0 and live.motion.face == 0.2
        record = await srv.store.get_session(first["session_id"])
    sid = first["session_id"]
    assert first["offer_url"] == f"/v1/sessions/{sid}/offer"
    assert first["events_url"] == f"/v1/sessions/{sid}/events"
    assert first["ice_servers"] == []
    assert len(first["token"]) >= 43 and first["token"] != second["token"]  # 32 random bytes, base64
    assert record["id"] == sid and record["fps"] == 30.0


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"portrait_id": "0" * 64}, 404, "portrait_not_found"),
        ({"portrait_id": "not-hex"}, 422, "invalid_request"),
        ({"generator": "diffusion"}, 422, "invalid_request"),
        ({"fps": 61}, 422, "invalid_request"),
        ({"fps": 9.5}, 422, "invalid_request"),
        ({"motion": {"face": 1.5}}, 422, "invalid_request"),
        ({"surprise": 1}, 422, "invalid_request"),
    ],
)
async def test_bad_session_requests(app_with, server_running, body, status, code):
    async with server_running(app_with()) as srv:
        response = await srv.http.post("/v1/sessions", json=body)
        assert len(srv.manager) == 0
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    assert "\n" not in error["message"]


async def test_unknown_generator_error_names_the_field(app_with, server_running):
    async with server_running(app_with()) as srv:
        response = await srv.http.post("/v1/sessions", json={"generator": "diffusion"})
    assert "generator" in error_of(response)["message"] and "animator" in error_of(response)["message"]


async def test_session_limit_answers_503_with_retry_after(app_with, server_running):
    async with server_running(app_with(max_sessions=2)) as srv:
        await new_session(srv)
        held = await new_session(srv)
        busy = await srv.http.post("/v1/sessions", json={})
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) > 0
        assert error_of(busy)["code"] == "too_many_sessions"
        deleted = await srv.http.delete(f"/v1/sessions/{held['session_id']}", headers=bearer(held["token"]))
        assert deleted.status_code == 204
        assert (await srv.http.post("/v1/sessions", json={})).status_code == 201


def test_session_limits_default_to_load_admission_under_a_cap_of_four_per_core():
    cores = len(os.sched_getaffinity(0))
    assert Settings().max_sessions == Settings.from_env({}).max_sessions == 4 * cores
    assert Settings().admit_by_load and Settings().cpu_headroom == 0.3
    env = Settings.from_env({"AVATAR_MAX_SESSIONS": "7", "AVATAR_ADMIT_BY_LOAD": "0", "AVATAR_CPU_HEADROOM": "0.5"})
    assert (env.max_sessions, env.admit_by_load, env.cpu_headroom) == (7, False, 0.5)
    with pytest.raises(SettingsError, match="AVATAR_MAX_SESSIONS"):
        Settings.from_env({"AVATAR_MAX_SESSIONS": "0"})
    with pytest.raises(SettingsError, match="AVATAR_CPU_HEADROOM must be a number of cores"):
        Settings.from_env({"AVATAR_CPU_HEADROOM": "-1"})


class ScriptedCpu(CpuMeter):
    """A CpuMeter on a 2-core machine whose load the test sets: this server uses
    ``server_rate`` cores and other processes ``other_rate``, from time 0."""

    def __init__(self) -> None:
        super().__init__()
        self.cores = 2.0
        self.server_rate = self.other_rate = 0.0
        self._last: CpuReading | None = None

    def read(self, at: float) -> CpuReading:
        last = self._last or CpuReading(at, 0.0, 0.0)
        seconds = at - last.at
        self._last = CpuReading(at, last.busy + (self.server_rate + self.other_rate) * seconds,
                                last.server + self.server_rate * seconds)
        return self._last


async def test_load_admission_refuses_the_session_the_cpu_cannot_carry(app_with, server_running):
    clock, cpu = FakeMonotonic(), ScriptedCpu()
    app = app_with(admit_by_load=True, monotonic=clock, cpu_meter=cpu, reaper_interval_s=3600)

    async def load_for(seconds: int) -> None:
        for _ in range(seconds):
            clock.now += 1
            await srv.manager.reap()

    async with server_running(app) as srv:
        first = await new_session(srv)
        cpu.server_rate, cpu.other_rate = 0.6, 0.3  # a session costs 0.6 core here; 0.3 core of other work
        await load_for(8)
        # 0.3 other + 2 x 0.6 + 0.3 headroom <= 2 cores: a second session fits.
        second = await new_session(srv)
        cpu.server_rate = 1.2
        await load_for(8)
        refused = await srv.http.post("/v1/sessions", json={})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        error = error_of(refused)
        assert error["code"] == "cpu_busy" and "2 session(s) at about 0.60 core" in error["message"]
        metrics = (await srv.http.get("/metrics")).text
        assert "avatar_free_sessions 0.0" in metrics and "avatar_session_cpu_cores 0.6" in metrics
        await srv.http.delete(f"/v1/sessions/{second['session_id']}", headers=bearer(second["token"]))
        assert (await srv.http.post("/v1/sessions", json={})).status_code == 201
        assert srv.manager.get(first["session_id"]) is not None


async def test_api_key_guards_uploads_and_session_creation(app_with, server_running):
    async with server_running(app_with(api_key="s3cret-key")) as srv:
        missing = await srv.http.post("/v1/sessions", json={})
        wrong = await srv.http.post("/v1/sessions", json={}, headers=bearer("nope"))
        upload_missing = await upload(srv, png_bytes(128, 128))
        by_bearer = await srv.http.post("/v1/sessions", json={}, headers=bearer("s3cret-key"))
        by_header = await srv.http.post("/v1/sessions", json={}, headers={"X-API-Key": "s3cret-key"})
        upload_ok = await upload(srv, png_bytes(128, 128), **{"X-API-Key": "s3cret-key"})
        health = await srv.http.get("/healthz")
    assert (missing.status_code, error_of(missing)["code"]) == (401, "missing_api_key")
    assert (wrong.status_code, error_of(wrong)["code"]) == (401, "bad_api_key")
    assert upload_missing.status_code == 401
    assert by_bearer.status_code == by_header.status_code == upload_ok.status_code == 201
    assert health.status_code == 200


async def test_delete_checks_the_token_and_frees_everything(app_with, server_running):
    async with server_running(app_with()) as srv:
        session = await new_session(srv)
        sid, url = session["session_id"], f"/v1/sessions/{session['session_id']}"
        live = srv.manager.get(sid)
        no_token = await srv.http.delete(url)
        wrong = await srv.http.delete(url, headers=bearer("x" * 43))
        unknown = await srv.http.delete("/v1/sessions/nope", headers=bearer(session["token"]))
        assert (no_token.status_code, wrong.status_code, unknown.status_code) == (401, 403, 404)
        assert srv.manager.get(sid) is live
        deleted = await srv.http.delete(url, headers=bearer(session["token"]))
        again = await srv.http.delete(url, headers=bearer(session["token"]))
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert again.status_code == 404
        assert srv.manager.get(sid) is None and live.closed
        assert await srv.store.get_session(sid) is None
        with pytest.raises(RuntimeError, match="closed"):
            await live.avatar.push_audio(AudioChunk(np.zeros(160, np.int16)))


async def test_offer_validation(app_with, server_running):
    async with server_running(app_with()) as srv:
        session = await new_session(srv)
        url = session["offer_url"]
        offer = {"sdp": "v=0\r\n", "type": "offer"}
        missing = await srv.http.post(url, json=offer)
        wrong = await srv.http.post(url, json=offer, headers=bearer("x" * 43))
        unknown = await srv.http.post("/v1/sessions/nope/offer", json=offer, headers=bearer(session["token"]))
        not_sdp = await srv.http.post(url, json={"sdp": "hello", "type": "offer"}, headers=bearer(session["token"]))
        no_media = await srv.http.post(url, json=offer, headers=bearer(session["token"]))
        answer_type = await srv.http.post(url, json={"sdp": "v=0", "type": "answer"}, headers=bearer(session["token"]))
        still_live = srv.manager.get(session["session_id"]) is not None
    assert [r.status_code for r in (missing, wrong, unknown)] == [401, 403, 404]
    assert (not_sdp.status_code, error_of(not_sdp)["code"]) == (400, "bad_sdp")
    assert (no_media.status_code, error_of(no_media)["code"]) == (400, "bad_sdp")
    assert answer_type.status_code == 422
    assert still_live


async def test_second_offer_while_a_peer_is_connected_is_409(app_with, server_running):
    from server.webrtc import MediaPeer

    class ConnectedPeer(MediaPeer):
        """A peer that reports a connection (isolates the conflict check from ICE)."""

        @property
        def connected(self) -> bool:
            return True

    async with server_running(app_with()) as srv:
        session = await new_session(srv)
        live = srv.manager.get(session["session_id"])
        live.peer = ConnectedPeer(live.avatar, on_closed=lambda reason: None, fps=live.fps)
        response = await srv.http.post(
            session["offer_url"], json={"sdp": "v=0\r\n", "type": "offer"}, headers=bearer(session["token"])
        )
    assert (response.status_code, error_of(response)["code"]) == (409, "peer_connected")


async def test_offer_connects_a_webrtc_client_and_delete_closes_it(app_with, server_running, media_loopback_ice):
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    async with server_running(app_with()) as srv:
        session = await new_session(srv)
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        connected = asyncio.Event()
        tracks: list = []
        client.on("track", tracks.append)

        @client.on("connectionstatechange")
        def _state() -> None:
            if client.connectionState == "connected":
                connected.set()

        client.addTransceiver("video", direction="recvonly")
        client.addTransceiver("audio", direction="recvonly")
        await client.setLocalDescription(await client.createOffer())  # aiortc gathers all candidates here
        try:
            response = await srv.http.post(
                session["offer_url"], json={"sdp": client.localDescription.sdp, "type": "offer"},
                headers=bearer(session["token"]),
            )
            assert response.status_code == 200, response.text
            assert response.json()["type"] == "answer" and "a=candidate" in response.json()["sdp"]
            await client.setRemoteDescription(RTCSessionDescription(**response.json()))
            await asyncio.wait_for(connected.wait(), 20)
            video = next(t for t in tracks if t.kind == "video")
            frame = await asyncio.wait_for(video.recv(), 20)
            assert (frame.width, frame.height) == (32, 32)
            live = srv.manager.get(session["session_id"])
            assert live.peer is not None and live.peer.connected
            deleted = await srv.http.delete(f"/v1/sessions/{session['session_id']}", headers=bearer(session["token"]))
            assert deleted.status_code == 204 and not live.peer.connected
        finally:
            await client.close()


async def test_ice_failure_ends_the_session_and_tells_the_client(app_with, server_running, media_loopback_ice):
    from aiortc import RTCConfiguration, RTCPeerConnection

    async with server_running(app_with(ice_timeout_s=0.5)) as srv:
        session = await new_session(srv)
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        client.addTransceiver("video", direction="recvonly")
        await client.setLocalDescription(await client.createOffer())
        await client.close()  # its candidates now point at a closed socket: no check can succeed
        async with websockets.connect(srv.ws_url(f"{session['events_url']}?token={session['token']}")) as ws:
            response = await srv.http.post(session["offer_url"], json={"sdp": client.localDescription.sdp,
                                                                      "type": "offer"},
                                           headers=bearer(session["token"]))
            assert response.status_code == 200, response.text
            ended = [event for event in map(json.loads, [m async for m in ws])
                     if event.get("type") == "error" and event["code"] == "session_ended"]
        assert len(ended) == 1 and "ice_failed" in ended[0]["message"]
        assert ws.close_code == 1000 and srv.manager.get(session["session_id"]) is None
        gone = await srv.http.delete(f"/v1/sessions/{session['session_id']}", headers=bearer(session["token"]))
        assert gone.status_code == 404


# -- health, metrics, errors, static files ------------------------------------------


async def test_health_and_metrics(app_with, server_running):
    async with server_running(app_with()) as srv:
        await new_session(srv)
        health = (await srv.http.get("/healthz")).json()
        metrics = await srv.http.get("/metrics")
    assert health == {"status": "ok", "sessions": 1, "store": "memory", "store_ok": True}
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "avatar_sessions 1.0" in text
    for name in (
        "avatar_time_to_first_frame_seconds_bucket",
        "avatar_audio_to_lip_seconds_bucket",
        "avatar_interrupt_latency_seconds_bucket",
        "avatar_rtf ",
        "avatar_dropped_frames_total",
    ):
        assert name in text


async def test_unknown_routes_and_methods_answer_json_errors(app_with, server_running):
    async with server_running(app_with()) as srv:
        missing = await srv.http.get("/v1/nothing")
        method = await srv.http.put("/v1/sessions")
        bad_json = await srv.http.post("/v1/sessions", content=b"{nope", headers={"Content-Type": "application/json"})
        static_missing = await srv.http.get("/client_demo/nope.js")
    assert (missing.status_code, error_of(missing)["code"]) == (404, "not_found")
    assert (method.status_code, error_of(method)["code"]) == (405, "method_not_allowed")
    assert (bad_json.status_code, error_of(bad_json)["code"]) == (422, "invalid_request")
    assert static_missing.status_code == 404 and error_of(static_missing)


async def test_internal_errors_reach_the_client_without_details(app_with, server_running, server_generators):
    made = []

    def failing_factory():
        made.append(1)
        if len(made) > 1:  # the first generator prepares portraits; sessions' generators fail
            raise RuntimeError("secret internal detail")
        return server_generators.factory()

    async with server_running(app_with(generator_factory=failing_factory)) as srv:
        response = await srv.http.post("/v1/sessions", json={})
        health = await srv.http.get("/healthz")
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"
    assert "secret" not in response.text
    assert health.json()["sessions"] == 0


async def test_index_page_and_static_files(app_with, server_running):
    from server.app import CLIENT_DEMO

    if not (CLIENT_DEMO / "index.html").is_file():
        pytest.skip("client_demo/index.html is not there yet")
    async with server_running(app_with()) as srv:
        index = await srv.http.get("/")
        style = await srv.http.get("/client_demo/style.css") if (CLIENT_DEMO / "style.css").is_file() else None
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert index.content == (CLIENT_DEMO / "index.html").read_bytes()
    if style is not None:
        assert style.status_code == 200


async def test_cors_allows_only_configured_origins(app_with, server_running):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    async with server_running(app_with(cors_origins=("https://app.example",))) as srv:
        allowed = await srv.http.options("/v1/sessions", headers={"Origin": "https://app.example", **preflight})
        refused = await srv.http.options("/v1/sessions", headers={"Origin": "https://evil.example", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
    assert "access-control-allow-origin" not in refused.headers


# -- session life ----------------------------------------------------------------------


async def test_idle_sessions_and_old_sessions_are_reaped(app_with, server_running):
    clock = FakeMonotonic()
    app = app_with(monotonic=clock, idle_timeout_s=60, max_duration_s=600, reaper_interval_s=3600)
    async with server_running(app) as srv:
        idle = await new_session(srv)
        watched = await new_session(srv)
        live_idle = srv.manager.get(idle["session_id"])
        async with websockets.connect(srv.ws_url(f"{watched['events_url']}?token={watched['token']}")) as ws:
            await ws.recv()  # connected: the state event
            clock.now += 59
            assert await srv.manager.reap() == []
            clock.now += 2
            assert await srv.manager.reap() == [idle["session_id"]]
            assert live_idle.closed and await srv.store.get_session(idle["session_id"]) is None
            clock.now += 540  # 601 s old: over max duration even with a WebSocket attached
            assert await srv.manager.reap() == [watched["session_id"]]
            ended = [json_message async for json_message in _until_closed(ws)]
        assert any(m.get("code") == "session_ended" and "maximum duration" in m["message"] for m in ended)
        assert len(srv.manager) == 0


async def _until_closed(ws):
    import json

    try:
        while True:
            yield json.loads(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed:
        return


async def test_shutdown_closes_every_session(app_with, server_running):
    async with server_running(app_with()) as srv:
        lives = [srv.manager.get((await new_session(srv))["session_id"]) for _ in range(2)]
        assert not any(live.closed for live in lives)
    assert all(live.closed for live in lives)
    with pytest.raises(RuntimeError, match="closed"):
        lives[0].avatar.end_of_speech()


# -- a Redis that goes away -------------------------------------------------------------


async def test_sessions_survive_redis_going_away_and_new_ones_get_503(
    app_with, server_running, server_redis_process, server_generators, server_ws_until, server_consume_frames
):
    url, redis_process = server_redis_process
    data = png_bytes(128, 128)
    clock = FakeMonotonic()
    first_app = app_with(redis_url=url)
    second_app = app_with(redis_url=url, clock_factory=VirtualClock, monotonic=clock, reaper_interval_s=3600)
    async with server_running(first_app) as one, server_running(second_app) as two:
        portrait_id = (await upload(one, data)).json()["portrait_id"]
        # Another server process on the same Redis uses the prepared portrait as is.
        session = await new_session(two, portrait_id=portrait_id)
        assert server_generators.prepare_calls == 1
        assert (await two.http.get("/healthz")).json()["store"] == "redis"
        live = two.manager.get(session["session_id"])
        async with websockets.connect(two.ws_url(f"{session['events_url']}?token={session['token']}")) as ws:
            redis_process.kill()
            redis_process.wait()
            health = (await two.http.get("/healthz")).json()
            refused = await two.http.post("/v1/sessions", json={"portrait_id": portrait_id})
            refused_upload = await upload(two, data)
            # The live session goes on: audio in, frames out, events back.
            await ws.send(np.zeros(16000 // 2, np.int16).tobytes())
            await ws.send('{"type": "speech_end"}')
            await ws.send('{"type": "ping"}')
            await server_ws_until(ws, lambda m: m["type"] == "pong")  # messages are handled in order
            consumer = server_consume_frames(live, 40)
            seen = await server_ws_until(ws, lambda m: m["type"] == "playback_finished")
            await consumer
            await ws.send('{"type": "ping"}')
            await server_ws_until(ws, lambda m: m["type"] == "pong")
            clock.now += 60  # the session's store record is due for a refresh, which fails
            assert await two.manager.reap() == [] and not live.closed
        deleted = await two.http.delete(f"/v1/sessions/{session['session_id']}", headers=bearer(session["token"]))
    assert health["store"] == "redis" and health["store_ok"] is False
    assert refused.status_code == 503 and error_of(refused)["code"] == "store_unavailable"
    assert "Redis" in error_of(refused)["message"] and "unreachable" in error_of(refused)["message"]
    assert refused_upload.status_code == 503 and error_of(refused_upload)["code"] == "store_unavailable"
    assert any(m["type"] == "playback_started" for m in seen)
    assert deleted.status_code == 204 and live.closed


