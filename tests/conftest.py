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
