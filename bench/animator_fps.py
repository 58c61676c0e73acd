"""Frames per second of CpuAnimator.generate on ONE CPU core (no encoding).

Pins the process to core 0 and sets every math library to one thread (before
numpy is imported), prepares the portrait, then generates the video of about
10 s of the shared speech clips in consecutive windows, as the session engine
would. Prints frames per second and milliseconds per frame; the target is
>= 25 fps at 512 x 512.

    .venv/bin/python bench/animator_fps.py [--portrait assets/portrait.png]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.animator import CpuAnimator  # noqa: E402
from model.base import MotionSettings, clip_windows  # noqa: E402
from model.portrait import load_portrait  # noqa: E402

SPEECH = [
    Path("/work/shared/data/speech/librivox_0870.wav"),
    Path("/work/shared/data/speech/librivox_0880.wav"),
]


def read_wav(path: Path) -> np.ndarray:
    """16 kHz mono PCM16 WAV -> float32 samples in [-1, 1]."""
    with wave.open(str(path), "rb") as wav:
        if wav.getframerate() != 16000 or wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit PCM")
        return np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portrait", default=str(ROOT / "assets" / "portrait.png"))
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    cv2.setNumThreads(1)

    generator = CpuAnimator()
    image = load_portrait(args.portrait)
    started = time.perf_counter()
    prepared = generator.prepare(image)
    prepare_s = time.perf_counter() - started
    audio = np.concatenate([read_wav(path) for path in SPEECH])
    motion = MotionSettings(face=0.5, body=0.5)
    batches = list(clip_windows(audio, generator))

    state = None
    generator.generate(prepared, batches[0], motion, None)  # warm-up: caches, first allocations
    frames = 0
    started = time.perf_counter()
    for window in batches:
        out, state = generator.generate(prepared, window, motion, state)
        frames += len(out)
    elapsed = time.perf_counter() - started
    height, width = image.shape[:2]
    print(f"portrait {width}x{height}, prepare {prepare_s:.2f} s (not counted)")
    print(f"{frames} frames ({len(audio) / 16000:.1f} s of speech) in {elapsed:.2f} s on one core")
    print(f"{frames / elapsed:.1f} fps, {1000 * elapsed / frames:.1f} ms/frame")


if __name__ == "__main__":
    main()
