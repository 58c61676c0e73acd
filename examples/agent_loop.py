"""An agent loop with the Python client: what a conversational agent does with the avatar.

    .venv/bin/python examples/agent_loop.py --serve                 # starts its own server
    .venv/bin/python examples/agent_loop.py --server http://HOST:8080 [--api-key KEY]

Steps: create a session (optionally on an uploaded portrait), record what comes
back to an MP4, connect (WebRTC media + events), then

1. stream a WAV as a TTS engine would: 24 kHz PCM16 in 200 ms chunks, four
   times faster than real time, then ``speech_end``; wait for ``playback_finished``;
2. change the motion (livelier face, calmer body);
3. stream the same speech again and interrupt it halfway (a user barging in);
   wait for ``playback_finished`` with ``interrupted: true``;
4. close: the session is deleted and the recording finished.

``--serve`` runs ``python -m server`` on a free loopback port (ICE host
candidates pinned to 127.0.0.1) for the length of the example. Against a server
on the same machine, pass ``--ice-host 127.0.0.1`` when the machine has no
other network interface.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from scipy.signal import resample_poly

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar.audio_file import AudioFileError, load_audio, to_mono_16k  # noqa: E402
from server.client import AvatarClient, AvatarClientError, pcm16_bytes  # noqa: E402
from server.webrtc import pin_ice_host_addresses  # noqa: E402

TTS_RATE = 24000
CHUNK_S = 0.2
SPEEDUP = 4.0  # the fake TTS produces audio this many times faster than it plays

logger = logging.getLogger("agent_loop")


def tts_audio(path: Path) -> np.ndarray:
    """A speech file as int16 mono at 24 kHz (the stand-in for a TTS engine's output)."""
    samples, rate = load_audio(path)
    mono16k = to_mono_16k(samples, rate)
    return (np.clip(resample_poly(mono16k, 3, 2), -1.0, 1.0) * 32767).astype(np.int16)


async def speak(client: AvatarClient, pcm: np.ndarray) -> None:
    """Stream ``pcm`` in CHUNK_S chunks, SPEEDUP times faster than real time, then end the utterance."""
    step = round(TTS_RATE * CHUNK_S)
    for start in range(0, len(pcm), step):
        await client.push_pcm(pcm16_bytes(pcm[start:start + step]), TTS_RATE)
        await asyncio.sleep(CHUNK_S / SPEEDUP)  # the TTS engine producing the next chunk
    await client.speech_end()


async def create_session_when_free(client: AvatarClient, portrait_id: str | None, fps: float, tries: int = 3):
    """Create the session; a busy server (503) is asked again after its Retry-After."""
    for attempt in range(1, tries + 1):
        try:
            return await client.create_session(portrait_id=portrait_id, fps=fps)
        except AvatarClientError as exc:
            if exc.retry_after_s is None or attempt == tries:
                raise
            print(f"server busy ({exc.code}); trying again in {exc.retry_after_s:g} s")
            await asyncio.sleep(exc.retry_after_s)


async def agent(args, server_url: str) -> None:
    speech = tts_audio(args.speech)
    duration = len(speech) / TTS_RATE
    async with AvatarClient(server_url, api_key=args.api_key) as client:
        portrait_id = await client.upload_portrait(args.portrait) if args.portrait else None
        info = await create_session_when_free(client, portrait_id, args.fps)
        print(f"session {info.session_id[:8]} on {'an uploaded' if portrait_id else 'the bundled'} portrait")
        await client.record(args.out)
        events = client.events()
        started = time.monotonic()
        await client.connect()
        print(f"connected in {time.monotonic() - started:.2f} s; recording to {args.out}")

        print(f"1. speaking {duration:.1f} s of audio, streamed {SPEEDUP:g}x faster than real time")
        await speak(client, speech)
        finished = await events.wait_for("playback_finished", timeout_s=duration + 10)
        print(f"   played {finished['position']:.2f} s (interrupted: {finished['interrupted']})")

        print("2. motion: face 0.8, body 0.3")
        await client.set_motion(0.8, 0.3)

        print("3. speaking again, interrupted halfway")
        talking = asyncio.create_task(speak(client, speech))
        await events.wait_for("playback_started", timeout_s=10)
        await asyncio.sleep(duration / 2)
        await client.interrupt()
        finished = await events.wait_for("playback_finished", timeout_s=5)
        await talking
        print(f"   cut at {finished['position']:.2f} s (interrupted: {finished['interrupted']})")

        stats = await events.wait_for("stats", timeout_s=5)
        shown = {k: stats.get(k) for k in ("fps", "time_to_first_frame_s", "audio_to_lip_latency_s", "rtf")}
        print("   stats: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(f"4. closed; received {client.frames_received['video']} video frames, recording in {args.out}")


@contextlib.contextmanager
def local_server():
    """``python -m server`` on a free loopback port; yields its URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, AVATAR_PORT=str(port), AVATAR_HOST="127.0.0.1", AVATAR_ICE_HOST_ADDRESSES="127.0.0.1")
    process = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("agent_loop: the local server did not start (see its messages above)")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="server URL (ignored with --serve)")
    parser.add_argument("--serve", action="store_true", help="start a local server for the example")
    parser.add_argument("--api-key", default=os.environ.get("AVATAR_API_KEY"), help="default: $AVATAR_API_KEY")
    parser.add_argument("--portrait", type=Path, help="upload this image instead of using the bundled portrait")
    parser.add_argument("--speech", type=Path, default=ROOT / "assets" / "speech.wav", help="the agent's speech")
    parser.add_argument("--fps", type=float, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "agent_loop.mp4", help="recording (MP4)")
    parser.add_argument("--ice-host", action="append", default=[], metavar="IP",
                        help="offer only this address as ICE host candidate (repeatable; e.g. 127.0.0.1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pin_ice_host_addresses(["127.0.0.1"] if args.serve else args.ice_host)
    try:
        if args.serve:
            with local_server() as url:
                asyncio.run(agent(args, url))
        else:
            asyncio.run(agent(args, args.server))
    except (AvatarClientError, AudioFileError, OSError, ValueError) as exc:
        raise SystemExit(f"agent_loop: {exc}") from None
    except asyncio.TimeoutError:
        raise SystemExit("agent_loop: the server did not answer in time") from None


if __name__ == "__main__":
    main()
