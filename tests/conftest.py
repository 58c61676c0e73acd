"""Shared pytest fixtures. Each helper appends its own, prefixed by its area (cli_, ...)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path("/work/shared/data")


@pytest.fixture(scope="session")
def cli_portrait_path() -> Path:
    """The shared astronaut portrait (512x512 PNG, one face about 90 px wide)."""
    return SHARED_DATA / "portraits" / "astronaut.png"


@pytest.fixture(scope="session")
def cli_speech_path() -> Path:
    """The shared 2.99 s speech clip (16 kHz mono PCM16 WAV)."""
    return SHARED_DATA / "speech" / "librivox_0880.wav"


@pytest.fixture(scope="session")
def cli_phones_path() -> Path:
    """Phone alignment of ``cli_speech_path``."""
    return SHARED_DATA / "speech" / "librivox_0880.phone.json"


@pytest.fixture(scope="session")
def cli_run():
    """Run a command-line tool as users do, in a fresh interpreter:
    ``cli_run("avatar.render", *args)`` -> CompletedProcess with text stdout/stderr."""

    def run(module: str, *args: object, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def cli_still_video(tmp_path_factory, cli_portrait_path):
    """An MP4 of the still portrait (256x256, 25 fps, 75 frames, frames 5 and 6 black, silent
    audio) written with avatar.video_out. Returns (path, still RGB image, black frame indices)."""
    from avatar.frames import AudioChunk, AvatarFrame, VideoFrame, frame_start_sample
    from avatar.video_out import Mp4Writer
    from model.portrait import load_portrait

    image = load_portrait(cli_portrait_path, size=256)
    black = (5, 6)
    path = tmp_path_factory.mktemp("cli_still") / "still.mp4"
    with Mp4Writer(path, 256, 256, 25.0) as writer:
        for k in range(75):
            start, stop = frame_start_sample(k, 25.0), frame_start_sample(k + 1, 25.0)
            picture = np.zeros_like(image) if k in black else image
            silence = AudioChunk(np.zeros(stop - start, np.float32), pts=start)
            writer.add(AvatarFrame(VideoFrame(picture, start), silence, speaking=False))
    return path, image, black


@pytest.fixture(scope="session")
def engine_speech() -> np.ndarray:
    """The shared 7.1 s speech clip (librivox_0870): int16 (n,) mono samples at 16 kHz."""
    import wave

    with wave.open(str(SHARED_DATA / "speech" / "librivox_0870.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)


@pytest.fixture(scope="session")
def media_speech() -> np.ndarray:
    """The shared 2.99 s speech clip (librivox_0880, speech from 0.21 s): int16 (n,) mono at 16 kHz."""
    import wave

    with wave.open(str(SHARED_DATA / "speech" / "librivox_0880.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)


@pytest.fixture(scope="session")
def media_loopback_ice() -> None:
    """Pin aioice's host candidates to 127.0.0.1 for this test process, so aiortc
    peers connect over loopback only (no STUN, no external interface)."""
    from server.webrtc import pin_ice_host_addresses

    pin_ice_host_addresses(["127.0.0.1"])


# -- server fixtures --------------------------------------------------------------


class _ServerRecords:
    """What the generators made by ``server_generators.factory`` were asked to do:
    ``prepare_calls`` (count) and every ``motions`` seen by ``generate``."""

    def __init__(self) -> None:
        self.prepare_calls = 0
        self.motions: list = []


@pytest.fixture
def server_generators():
    """A recording fake generator (isolates the server from the animator): it
    subclasses the real Generator, counts ``prepare`` calls and records the motion
    of every ``generate`` call; frames are the portrait shrunk to 32x32. Returns
    the shared records, with ``.factory`` (a generator_factory for create_app)."""
    from model.base import Generator, PreparedPortrait

    records = _ServerRecords()

    class RecordingGenerator(Generator):
        name = "recording"
        version = "1"
        fps = 25.0
        window_frames = 2
        lookahead_frames = 1
        context_frames = 2

        def prepare(self, image):
            records.prepare_calls += 1
            small = np.ascontiguousarray(image[:: max(1, image.shape[0] // 32), :: max(1, image.shape[1] // 32)][:32, :32])
            return PreparedPortrait(arrays={"image": small}, meta={"generator": self.name})

        def generate(self, prepared, window, motion, state):
            records.motions.append(motion)
            frames = np.repeat(prepared.arrays["image"][None], window.num_frames, axis=0)
            return frames, (state or 0) + 1

    records.factory = RecordingGenerator
    return records


@pytest.fixture
def server_settings(tmp_path):
    """Settings for a test server: ``server_settings(**overrides)`` (ICE pinned to
    loopback; generators in the server's process, where the recording fake can count;
    no load admission, whose input, the machine's load, tests do not control)."""
    import dataclasses

    from server.config import Settings

    def make(**overrides):
        return dataclasses.replace(Settings(ice_host_addresses=("127.0.0.1",), generator_processes=False, admit_by_load=False), **overrides)

    return make


class _RunningServer:
    """A server app running in uvicorn on a loopback port of the test's event loop."""

    def __init__(self, app, port: int, client) -> None:
        self.app = app
        self.port = port
        self.http = client  # httpx.AsyncClient with base_url set

    @property
    def manager(self):
        return self.app.state.server.manager

    @property
    def store(self):
        return self.app.state.server.store

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server_running():
    """``async with server_running(app) as srv``: serve ``app`` with uvicorn on a
    free loopback port inside the test's event loop (startup done on entry,
    lifespan shutdown on exit). ``srv.http`` is an httpx.AsyncClient for it."""
    import contextlib
    import socket

    import httpx
    import uvicorn

    @contextlib.asynccontextmanager
    async def run(app):
        import asyncio

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                # Connections wait in the listen backlog until startup is done: the answer means "ready".
                assert (await client.get("/healthz")).status_code == 200
                yield _RunningServer(app, port, client)
        finally:
            server.should_exit = True
            await task
            sock.close()

    return run


@pytest.fixture(scope="session")
def server_redis_binary() -> str:
    """Path of redis-server; skips when it is not installed."""
    import shutil

    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    return path


@pytest.fixture
def server_redis_process(server_redis_binary):
    """A private redis-server on a free loopback port, no persistence; yields
    (url, process). Ready on entry (its log said so); killed on exit."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [server_redis_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--loglevel", "notice"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in process.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail(f"redis-server on port {port} exited without becoming ready")
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.fixture(scope="session")
def browser_mic_wav(tmp_path_factory) -> Path:
    """The fake microphone's input for Chromium: the 7.1 s librivox_0870 speech
    then 1 s of silence (so each loop of the capture is one utterance), written
    as 16-bit PCM mono WAV at 16 kHz in a temp dir."""
    import wave

    with wave.open(str(SHARED_DATA / "speech" / "librivox_0870.wav"), "rb") as source:
        rate = source.getframerate()
        speech = np.frombuffer(source.readframes(source.getnframes()), dtype=np.int16)
        if source.getnchannels() != 1:
            speech = speech.reshape(-1, source.getnchannels())[:, 0]
    path = tmp_path_factory.mktemp("browser") / "mic.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.concatenate([speech, np.zeros(rate, np.int16)]).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="session")
def browser_artifact_dir() -> Path:
    """out/test-artifacts in the repository (created): screenshots and logs of the browser test."""
    path = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def server_ws_until():
    """``await server_ws_until(ws, predicate, timeout=20)``: JSON messages received
    on a websockets client connection up to and including the first for which
    ``predicate(message)`` is true (TimeoutError after ``timeout`` seconds)."""
    import asyncio
    import json

    async def until(ws, predicate, timeout: float = 20) -> list[dict]:
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                message = json.loads(await ws.recv())
                seen.append(message)
                if predicate(message):
                    return seen

    return until


@pytest.fixture
def server_consume_frames():
    """``server_consume_frames(live, count)``: a task reading ``count`` frames of a
    live session's avatar (what a media peer would do); returns the frames'
    ``speaking`` flags."""
    import asyncio

    def start(live, count: int) -> asyncio.Task:
        async def consume() -> list[bool]:
            speaking = []
            async for frame in live.avatar:
                speaking.append(frame.speaking)
                if len(speaking) == count:
                    break
            return speaking

        return asyncio.create_task(consume())

    return start
