"""AvatarClient: the Python client of the avatar server, for agents and tests.

One object per session::

    client = AvatarClient("http://127.0.0.1:8080", api_key=None)
    await client.create_session(fps=25)
    await client.record("out.mp4")               # optional: the received video + audio
    await client.connect()                       # WebRTC media + the events WebSocket
    await client.push_pcm(pcm16_bytes, 24000)    # TTS audio, any chunking, faster than real time
    await client.speech_end()
    async for event in client.events(): ...      # {"type": "playback_finished", ...}
    await client.close()                         # DELETE the session, close everything

HTTP goes through httpx; media through an aiortc peer (recvonly video and
audio, or sendrecv audio with a microphone track), non-trickle: the offer is
posted once ICE gathering is complete; events through ``websockets``. Received
tracks are always read (an unread aiortc track queues decoded frames without
bound) and fanned out to ``subscribe`` queues and the recording.

A 4xx/5xx answer raises ``AvatarClientError`` with the server's error code and
message. Recording (``Mp4Recorder``) writes its own MP4 instead of aiortc's
MediaRecorder, whose fixed 1/30 s video time base cannot hold 60 fps and whose
tracks start wherever each happens to be: here both tracks start at the first
recorded video frame and the video is constant frame rate (a lost frame repeats
the previous one), so ``avatar-eval`` can measure the recording's own A/V offset.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import websockets
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger(__name__)

#: Sample rates the server accepts for pushed PCM16, Hz.
PCM_RATES = (16000, 24000, 48000)
#: Largest binary WebSocket message push_pcm sends (bytes); longer audio is split.
MAX_PCM_MESSAGE_BYTES = 32_000
#: Seconds connect() waits for the media connection.
CONNECT_TIMEOUT_S = 20.0
#: Received audio frames the recorder keeps while waiting for the first video frame (2 s).
HELD_AUDIO_FRAMES = 100


class AvatarClientError(Exception):
    """The server refused a request. ``status``: HTTP status (0 when no answer);
    ``code``: the server's short error code; ``message``: its sentence;
    ``retry_after_s``: seconds the server asked to wait before trying again
    (Retry-After of a 503: ``too_many_sessions``, ``cpu_busy``), else None."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SessionInfo:
    """What ``POST /v1/sessions`` returned: ids and URLs (paths on the server)."""

    session_id: str
    token: str
    offer_url: str
    events_url: str
    ice_servers: list = field(default_factory=list)
    fps: float = 25.0


class _FrameQueueTrack(MediaStreamTrack):
    """A copy of a received track: every frame from when it was made, in order."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, frame: av.AudioFrame | av.VideoFrame | None) -> None:
        self._queue.put_nowait(frame)

    async def recv(self) -> av.AudioFrame | av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame


class EventStream:
    """Async iterator over a client's events from its creation on (see
    ``AvatarClient.events``); ``wait_for`` skips to an event of one type."""

    def __init__(self, registry: list[asyncio.Queue]) -> None:
        self._registry = registry
        self._queue: asyncio.Queue = asyncio.Queue()
        registry.append(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict:
        event = await self._queue.get()
        if event is None:
            self.close()
            raise StopAsyncIteration
        return event

    async def wait_for(self, event_type: str, timeout_s: float | None = None) -> dict:
        """The next event of ``event_type`` (earlier ones of other types are
        skipped). asyncio.TimeoutError after ``timeout_s``; EOFError when the
        events connection closes first."""

        async def first() -> dict:
            async for event in self:
                if event.get("type") == event_type:
                    return event
            raise EOFError(f"the events connection closed before a {event_type!r} event")

        return await asyncio.wait_for(first(), timeout_s)

    def close(self) -> None:
        """Stop receiving events."""
        if self._queue in self._registry:
            self._registry.remove(self._queue)


class Mp4Recorder:
    """Writes received video and audio to an MP4 (H.264 + AAC), aligned.

    ``fps``: the session's frame rate (the file's constant rate). Frames come in
    with the receiver's pts (video 1/90000 s, audio 1/48000 s), both counted
    from the same media frame (the server starts its tracks together). The file
    starts at the first video frame given: audio before it is dropped, audio
    after it is laid out sample-contiguous from there (a gap becomes silence).
    Video frame k of the file is the received frame nearest ``start + k / fps``;
    a missing one repeats the previous image. Encoding runs in one worker thread.
    ``finish()`` flushes and closes the file; nothing is written before the
    first video frame.
    """

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        self._fps = Fraction(fps).limit_denominator(1001)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="client-recorder")
        self._pending: list[concurrent.futures.Future] = []
        self._container = None
        self._video = self._audio = None
        self._start: Fraction | None = None  # media time of the file's start, seconds
        # Audio that came before the first video frame (trimmed to the file's start once it comes).
        self._held_audio: deque[av.AudioFrame] = deque(maxlen=HELD_AUDIO_FRAMES)
        self._last_index = -1
        self._last_picture: tuple[np.ndarray, str] | None = None
        self._audio_written = 0
        self.frames_written = 0

    def add_video(self, frame: av.VideoFrame) -> None:
        """Record a received video frame (pts in its own time base)."""
        time = Fraction(frame.pts) * Fraction(frame.time_base)
        if self._start is None:
            self._start = time
            self._submit(self._open, frame.width, frame.height)
            for held in self._held_audio:
                self.add_audio(held)
            self._held_audio.clear()
        # Copy the pixels here: a frame object must never be converted in two threads at once
        # (PyAV keeps one scaler per frame), and a subscriber may be converting this one.
        if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
            pixels, layout = frame.to_ndarray(), "yuv420p"  # the decoder's own planes: no colour conversion
        else:
            pixels, layout = frame.to_ndarray(format="rgb24"), "rgb24"
        self._submit(self._write_video, pixels, layout, round((time - self._start) * self._fps))

    def add_audio(self, frame: av.AudioFrame) -> None:
        """Record a received audio frame (48 kHz, any layout, pts in its time base).
        RuntimeError for another rate."""
        if self._start is None:
            self._held_audio.append(frame)
            return
        if frame.sample_rate != 48000:
            raise RuntimeError(f"received audio at {frame.sample_rate} Hz; the recorder takes 48 kHz (Opus) audio")
        samples = frame.to_ndarray()
        if not frame.format.is_planar:
            samples = samples.reshape(-1, len(frame.layout.channels)).T
        scale = 32768.0 if samples.dtype == np.int16 else 1.0
        mono = samples.astype(np.float32).mean(axis=0) / scale
        offset = round((Fraction(frame.pts) * Fraction(frame.time_base) - self._start) * frame.sample_rate)
        self._submit(self._write_audio, mono, offset)

    async def finish(self) -> Path | None:
        """Flush and close; returns the path, or None when no video frame came.
        RuntimeError when writing failed."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._close)
            self._check_failures()
        finally:
            self._worker.shutdown(wait=True)
        return self.path if self.frames_written else None

    # -- worker thread ------------------------------------------------------------------

    def _submit(self, fn, *args) -> None:
        self._check_failures()
        self._pending.append(self._worker.submit(fn, *args))

    def _check_failures(self) -> None:
        """Raise RuntimeError for a failed write; forget the finished ones."""
        done = [future for future in self._pending if future.done()]
        for future in done:
            self._pending.remove(future)
            if future.exception() is not None:
                raise RuntimeError(f"recording to {self.path} failed: {future.exception()}")

    def _open(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=self._fps)
        self._video.width, self._video.height = width - width % 2, height - height % 2
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"preset": "veryfast", "crf": "20"}
        self._audio = self._container.add_stream("aac", rate=48000, layout="mono")

    def _write_video(self, pixels: np.ndarray, layout: str, index: int) -> None:
        if index <= self._last_index:
            return  # a duplicate or a frame from before a resync: the file keeps its pace
        if self._last_picture is not None:
            for missing in range(self._last_index + 1, index):
                self._encode_video(*self._last_picture, missing)
        self._encode_video(pixels, layout, index)
        self._last_index, self._last_picture = index, (pixels, layout)

    def _encode_video(self, pixels: np.ndarray, layout: str, index: int) -> None:
        if layout == "rgb24":
            pixels = np.ascontiguousarray(pixels[: self._video.height, : self._video.width])
        picture = av.VideoFrame.from_ndarray(pixels, format=layout)
        picture.pts, picture.time_base = index, 1 / self._fps
        self._mux(self._video.encode(picture))
        self.frames_written += 1

    def _write_audio(self, mono: np.ndarray, offset: int) -> None:
        if offset < self._audio_written:  # before the start, or overlapping what is written
            mono = mono[self._audio_written - offset:]
            offset = self._audio_written
        if offset > self._audio_written:
            mono = np.concatenate([np.zeros(offset - self._audio_written, np.float32), mono])
        if not mono.size:
            return
        sound = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="fltp", layout="mono")
        sound.sample_rate, sound.pts, sound.time_base = 48000, self._audio_written, Fraction(1, 48000)
        self._mux(self._audio.encode(sound))
        self._audio_written += mono.size

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _close(self) -> None:
        if self._container is None:
            return
        self._mux(self._video.encode(None))
        self._mux(self._audio.encode(None))
        self._container.close()
        logger.info("recorded %d frames and %.2f s of audio to %s", self.frames_written,
                    self._audio_written / 48000, self.path)


class AvatarClient:
    """Client of one avatar session. ``base_url``: the server, e.g.
    ``http://127.0.0.1:8080``; ``api_key``: sent as ``Authorization: Bearer``
    on uploads and session creation when given; ``timeout_s``: per HTTP request.

    Methods raise AvatarClientError for an error answer of the server (with its
    code and message), RuntimeError when called in the wrong order (e.g.
    ``push_pcm`` before ``connect``), ValueError for bad arguments.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)
        self.session: SessionInfo | None = None
        self._pc: RTCPeerConnection | None = None
        self._ws: websockets.ClientConnection | None = None
        self._tasks: set[asyncio.Task] = set()
        self._subscribers: dict[str, list[_FrameQueueTrack]] = {"video": [], "audio": []}
        self._event_queues: list[asyncio.Queue] = []
        self._recorder: Mp4Recorder | None = None
        self._recorder_error: RuntimeError | None = None
        self._pcm_rate: int | None = None
        self._closed = False
        self.frames_received = {"video": 0, "audio": 0}

    # -- HTTP -------------------------------------------------------------------------

    async def upload_portrait(self, path: str | Path) -> str:
        """Upload an image file (PNG/JPEG/...); returns its portrait_id (sha256 hex).
        OSError when the file cannot be read."""
        data = Path(path).read_bytes()
        response = await self._request("POST", "/v1/portraits", headers=self._api_headers,
                                       files={"image": (Path(path).name, data, "application/octet-stream")})
        return response.json()["portrait_id"]

    async def create_session(
        self,
        portrait_id: str | None = None,
        motion: dict[str, float] | None = None,
        fps: float | None = None,
        generator: str | None = None,
    ) -> SessionInfo:
        """Start a session on ``portrait_id`` (None: the server's bundled portrait)
        with ``motion`` ``{"face": f, "body": f}`` (each in [0, 1], default 0.5),
        ``fps`` (10..60; None: the generator's own) and ``generator`` (None: the
        server's). Returns and keeps its SessionInfo."""
        if self.session is not None:
            raise RuntimeError("this client already has a session; use one client per session")
        body: dict[str, Any] = {"motion": motion or {"face": 0.5, "body": 0.5}}
        for name, value in (("portrait_id", portrait_id), ("fps", fps), ("generator", generator)):
            if value is not None:
                body[name] = value
        answer = (await self._request("POST", "/v1/sessions", headers=self._api_headers, json=body)).json()
        self.session = SessionInfo(
            session_id=answer["session_id"], token=answer["token"], offer_url=answer["offer_url"],
            events_url=answer["events_url"], ice_servers=list(answer.get("ice_servers") or []),
            fps=float(answer["fps"]),
        )
        return self.session

    async def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise AvatarClientError(0, "unreachable", f"{method} {self.base_url}{url} failed: {exc}") from None
        if response.status_code >= 400:
            code, message = f"http_{response.status_code}", response.text[:200]
            try:
                error = response.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                pass  # not the server's JSON error body (a proxy's page): keep the text
            retry_after = response.headers.get("Retry-After", "")
            raise AvatarClientError(response.status_code, code, message,
                                    float(retry_after) if retry_after.isdigit() else None)
        return response

    def _session_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._need_session().token}"}

    def _need_session(self) -> SessionInfo:
        if self.session is None:
            raise RuntimeError("no session yet: call create_session() first")
        return self.session

    # -- media and events -------------------------------------------------------------

    async def connect(self, microphone: MediaStreamTrack | None = None) -> None:
        """Connect media and events: an aiortc peer receiving video and audio
        (sending ``microphone``, an audio track, when given), offered once ICE
        gathering is complete, then the events WebSocket. Returns when the media
        connection is up; AvatarClientError when it fails or times out."""
        session = self._need_session()
        if self._pc is not None:
            raise RuntimeError("already connected")
        ice = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
               for s in session.ice_servers]
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        pc.addTransceiver("video", direction="recvonly")
        if microphone is not None:
            pc.addTransceiver(microphone, direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        pc.on("track", self._on_track)
        connected = asyncio.Event()
        pc.on("connectionstatechange", lambda: connected.set() if pc.connectionState in ("connected", "failed") else None)
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate here
        if pc.iceGatheringState != "complete":
            raise AvatarClientError(0, "ice_gathering", "ICE gathering did not complete")
        answer = (await self._request("POST", session.offer_url, headers=self._session_headers(),
                                      json={"sdp": pc.localDescription.sdp, "type": "offer"})).json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await self._open_events()
        try:
            await asyncio.wait_for(connected.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise AvatarClientError(0, "media_timeout", f"no media connection within {CONNECT_TIMEOUT_S:g} s") from None
        if pc.connectionState != "connected":
            raise AvatarClientError(0, "media_failed", "the WebRTC connection failed (ICE found no working path)")

    async def _open_events(self) -> None:
        session = self._need_session()
        url = self.base_url.replace("http", "ws", 1) + session.events_url + f"?token={session.token}"
        try:
            self._ws = await websockets.connect(url, max_size=2**22)
        except (websockets.InvalidHandshake, OSError) as exc:
            raise AvatarClientError(0, "events_refused", f"the events WebSocket could not open: {exc}") from None
        self._spawn(self._read_events(self._ws))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._spawn(self._read_track(track))

    async def _read_track(self, track: MediaStreamTrack) -> None:
        kind = track.kind
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            self.frames_received[kind] += 1
            for subscriber in self._subscribers[kind]:
                subscriber.put(frame)
            if self._recorder is not None:
                try:
                    (self._recorder.add_video if kind == "video" else self._recorder.add_audio)(frame)
                except RuntimeError as exc:  # keep reading the track; stop_recording reports it
                    logger.error("%s", exc)
                    self._recorder_error, self._recorder = exc, None
        for subscriber in self._subscribers[kind]:
            subscriber.put(None)

    async def _read_events(self, ws) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    continue  # the server sends only JSON text
                try:
                    event = json.loads(message)
                except ValueError:
                    logger.warning("ignoring a non-JSON event: %.80s", message)
                    continue
                for queue in list(self._event_queues):
                    queue.put_nowait(event)
        except websockets.ConnectionClosed:
            pass
        finally:
            close = getattr(ws, "close_code", None), getattr(ws, "close_reason", "")
            logger.info("events connection closed: %s %s", *close)
            for queue in list(self._event_queues):
                queue.put_nowait(None)

    def subscribe(self, kind: str) -> MediaStreamTrack:
        """A track with every received ``kind`` ("video" or "audio") frame from now
        on (aiortc frames: video with pts in 1/90000 s, audio 48 kHz s16 stereo
        with pts in 1/48000 s, both counted from the session's first sent frame).
        Read it, or it grows."""
        if kind not in self._subscribers:
            raise ValueError(f"kind must be 'video' or 'audio', got {kind!r}")
        track = _FrameQueueTrack(kind)
        self._subscribers[kind].append(track)
        return track

    def events(self) -> EventStream:
        """Every event from this call on (dicts as the server sends them:
        ``state``, ``playback_started``, ``playback_finished``, ``stats``,
        ``error``, ``pong``), until the events connection closes. Take the
        stream before the action whose events it should see."""
        return EventStream(self._event_queues)

    async def record(self, path: str | Path) -> None:
        """Record the received video and audio to the MP4 ``path`` (see
        Mp4Recorder) from now until ``stop_recording`` or ``close``."""
        if self._recorder is not None:
            raise RuntimeError("already recording")
        self._recorder = Mp4Recorder(path, self.session.fps if self.session else 25.0)

    async def stop_recording(self) -> Path | None:
        """Finish the recording; returns its path (None when nothing was
        recorded). RuntimeError when writing it failed."""
        recorder, self._recorder = self._recorder, None
        error, self._recorder_error = self._recorder_error, None
        if error is not None:
            raise error
        return await recorder.finish() if recorder is not None else None

    # -- control messages -----------------------------------------------------------------

    async def push_pcm(self, pcm: bytes, sample_rate: int = 16000) -> None:
        """Send speech: PCM16 little-endian mono ``pcm`` at ``sample_rate`` (16000,
        24000 or 48000 Hz). Any chunking; faster than real time is fine. Sends
        ``audio_format`` when the rate changes, then binary messages of at most
        MAX_PCM_MESSAGE_BYTES. ValueError for an odd byte count or another rate."""
        if sample_rate not in PCM_RATES:
            raise ValueError(f"sample_rate must be one of {PCM_RATES} Hz, got {sample_rate!r}")
        if len(pcm) % 2:
            raise ValueError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
        ws = self._need_ws()
        if sample_rate != self._pcm_rate:
            await ws.send(json.dumps({"type": "audio_format", "sample_rate": sample_rate}))
            self._pcm_rate = sample_rate
        view = memoryview(pcm)
        for start in range(0, len(view), MAX_PCM_MESSAGE_BYTES):
            await ws.send(bytes(view[start:start + MAX_PCM_MESSAGE_BYTES]))

    async def speech_end(self) -> None:
        """The utterance pushed so far is complete."""
        await self._send({"type": "speech_end"})

    async def interrupt(self) -> None:
        """Drop all speech not yet played; the avatar goes idle."""
        await self._send({"type": "interrupt"})

    async def set_motion(self, face: float, body: float) -> None:
        """Motion intensities, each in [0, 1] (0.5 neutral); the server answers an
        ``error`` event for values out of range."""
        await self._send({"type": "set_motion", "face": face, "body": body})

    async def say(self, text: str) -> None:
        """Speak ``text`` with the server's speech synthesiser (``error`` event
        ``tts_unavailable`` when it has none)."""
        await self._send({"type": "say", "text": text})

    async def ping(self) -> None:
        """Keep-alive; the server answers a ``pong`` event."""
        await self._send({"type": "ping"})

    async def _send(self, message: dict) -> None:
        await self._need_ws().send(json.dumps(message))

    def _need_ws(self):
        if self._ws is None:
            raise RuntimeError("not connected: call connect() first")
        return self._ws

    # -- end ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish a recording, delete the session on the server (if it still
        exists), close media, events and HTTP. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.stop_recording()
        finally:
            if self.session is not None:
                try:
                    await self._request("DELETE", f"/v1/sessions/{self.session.session_id}",
                                        headers=self._session_headers())
                except AvatarClientError as exc:
                    if exc.status != 404:  # already ended on the server: nothing to delete
                        logger.warning("deleting the session failed: %s", exc)
            if self._ws is not None:
                await self._ws.close()
            if self._pc is not None:
                await self._pc.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._http.aclose()

    async def __aenter__(self) -> AvatarClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def pcm16_bytes(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] (clipped) or int16, shape (n,) -> PCM16LE bytes."""
    if samples.dtype != np.int16:
        samples = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    return samples.astype("<i2", copy=False).tobytes()


__all__ = ["AvatarClient", "AvatarClientError", "EventStream", "Mp4Recorder", "SessionInfo", "pcm16_bytes", "PCM_RATES"]
