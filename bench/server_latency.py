"""Latency and capacity of the streaming server over real loopback WebRTC.

Starts the server app in-process (uvicorn on a free 127.0.0.1 port, real CPU
animator, ICE host candidates pinned to 127.0.0.1, no STUN) and drives it with
the Python client (server/client.py), as an agent would. Measures:

* time to first frame: ``connect()`` called (offer made) -> first video frame
  decoded at the receiver;
* audio-to-lip: first speech chunk pushed -> the first speaking video frame at
  the receiver: complete on the wire (its last RTP packet arrived: what a
  browser's receiver can decode at once) and decoded by aiortc (which holds each
  video frame until the next one's first packet arrives). The first speaking
  frame is the one whose media time holds the first voiced audio (audio and
  video of a frame carry the same pts). Also the engine's part (chunk received
  -> frame handed to the tracks, from the session's ``stats``) and the first
  voiced audio decoded; the mouth's own onset (face mesh on received frames) is
  compared with the voice's in the receiver's media time (A/V at onset);
* interrupt: ``interrupt`` sent -> last voiced audio decoded at the receiver;
* A/V offset after N minutes of speech: utterances back to back for
  ``--minutes``, the last 20 s recorded, then ``avatar-eval REC --audio REC``
  (the recording's own audio against its lips; target within +-40 ms);
* capacity: 1..``--max-sessions`` concurrent 512x512 sessions at 25 fps, all
  speaking; a level passes when no video frame is missing at the receivers
  (each must arrive complete; ``--decode`` also decodes them) and each receives
  at least 24.5 fps; late frames at the server are counted too, and the cores
  used by the server process, the generator workers and the receivers (from
  /proc, Linux).

The server runs in this process, on uvloop as ``avatar-server`` runs it; the
clients run in a child process (this script with ``--client URL``), so the two
do not share one interpreter lock, but they share the machine's cores:
capacity is a lower bound. Receiver
figures include aiortc's receive path, whose audio jitter buffer holds 4
packets (80 ms) before decoding. Server-side late frames come from the
sessions' ``stats`` events.

    .venv/bin/python bench/server_latency.py [--minutes 1] [--max-sessions 6] [--parts latency,long,capacity] [--decode]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiortc.rtcrtpreceiver
import av
import httpx
import numpy as np
import psutil
import uvicorn
from aiortc.codecs.base import Decoder
from aiortc.mediastreams import VIDEO_TIME_BASE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar.audio_file import load_audio, to_mono_16k  # noqa: E402
from model.face_mesh import FaceTracker, mouth_aperture  # noqa: E402
from server.app import create_app  # noqa: E402
from server.client import AvatarClient, pcm16_bytes  # noqa: E402
from server.config import Settings  # noqa: E402
from server.load import cpu_seconds  # noqa: E402
from server.webrtc import pin_ice_host_addresses  # noqa: E402

SPEECH = [Path("/work/shared/data/speech/librivox_0870.wav"), Path("/work/shared/data/speech/librivox_0880.wav")]
VOICED_PEAK = 2000  # received int16 audio louder than this is voice
SILENT_PEAK = 200
RATE = 16000
CHUNK_S = 0.1  # TTS-sized chunks
RECORD_TAIL_S = 20.0
LATE_TOLERANCE = 0.005  # fraction of a capacity level's frames that may be late (noise from other processes)

logger = logging.getLogger("bench.server_latency")


def speech_clips() -> list[np.ndarray]:
    """The shared speech clips as int16 16 kHz mono, each trimmed to start at its voice."""
    clips = []
    for path in SPEECH:
        samples, rate = load_audio(path)
        mono = to_mono_16k(samples, rate)
        onset = int(np.argmax(np.abs(mono) > 0.1 * np.abs(mono).max()))
        clips.append((np.clip(mono[max(0, onset - 160):], -1, 1) * 32767).astype(np.int16))
    return clips


@contextlib.asynccontextmanager
async def running_server(max_sessions: int, generator_processes: bool = True):
    """The app served by uvicorn on a free loopback port; yields its base URL."""
    # Load admission measures but does not refuse: the ramp finds what the machine holds,
    # and each level notes how many more sessions admission would still have taken.
    app = create_app(Settings(ice_host_addresses=("127.0.0.1",), max_sessions=max_sessions,
                              generator_processes=generator_processes, admit_by_load=False))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class TimedClient(AvatarClient):
    """An AvatarClient that also notes when received media reached the receiver,
    before aiortc's jitter buffers: ``arrived[kind]`` maps an RTP timestamp
    (counted from the kind's first packet, as aiortc counts the pts it decodes)
    to the loop time of the packet that completed it (video: the frame's last
    packet, marker bit; audio: the packet). Wraps the receivers' packet
    handlers: measurement only."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: dict[str, dict[int, float]] = {"video": {}, "audio": {}}

    def _on_track(self, track) -> None:
        super()._on_track(track)
        receiver = next(t.receiver for t in self._pc.getTransceivers() if t.receiver.track is track)
        handle, loop, origin = receiver._handle_rtp_packet, asyncio.get_running_loop(), None
        arrived = self.arrived[track.kind]

        async def noted(packet, arrival_time_ms):
            nonlocal origin
            origin = packet.timestamp if origin is None else origin
            if packet.marker or track.kind == "audio":
                arrived[(packet.timestamp - origin) % 2**32] = loop.time()
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = noted


class Received:
    """What one client's receiver got: per frame (arrival loop time, media time s,
    payload); video payload is the RGB image when ``keep_images``, else None;
    audio payload is the int16 peak."""

    def __init__(self, client: AvatarClient, keep_images: bool = False) -> None:
        self.video: list[tuple[float, float, np.ndarray | None]] = []
        self.audio: list[tuple[float, float, int]] = []
        self.keep_images = keep_images
        self.first_video = asyncio.Event()
        self.voiced = asyncio.Event()
        self._tasks = [asyncio.create_task(self._read(client.subscribe(kind))) for kind in ("video", "audio")]

    async def _read(self, track) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await track.recv()
            now, media = loop.time(), float(frame.pts * frame.time_base)
            if track.kind == "video":
                self.video.append((now, media, frame.to_ndarray(format="rgb24") if self.keep_images else None))
                self.first_video.set()
            else:
                peak = int(np.abs(frame.to_ndarray()).max())
                self.audio.append((now, media, peak))
                if peak > VOICED_PEAK:
                    self.voiced.set()

    def missing_video_frames(self, fps: float, since: float = 0.0) -> int:
        """Frames absent between consecutive received video frames (media time after ``since``)."""
        times = [media for _, media, _ in self.video if media >= since]
        return int(sum(max(0, round((b - a) * fps) - 1) for a, b in zip(times, times[1:])))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()


async def push(client: AvatarClient, samples: np.ndarray) -> float:
    """Push an utterance in CHUNK_S chunks at once (faster than real time) and end it;
    returns the loop time of the first chunk."""
    step = round(RATE * CHUNK_S)
    first = asyncio.get_running_loop().time()
    for start in range(0, len(samples), step):
        await client.push_pcm(pcm16_bytes(samples[start:start + step]), RATE)
    await client.speech_end()
    return first


def mouth_onset(received: Received, after_media: float) -> float | None:
    """Media time of the first received frame after ``after_media`` whose mouth is
    clearly more open than in the idle frames before it (face mesh aperture)."""
    with FaceTracker() as tracker:
        def aperture(image):
            landmarks = tracker.track(image)
            return None if landmarks is None else mouth_aperture(landmarks)

        idle = [a for _, media, image in received.video if media < after_media
                for a in [aperture(image)] if a is not None]
        threshold = max(idle[-25:], default=0.0) + 0.01
        for _, media, image in received.video:
            if media >= after_media:
                value = aperture(image)
                if value is not None and value > threshold:
                    return media
    return None


async def speech_onset(client: TimedClient, events, received: Received, clip: np.ndarray) -> dict:
    """Push ``clip`` (starts voiced) and time its first speaking frame (see the
    module docstring); returns loop-time latencies (s) and the voice's media time."""
    mark = len(received.audio)
    received.voiced.clear()
    pushed = await push(client, clip)
    await asyncio.wait_for(received.voiced.wait(), 10)
    voice = next((arrival, media) for arrival, media, peak in received.audio[mark:] if peak > VOICED_PEAK)
    await events.wait_for("playback_started", 5)
    engine_s = (await events.wait_for("stats", 5))["audio_to_lip_latency_s"]
    # The speaking frame: the last video frame starting at or before the voice's media time.
    frame = max((v for v in received.video if v[1] <= voice[1] + 1e-6), key=lambda v: v[1])
    complete = client.arrived["video"].get(round(frame[1] * 90000))
    await events.wait_for("playback_finished", 15)
    await asyncio.sleep(0.5)  # the utterance's last audio reaches the receiver before the next one
    return {"decoded": frame[0] - pushed, "wire": None if complete is None else complete - pushed,
            "engine": engine_s, "voice": voice[0] - pushed, "voice_media": voice[1]}


async def time_to_first_frame(url: str) -> float:
    """A new session: ``connect()`` called to its first video frame decoded, seconds."""
    async with AvatarClient(url) as client:
        await client.create_session(fps=25)
        received = Received(client)
        started = asyncio.get_running_loop().time()
        await client.connect()
        await asyncio.wait_for(received.first_video.wait(), 10)
        received.stop()
        return received.video[0][0] - started


async def measure_latencies(url: str, clips: list[np.ndarray], repeats: int) -> dict:
    """Time to first frame; audio-to-lip over ``repeats`` short utterances (with A/V
    at the first one's onset); interrupt latency over ``repeats`` interrupts.
    Latencies are lists (s), one per repeat."""
    loop = asyncio.get_running_loop()
    short = clips[1][: 2 * RATE]
    async with TimedClient(url) as client:
        await client.create_session(fps=25)
        events = client.events()
        received = Received(client, keep_images=True)
        offered = loop.time()
        await client.connect()
        await asyncio.wait_for(received.first_video.wait(), 10)
        first_frame_s = received.video[0][0] - offered
        await events.wait_for("stats", 5)  # a second of idle frames first

        onsets = [await speech_onset(client, events, received, short)]
        mouth = mouth_onset(received, after_media=onsets[0]["voice_media"] - 0.5)
        received.keep_images = False  # the face mesh needs only the first onset
        received.video = [(arrival, media, None) for arrival, media, _ in received.video]
        for _ in range(repeats - 1):
            onsets.append(await speech_onset(client, events, received, short))

        interrupts, interrupts_wire, positions = [], [], []
        for _ in range(repeats):
            await push(client, clips[0])
            await events.wait_for("playback_started", 10)
            await asyncio.sleep(1.5)  # well into the utterance
            interrupted = loop.time()
            await client.interrupt()
            positions.append((await events.wait_for("playback_finished", 5))["position"])
            await asyncio.sleep(1.0)  # collect what the receiver still gets
            voiced_after = [(arrival, media) for arrival, media, peak in received.audio
                            if arrival > interrupted and peak > SILENT_PEAK]
            last = voiced_after[-1] if voiced_after else None
            interrupts.append(0.0 if last is None else last[0] - interrupted)
            wire = None if last is None else client.arrived["audio"].get(round(last[1] * 48000))
            interrupts_wire.append(0.0 if last is None else None if wire is None else max(0.0, wire - interrupted))
        received.stop()
    return {
        "time_to_first_frame_s": first_frame_s,
        # Later sessions: the first media session after start also loads the media stack.
        "later_first_frame_s": [await time_to_first_frame(url) for _ in range(3)],
        "audio_to_lip_s": [o["decoded"] for o in onsets],
        "audio_to_lip_wire_s": [o["wire"] for o in onsets if o["wire"] is not None],
        "audio_to_lip_engine_s": [o["engine"] for o in onsets],
        "audio_to_voice_s": [o["voice"] for o in onsets],
        "av_offset_at_onset_ms": None if mouth is None else 1000 * (mouth - onsets[0]["voice_media"]),
        "interrupt_s": interrupts,
        "interrupt_wire_s": [w for w in interrupts_wire if w is not None],
        "interrupt_position_s": positions,
    }


async def measure_long_run(url: str, clips: list[np.ndarray], minutes: float, out_dir: Path) -> dict:
    """Utterances back to back for ``minutes``; record the last RECORD_TAIL_S; avatar-eval it."""
    loop = asyncio.get_running_loop()
    path = out_dir / "long_run_tail.mp4"
    async with AvatarClient(url) as client:
        await client.create_session(fps=25)
        events = client.events()
        received = Received(client)
        await client.connect()
        started = loop.time()
        total = minutes * 60
        recording = False
        k = 0
        while loop.time() - started < total:
            if not recording and loop.time() - started >= total - RECORD_TAIL_S:
                await client.record(path)
                recording = True
            await push(client, clips[k % len(clips)])
            await events.wait_for("playback_finished", 30)
            k += 1
        if not recording:  # a run shorter than the tail: record one more utterance
            await client.record(path)
            await push(client, clips[0])
            await events.wait_for("playback_finished", 30)
        await client.stop_recording()
        elapsed = loop.time() - started
        missing = received.missing_video_frames(25.0)
        received.stop()
    result = subprocess.run(
        [sys.executable, "-m", "avatar.quality", str(path), "--audio", str(path), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"avatar-eval failed: {result.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(result.stdout)
    return {"minutes": elapsed / 60, "utterances": k, "lag_ms": figures["lag_ms"],
            "correlation": figures["correlation"], "missing_frames": missing}


class LateFrames:
    """Follows a session's ``stats`` events: frames the session handed out more
    than a frame period late, counted from ``mark()`` on."""

    def __init__(self, client: AvatarClient) -> None:
        self.latest = 0
        self._base = 0
        self._task = asyncio.create_task(self._follow(client.events()))

    async def _follow(self, events) -> None:
        async for event in events:
            if event.get("type") == "stats":
                self.latest = int(event.get("late_frames") or 0)

    def mark(self) -> None:
        self._base = self.latest

    @property
    def since_mark(self) -> int:
        return self.latest - self._base

    def stop(self) -> None:
        self._task.cancel()


class CompleteFrames(Decoder):
    """Stand-in video decoder of the capacity receivers: aiortc's jitter buffer
    hands it each frame once every RTP packet of it has arrived (what a decoder
    needs), and it returns a 2x2 frame with that frame's pts instead of decoding
    VP8, so the receivers, which share this machine's cores with the server, cost
    less. ``--decode`` keeps aiortc's real decoder."""

    def decode(self, encoded_frame) -> list[av.VideoFrame]:
        frame = av.VideoFrame(2, 2, "yuv420p")
        frame.pts, frame.time_base = encoded_frame.timestamp, VIDEO_TIME_BASE
        return [frame]


@contextlib.contextmanager
def counting_video_receivers():
    """Receivers of this process that start meanwhile count complete video frames
    (CompleteFrames) instead of decoding them; audio is decoded as usual."""
    original = aiortc.rtcrtpreceiver.get_decoder

    def choose(codec):
        return CompleteFrames() if codec.mimeType.lower().startswith("video/") else original(codec)

    aiortc.rtcrtpreceiver.get_decoder = choose
    try:
        yield
    finally:
        aiortc.rtcrtpreceiver.get_decoder = original


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid``; None when gone."""
    try:
        return cpu_seconds(psutil.Process(pid))
    except psutil.Error:
        return None


def _descendants(process: psutil.Process) -> set[int]:
    """Pids of every live process below ``process``."""
    try:
        return {child.pid for child in process.children(recursive=True)}
    except psutil.Error:
        return set()


class CpuShares:
    """Cores used over a window by the server process (this process's parent),
    its generator workers (the parent's other descendants) and the receivers
    (this process and its children)."""

    def __init__(self) -> None:
        self._start: dict[int, float | None] = {}
        self._started = 0.0

    @staticmethod
    def _groups() -> dict[int, str]:
        server, receivers = psutil.Process(os.getppid()), psutil.Process()
        groups = {pid: "workers" for pid in _descendants(server)}
        groups.update({pid: "receivers" for pid in {receivers.pid, *_descendants(receivers)}})
        groups[server.pid] = "server"
        return groups

    def start(self) -> None:
        self._start = {pid: _cpu_seconds(pid) for pid in self._groups()}
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores per group since ``start`` (processes alive at both ends)."""
        elapsed = time.monotonic() - self._started
        cores = {"server": 0.0, "workers": 0.0, "receivers": 0.0}
        for pid, group in self._groups().items():
            before, after = self._start.get(pid), _cpu_seconds(pid)
            if before is not None and after is not None:
                cores[group] += (after - before) / elapsed
        return cores


async def measure_capacity(url: str, clips: list[np.ndarray], max_sessions: int, window_s: float) -> list[dict]:
    """For n = 1..max_sessions concurrent speaking sessions: frames missing at the
    receivers (dropped anywhere on the way), late frames at the server, received
    fps, and the cores used by the server, its workers and the receivers. A level
    holds (``ok``) with no frame missing at any receiver and at least 24.5 fps
    received; it is also ``on_time`` with at most LATE_TOLERANCE of the frames
    handed out late at the server (a late frame is a short stall of the picture).
    The ramp stops at the first level that does not hold."""
    levels = []
    long_speech = np.concatenate(clips * 3)  # about 30 s: every session speaks through the window
    cpu = CpuShares()
    for n in range(1, max_sessions + 1):
        clients = [AvatarClient(url) for _ in range(n)]
        try:
            for c in clients:
                await c.create_session(fps=25)
            receivers = [Received(c) for c in clients]
            late = [LateFrames(c) for c in clients]
            for c in clients:
                await c.connect()
            await asyncio.sleep(2.0)  # settle: ICE, first keyframes, first stats
            since = [r.video[-1][1] if r.video else 0.0 for r in receivers]
            for counter in late:
                counter.mark()
            cpu.start()
            await asyncio.gather(*(push(c, long_speech) for c in clients))
            await asyncio.sleep(window_s)
            cores = cpu.stop()
            admission = await admission_view(url)
            await asyncio.sleep(1.1)  # one more stats event to cover the window
            missing = sum(r.missing_video_frames(25.0, s) for r, s in zip(receivers, since))
            late_frames = sum(counter.since_mark for counter in late)
            fps = [(len([1 for _, media, _ in r.video if media >= s]) - 1) / max(1e-9, r.video[-1][1] - s)
                   for r, s in zip(receivers, since)]
            late_ok = late_frames <= LATE_TOLERANCE * n * window_s * 25
            no_drops = missing == 0 and min(fps) >= 24.5
            level = {"sessions": n, "missing": missing, "late": late_frames, "min_fps": min(fps),
                     "ok": no_drops, "on_time": no_drops and late_ok, "cores": cores, **admission}
            levels.append(level)
            print(f"  {n} session(s): missing at receivers {missing}, late at server {late_frames}, "
                  f"min received fps {min(fps):.1f}; cores: server {cores['server']:.2f}, "
                  f"workers {cores['workers']:.2f}, receivers {cores['receivers']:.2f}; load admission: "
                  f"{admission['free_sessions']} more at {admission['session_cores']:.2f} core each",
                  file=sys.stderr, flush=True)
            for r, counter in zip(receivers, late):
                r.stop()
                counter.stop()
        finally:
            for c in clients:
                await c.close()
        if not levels[-1]["ok"]:
            break
    return levels


async def admission_view(url: str) -> dict:
    """What the server's load admission holds now (its /metrics gauges):
    ``free_sessions`` it would still admit and ``session_cores`` it counts each at."""
    async with httpx.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics")).text
    gauges = dict(line.split() for line in text.splitlines()
                  if line.startswith(("avatar_free_sessions ", "avatar_session_cpu_cores ")))
    return {"free_sessions": int(float(gauges["avatar_free_sessions"])),
            "session_cores": float(gauges["avatar_session_cpu_cores"])}


def row(what: str, value: str, note: str = "") -> str:
    return f"| {what} | {value} | {note} |"


def ms(values: list[float]) -> str:
    """Median and range of latencies in seconds, as milliseconds."""
    if not values:
        return "n/a"
    values = 1000 * np.asarray(values)
    return f"{np.median(values):.0f} ms ({values.min():.0f}-{values.max():.0f})"


def print_latencies(lat: dict) -> None:
    """Table rows of ``measure_latencies``: medians with (min-max) over the repeats."""
    onset = lat["av_offset_at_onset_ms"]
    n = len(lat["audio_to_lip_s"])
    print(row("time to first frame, later sessions", ms(lat["later_first_frame_s"]),
              "3 more sessions, one at a time: connect() to first decoded frame"))
    print(row("time to first frame, first media session after start", f"{1000 * lat['time_to_first_frame_s']:.0f} ms",
              "connect() (offer, ICE, DTLS) to first decoded frame"))
    print(row("audio-to-lip, speaking frame complete at the receiver", ms(lat["audio_to_lip_wire_s"]),
              f"{n} utterances: first chunk pushed to the first speaking frame's last RTP packet"))
    print(row("audio-to-lip, speaking frame decoded by aiortc", ms(lat["audio_to_lip_s"]),
              "also aiortc holding each video frame until the next one starts (40 ms at 25 fps)"))
    print(row("audio-to-lip in the engine", ms(lat["audio_to_lip_engine_s"]),
              "chunk received to speaking frame handed to the tracks (session stats)"))
    print(row("audio-to-voice, decoded by aiortc", ms(lat["audio_to_voice_s"]),
              "first voiced audio decoded; includes aiortc's 80 ms audio jitter buffer"))
    print(row("A/V at speech onset (receiver media time)", "n/a" if onset is None else f"{onset:+.0f} ms",
              "mouth opens minus voice starts, first utterance"))
    print(row("interrupt at the receiver, on the wire", ms(lat["interrupt_wire_s"]),
              f"{len(lat['interrupt_s'])} interrupts: sent to the last voiced audio packet's arrival"))
    print(row("interrupt at the receiver, decoded by aiortc", ms(lat["interrupt_s"]),
              "sent to last voiced audio decoded; includes aiortc's 80 ms audio jitter buffer"))


def print_table(lat: dict | None, long: dict | None, levels: list[dict]) -> None:
    """The figures of the parts that ran, as a Markdown table on stdout."""
    passed = [level["sessions"] for level in levels if level["ok"]]
    print("| measure | value | note |")
    print("|---|---|---|")
    if lat:
        print_latencies(lat)
    if long:
        print(row(f"A/V offset after {long['minutes']:.1f} min of speech", f"{long['lag_ms']:+.1f} ms",
                  f"avatar-eval on the last {RECORD_TAIL_S:g} s recorded (correlation {long['correlation']:.2f}); "
                  f"{long['missing_frames']} frames missing at the receiver"))
    if levels:
        detail = "; ".join(f"{lv['sessions']}: {lv['missing']} missing, {lv['late']} late, {lv['min_fps']:.1f} fps"
                           for lv in levels)
        on_time = [level["sessions"] for level in levels if level["on_time"]]
        print(row("concurrent 512x512 sessions at 25 fps, no dropped frames", str(max(passed, default=0)),
                  f"per level {detail}"))
        print(row(f"... and at most {100 * LATE_TOLERANCE:g}% of frames late at the server",
                  str(max(on_time, default=0)), "late: handed out more than one frame period after its time"))
        shares = "; ".join(
            f"{lv['sessions']}: {lv['cores']['server']:.2f} + {lv['cores']['workers']:.2f} + "
            f"{lv['cores']['receivers']:.2f}" for lv in levels)
        top = levels[-1] if levels[-1]["ok"] or len(levels) == 1 else levels[-2]
        per_session = (top["cores"]["server"] + top["cores"]["workers"]) / top["sessions"]
        print(row("cores per speaking session (server process + generator worker)", f"{per_session:.2f}",
                  f"at {top['sessions']} session(s); cores server + workers + receivers per level: {shares}"))
        admitted = "; ".join(f"{lv['sessions']}: {lv['sessions'] + lv['free_sessions']}" for lv in levels)
        print(row("sessions load admission allows (live + more it would admit)",
                  str(top["sessions"] + top["free_sessions"]),
                  f"at {top['sessions']} session(s), counting {top['session_cores']:.2f} core each; "
                  f"per level: {admitted}"))


async def run_clients(args) -> None:
    """Child process: every client-side measurement against ``args.client``; the table on stdout."""
    pin_ice_host_addresses(["127.0.0.1"])
    clips = speech_clips()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="server_latency_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    warm = AvatarClient(args.client)
    await warm.create_session()  # prepares the bundled portrait once
    await warm.close()
    lat = long = None
    levels = []
    if "latency" in args.parts:
        print("latencies ...", file=sys.stderr, flush=True)
        lat = await measure_latencies(args.client, clips, args.repeats)
    if "long" in args.parts:
        print(f"long run ({args.minutes:g} min) ...", file=sys.stderr, flush=True)
        long = await measure_long_run(args.client, clips, args.minutes, out_dir)
    if "capacity" in args.parts:
        print("capacity ...", file=sys.stderr, flush=True)
        # Receivers check that every video frame arrives complete; they decode it only with --decode.
        with contextlib.nullcontext() if args.decode else counting_video_receivers():
            levels = await measure_capacity(args.client, clips, args.max_sessions, args.window)
    print_table(lat, long, levels)
    if long:
        print(f"\nrecording: {out_dir / 'long_run_tail.mp4'}")


async def serve_for_clients(args) -> int:
    """Parent: serve the app here, run the clients in a child process; returns its exit status."""
    pin_ice_host_addresses(["127.0.0.1"])
    async with running_server(max(args.max_sessions, 2), not args.in_process_generators) as url:
        forwarded = ["--minutes", str(args.minutes), "--max-sessions", str(args.max_sessions),
                     "--window", str(args.window), "--repeats", str(args.repeats), "--parts", ",".join(args.parts)]
        forwarded += ["--decode"] if args.decode else []
        forwarded += ["--out", args.out] if args.out else []
        child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", url, *forwarded)
        return await child.wait()


PARTS = ("latency", "long", "capacity")


def parts(text: str) -> tuple[str, ...]:
    """``--parts``: a comma list of PARTS."""
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"parts must be a comma list of {', '.join(PARTS)}; got {text!r}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="speech before the A/V offset is measured")
    parser.add_argument("--max-sessions", type=int, default=6, help="capacity ramp goes 1..this")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per capacity level")
    parser.add_argument("--in-process-generators", action="store_true",
                        help="run the generators in the server's process (AVATAR_GENERATOR_PROCESSES=0)")
    parser.add_argument("--decode", action="store_true",
                        help="capacity receivers decode every video frame (default: check that each arrived complete)")
    parser.add_argument("--repeats", type=int, default=5, help="utterances and interrupts timed")
    parser.add_argument("--parts", type=parts, default=PARTS,
                        help="comma list of the measurements to run (default: latency,long,capacity)")
    parser.add_argument("--out", help="folder for the recording (default: a temporary folder)")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the child process's role
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.client:
        asyncio.run(run_clients(args))
    else:
        # The server on uvloop, as avatar-server runs it (uvicorn's default loop where uvloop is installed).
        with asyncio.Runner(loop_factory=server_loop_factory()) as runner:
            sys.exit(runner.run(serve_for_clients(args)))


def server_loop_factory():
    """uvloop's event loop factory when uvloop is installed, else None (asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
