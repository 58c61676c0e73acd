"""The Python agent client (server/client.py) against the real server app, over
loopback WebRTC (host candidates pinned to 127.0.0.1, no STUN): the CPU
animator's frames arrive at the portrait's size with the voice, speech moves
the mouth, an interrupt brings silence back quickly, and the recording keeps
audio and video in sync.

One uvicorn server on a free loopback port serves the whole module (the
bundled portrait is prepared once); each test opens its own session.
"""
from __future__ import annotations

import asyncio
import hashlib
import socket
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import pytest_asyncio
import uvicorn
from PIL import Image
from scipy.signal import resample_poly

from avatar.audio_file import load_audio, to_mono_16k
from avatar.lipsync import evaluate, measure_video
from model.face_mesh import FaceTracker, mouth_aperture
from server.app import create_app
from server.client import AvatarClient, AvatarClientError, Mp4Recorder, pcm16_bytes
from server.config import DEFAULT_PORTRAIT, Settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPEECH = Path("/work/shared/data/speech/librivox_0880.wav")  # 2.99 s, speech from 0.21 s
LOUD_PEAK = 2000  # received int16 audio louder than this is voice
SILENT_PEAK = 200


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def media_app_url(media_loopback_ice):
    """Base URL of the server app (real CpuAnimator, in-process store, ICE host
    candidates 127.0.0.1) running in uvicorn inside this module's event loop."""
    app = create_app(Settings(ice_host_addresses=("127.0.0.1",), max_sessions=3, admit_by_load=False))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    warm = AvatarClient(base_url)  # connections wait in the backlog until startup is done
    await warm.create_session()  # prepares the bundled portrait once for the module
    await warm.close()
    yield base_url
    server.should_exit = True
    await task
    sock.close()


@pytest.fixture(scope="module")
def speech_24k() -> np.ndarray:
    """The speech clip as int16 at 24 kHz, as a TTS engine might produce it."""
    with wave.open(str(SPEECH), "rb") as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    return np.clip(resample_poly(samples.astype(np.float64), 3, 2), -32768, 32767).astype(np.int16)


class Collected:
    """Frames of a client's subscribed tracks, with arrival times (loop seconds) and
    media times (s): video (arrival, media, RGB image), audio (arrival, media, int16 peak)."""

    def __init__(self, client: AvatarClient) -> None:
        self.video: list[tuple[float, float, np.ndarray]] = []
        self.audio: list[tuple[float, float, int]] = []
        self.changed = asyncio.Condition()
        self._tasks = [asyncio.create_task(self._read(client.subscribe(kind))) for kind in ("video", "audio")]

    async def _read(self, track) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await track.recv()
            arrival, media = loop.time(), float(frame.pts * frame.time_base)
            if track.kind == "video":
                self.video.append((arrival, media, frame.to_ndarray(format="rgb24")))
            else:
                self.audio.append((arrival, media, int(np.abs(frame.to_ndarray()).max())))
            async with self.changed:
                self.changed.notify_all()

    async def wait_until(self, predicate, timeout: float = 15.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()


async def push_speech(client: AvatarClient, samples: np.ndarray, rate: int, chunk_s: float = 0.1) -> None:
    """Stream PCM in TTS-sized chunks, all at once (faster than real time), then speech_end."""
    step = round(rate * chunk_s)
    for start in range(0, len(samples), step):
        await client.push_pcm(pcm16_bytes(samples[start:start + step]), rate)
    await client.speech_end()


def apertures(images: list[np.ndarray]) -> np.ndarray:
    with FaceTracker() as tracker:
        values = [tracker.track(image) for image in images]
    return np.array([np.nan if v is None else mouth_aperture(v) for v in values])


async def test_speech_reaches_the_receiver_as_voice_and_moving_lips(media_app_url, speech_24k, tmp_path):
    portrait = np.asarray(Image.open(DEFAULT_PORTRAIT).convert("RGB"))
    async with AvatarClient(media_app_url) as client:
        await client.create_session(fps=25)
        events = client.events()
        await client.record(tmp_path / "speech.mp4")
        await client.connect()
        got = Collected(client)
        await got.wait_until(lambda: len(got.video) >= 10 and len(got.audio) >= 20)
        assert got.video[0][2].shape == portrait.shape  # the portrait's size, not a default
        idle_peak = max(peak for _, _, peak in got.audio)
        idle_count = len(got.video)

        await push_speech(client, speech_24k, 24000)
        started = await events.wait_for("playback_started", timeout_s=10)
        finished = await events.wait_for("playback_finished", timeout_s=15)
        await got.wait_until(lambda: len(got.video) >= idle_count + 90)
        path = await client.stop_recording()
        got.stop()

    assert started["pts"] >= 0
    assert finished["interrupted"] is False and finished["position"] == pytest.approx(2.99, abs=0.2)
    assert idle_peak < SILENT_PEAK  # idle frames carry silence
    voiced = [media for _, media, peak in got.audio if peak > LOUD_PEAK]
    assert voiced and voiced[-1] - voiced[0] > 2.0  # the clip's voice, not a click
    # The mouth: open wider while the voice plays than it ever is while idle.
    speaking = [image for _, media, image in got.video if voiced[0] <= media <= voiced[-1]]
    idle = [image for _, _, image in got.video[:idle_count]]
    speaking_aperture, idle_aperture = apertures(speaking), apertures(idle)
    assert np.nanmax(speaking_aperture) > 2 * np.nanmax(idle_aperture) + 0.02
    assert np.nanstd(speaking_aperture) > 0.01

    # The recording: H.264 at the session's rate and the voice, in sync by the built-in lip-sync measure.
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.width, video.height) == (portrait.shape[1], portrait.shape[0])
        assert float(video.average_rate) == pytest.approx(25.0, rel=0.01)
        assert audio.rate == 48000
    measured = measure_video(path)
    samples, rate = load_audio(path)  # the recording's own audio: what avatar-eval REC --audio REC measures
    report, _ = evaluate(measured.aperture, measured.missing, to_mono_16k(samples, rate), measured.fps)
    assert abs(report.lag_ms) <= 40


async def test_interrupt_brings_silence_and_a_closed_mouth_back_quickly(media_app_url):
    with wave.open("/work/shared/data/speech/librivox_0870.wav", "rb") as wav:  # 7.1 s
        long_speech = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    loop = asyncio.get_running_loop()
    async with AvatarClient(media_app_url) as client:
        await client.create_session()
        events = client.events()
        await client.connect()
        got = Collected(client)
        await push_speech(client, long_speech, 16000)
        await events.wait_for("playback_started", timeout_s=10)
        await got.wait_until(lambda: sum(peak > LOUD_PEAK for _, _, peak in got.audio) >= 25)

        interrupted_at = loop.time()
        await client.interrupt()
        finished = await events.wait_for("playback_finished", timeout_s=5)
        await got.wait_until(lambda: got.audio[-1][0] > interrupted_at + 1.0)
        got.stop()

    assert finished["interrupted"] is True and 0 < finished["position"] < 7.0
    # At the receiver: the voice stops within 100 ms of the interrupt, plus the 80 ms (4 packets)
    # that aiortc's audio jitter buffer holds before decoding, plus slack for a busy machine.
    last_voice = max(arrival for arrival, _, peak in got.audio if peak > SILENT_PEAK)
    assert last_voice - interrupted_at <= 0.1 + 0.08 + 0.07
    later = [image for arrival, _, image in got.video if arrival > interrupted_at + 0.3]
    spoken = [image for arrival, _, image in got.video if arrival <= interrupted_at]
    assert np.nanmax(apertures(later)) < 0.5 * np.nanmax(apertures(spoken[-50:]))


async def test_uploaded_portrait_sets_the_video_size_and_a_microphone_drives_the_avatar(media_app_url, tmp_path):
    from aiortc.contrib.media import MediaPlayer

    astronaut = Image.open("/work/shared/data/portraits/astronaut.png").convert("RGB").crop((32, 0, 416, 448))
    path = tmp_path / "astronaut-crop.png"
    astronaut.save(path)
    async with AvatarClient(media_app_url) as client:
        portrait_id = await client.upload_portrait(path)
        assert portrait_id == hashlib.sha256(path.read_bytes()).hexdigest()
        await client.create_session(portrait_id=portrait_id)
        events = client.events()
        player = MediaPlayer(str(SPEECH))
        await client.connect(microphone=player.audio)
        got = Collected(client)
        await got.wait_until(lambda: len(got.video) >= 2)
        assert got.video[0][2].shape == (448, 384, 3)
        while (await events.wait_for("state", timeout_s=10))["state"] != "speaking":
            pass
        player.audio.stop()
        got.stop()


async def test_server_errors_become_clear_exceptions(media_app_url):
    async with AvatarClient(media_app_url) as client:
        with pytest.raises(AvatarClientError) as caught:
            await client.create_session(portrait_id="0" * 64)
        assert caught.value.status == 404 and caught.value.code == "portrait_not_found"
        assert "upload it again" in str(caught.value)
        with pytest.raises(AvatarClientError) as caught:
            await client.create_session(fps=500)
        assert caught.value.status == 422 and "fps" in caught.value.message
        with pytest.raises(RuntimeError, match="create_session"):
            await client.connect()
    held = [AvatarClient(media_app_url) for _ in range(3)]  # the server's max_sessions
    try:
        for other in held:
            await other.create_session()
        async with AvatarClient(media_app_url) as client:
            with pytest.raises(AvatarClientError) as caught:
                await client.create_session()
        assert caught.value.code == "too_many_sessions" and caught.value.retry_after_s > 0
    finally:
        for other in held:
            await other.close()


async def test_pcm_is_checked_before_sending_and_events_answer_control_messages(media_app_url):
    async with AvatarClient(media_app_url) as client:
        await client.create_session()
        with pytest.raises(RuntimeError, match="connect"):
            await client.push_pcm(b"\x00\x00", 16000)
        events = client.events()
        await client.connect()
        with pytest.raises(ValueError, match="even number of bytes"):
            await client.push_pcm(b"\x00\x00\x00", 16000)
        with pytest.raises(ValueError, match="sample_rate"):
            await client.push_pcm(b"\x00\x00", 44100)
        await client.ping()
        assert (await events.wait_for("pong", timeout_s=5))["type"] == "pong"
        await client.set_motion(2.0, 0.5)
        error = await events.wait_for("error", timeout_s=5)
        assert "face" in error["message"]


async def test_recorder_aligns_tracks_and_fills_lost_frames(tmp_path):
    """Mp4Recorder on synthetic frames: audio before the first video frame is cut,
    a lost video frame repeats the previous one, so frame k of the file shows
    media time start + k / fps and the audio starts at the same instant."""
    recorder = Mp4Recorder(tmp_path / "aligned.mp4", fps=25)
    for k in range(10):  # 20 ms audio packets over 0..0.2 s
        pcm = np.full(960, 8000 if k >= 5 else 0, np.int16)  # loud from 0.1 s, when video starts
        sound = av.AudioFrame.from_ndarray(np.repeat(pcm, 2).reshape(1, -1), format="s16", layout="stereo")
        sound.sample_rate, sound.pts, sound.time_base = 48000, 960 * k, Fraction(1, 48000)
        recorder.add_audio(sound)
        index = (k - 5) // 2  # video frames at 0.10, 0.14 (lost), 0.18 s
        if k >= 5 and k % 2 == 1 and index != 1:
            picture = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 + 80 * index, np.uint8), format="rgb24")
            picture.pts, picture.time_base = round((0.1 + index * 0.04) * 90000), Fraction(1, 90000)
            recorder.add_video(picture)
    path = await recorder.finish()

    with av.open(str(path)) as container:
        levels = [int(f.to_ndarray(format="rgb24")[32, 32, 0]) for f in container.decode(video=0)]
    assert len(levels) == 3
    assert abs(levels[0] - 40) < 8 and abs(levels[1] - 40) < 8 and abs(levels[2] - 200) < 8
    samples, rate = load_audio(path)
    assert samples.shape[0] / rate == pytest.approx(0.1, abs=0.025)  # from the first video frame on
    assert np.abs(samples[: rate // 50]).max() > 0.1  # loud from the start: the silent 0..0.1 s was cut
