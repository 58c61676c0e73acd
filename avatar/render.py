"""``avatar-render``: render a talking-portrait MP4 offline, through the live session engine.

    avatar-render --portrait IMG --audio AUDIO -o OUT.mp4 [--fps FPS] [--size 512]
                  [--face 0.5] [--body 0.5] [--seed N]
                  [--generator animator|fantasytalking|fantasytalking-tiny] [--weights DIR] [-v]

The audio is pushed in 20 ms chunks, as a live stream would arrive, to a session
running on a VirtualClock (so faster than real time); the frames of that one
utterance are written to OUT.mp4 (H.264 + AAC). ``--generator`` picks the CPU
animator (default), the FantasyTalking diffusion model (``--weights DIR``, a local
weights directory) or ``fantasytalking-tiny``, the same model with tiny random
networks for smoke tests (its video is noise). Exit 0 on success, 2 on bad input
(one line on stderr, nothing written; also a missing or incomplete weights
directory), 130 when interrupted.
"""
from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from avatar.audio_file import AudioFileError, load_audio
from avatar.cli_common import (
    OneLineParser,
    add_generator_arguments,
    bounded,
    check_generator_arguments,
    configure_logging,
    make_generator,
    run_cli,
)
from avatar.clock import VirtualClock
from avatar.frames import AudioChunk, AvatarFrame, MotionSettings, PlaybackFinished, SessionError
from avatar.session import AvatarSession
from avatar.video_out import Mp4Writer
from model.errors import PortraitError
from model.portrait import MAX_SIDE, load_portrait

logger = logging.getLogger(__name__)

PROG = "avatar-render"
CHUNK_SECONDS = 0.020  # push size: what a live client typically sends
MIN_FPS, MAX_FPS = 10.0, 60.0
MIN_SIZE, MAX_SIZE = 128, 1024  # pixels, long side of the output video


class RenderError(ValueError):
    """The render cannot start with these arguments; the message says why."""


def build_parser() -> OneLineParser:
    """The command-line interface of ``avatar-render``."""
    parser = OneLineParser(prog=PROG, description="Render a video of a portrait speaking an audio file.")
    parser.add_argument("--portrait", type=Path, required=True, help="portrait photo (PNG, JPEG, WebP, BMP)")
    parser.add_argument("--audio", type=Path, required=True, help="speech (WAV, MP3, FLAC, OGG, M4A, ...)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output video, must end in .mp4 (its directory is created if missing)")
    parser.add_argument("--fps", type=bounded(float, MIN_FPS, MAX_FPS, "--fps"), default=None,
                        help=f"frames per second, {MIN_FPS:g} to {MAX_FPS:g} (default: the generator's, "
                        "25 for the animator, 23 for fantasytalking)")
    parser.add_argument("--size", type=bounded(int, MIN_SIZE, MAX_SIZE, "--size"), default=512,
                        help=f"long side of the video in pixels, {MIN_SIZE} to {MAX_SIZE} (default 512)")
    parser.add_argument("--face", type=bounded(float, 0.0, 1.0, "--face"), default=0.5,
                        help="expression intensity in [0, 1] (default 0.5)")
    parser.add_argument("--body", type=bounded(float, 0.0, 1.0, "--body"), default=0.5,
                        help="head and body motion in [0, 1] (default 0.5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the idle motion, or of the diffusion noise (default 0)")
    add_generator_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress notes and native library logs")
    return parser


def check_output_path(path: Path) -> None:
    """Raise RenderError unless ``path`` ends in .mp4 (any case), is not a directory,
    and no ancestor of it is a file (a missing directory is created later, once the
    inputs have passed their checks)."""
    if path.suffix.lower() != ".mp4":
        raise RenderError(f"output must be an .mp4 file, got {path.name!r}")
    if path.is_dir():
        raise RenderError(f"output {path} is a directory; give a file name ending in .mp4")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise RenderError(f"cannot write {path}: {blocking} is a file, not a directory")


def load_render_portrait(path: Path, size: int) -> np.ndarray:
    """The portrait as RGB uint8 (H, W, 3) with its long side ``size`` pixels (even sides).

    A huge image (long side over MAX_SIDE pixels) is downscaled with a note on
    stderr. Raises PortraitError (missing, not an image, short side < 128 px).
    """
    image = load_portrait(path, size=size)  # validates the file first
    with Image.open(path) as header:  # reads the header only: the original size
        original = header.size
    if max(original) > MAX_SIDE:
        logger.warning(
            "note: portrait is %dx%d pixels; downscaled to %dx%d",
            *original, image.shape[1], image.shape[0],
        )
    return image


def live_chunks(samples: np.ndarray, sample_rate: int) -> list[AudioChunk]:
    """Cut float32 (n, channels) audio into CHUNK_SECONDS chunks the engine accepts:
    more than two channels are mixed down to mono (the engine takes 1 or 2)."""
    if samples.shape[1] > 2:
        samples = samples.mean(axis=1, keepdims=True)
    samples = np.ascontiguousarray(samples[:, 0] if samples.shape[1] == 1 else samples, dtype=np.float32)
    step = max(1, round(CHUNK_SECONDS * sample_rate))
    return [AudioChunk(samples[i : i + step], sample_rate) for i in range(0, samples.shape[0], step)]


async def render_utterance(
    session: AvatarSession,
    chunks: list[AudioChunk],
    on_frame: Callable[[AvatarFrame], None],
) -> int:
    """Push ``chunks`` as one utterance into a started ``session`` and pass each of its
    frames (speaking frames, in order) to ``on_frame``, until PlaybackFinished.

    Returns the number of frames. Raises RuntimeError when the session reports an
    error (a generator failure would otherwise leave a glitch in the video).
    """
    finished = asyncio.Event()
    errors: list[str] = []

    def raise_on_error() -> None:
        if errors:
            raise RuntimeError(f"session error: {errors[0]}")

    async def watch_events() -> None:
        async for event in session.events():
            if isinstance(event, PlaybackFinished):
                finished.set()
            elif isinstance(event, SessionError):
                errors.append(event.message)

    async def feed() -> None:
        for chunk in chunks:
            await session.push_audio(chunk)
        session.end_of_speech()

    watcher = asyncio.create_task(watch_events())
    await asyncio.sleep(0)  # subscribe before any audio goes in
    feeder = asyncio.create_task(feed())
    count = 0
    try:
        async for frame in session:
            raise_on_error()
            if frame.speaking:
                on_frame(frame)
                count += 1
            if finished.is_set():
                break
        await feeder  # re-raises a push error, if any
        await asyncio.sleep(0)  # let the watcher take events the last frames caused
        raise_on_error()
    finally:
        for task in (feeder, watcher):
            task.cancel()
        await asyncio.gather(feeder, watcher, return_exceptions=True)
    return count


async def _render(args, image: np.ndarray, samples: np.ndarray, rate: int) -> tuple[Path, int, float]:
    # SIGTERM cancels the render like Ctrl-C does (asyncio.run handles SIGINT), so
    # the writer removes its partial file; raising from a plain signal handler could
    # land anywhere inside the event loop.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    generator = make_generator(args.generator, args.weights, seed=args.seed, size=args.size)
    prepared = generator.prepare(image)
    chunks = live_chunks(samples, rate)
    fps = args.fps or generator.fps
    expected = math.ceil(samples.shape[0] / rate * fps)
    height, width = prepared.arrays["image"].shape[:2]  # the frames' size (a generator may round it)
    session = AvatarSession(
        generator, prepared, fps=fps, motion=MotionSettings(args.face, args.body), clock=VirtualClock()
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)  # e.g. out/ for `make demo`
    with Mp4Writer(args.output, width, height, fps) as writer, tqdm(
        total=expected, unit="frame", desc=PROG, file=sys.stderr, leave=False
    ) as progress:

        def write(frame: AvatarFrame) -> None:
            writer.add(frame)
            progress.update()

        async with session:
            count = await render_utterance(session, chunks, write)
    return args.output, count, fps


def _run(args) -> int:
    check_output_path(args.output)
    samples, rate = load_audio(args.audio)
    image = load_render_portrait(args.portrait, args.size)
    try:
        path, count, fps = asyncio.run(_render(args, image, samples, rate))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None  # SIGTERM: report it as an interruption
    print(f"{path}: {count} frames ({count / fps:.2f} s at {fps:g} fps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``avatar-render``; returns the exit status (see module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_generator_arguments(parser, args)
    configure_logging(PROG, args.verbose)
    return run_cli(PROG, lambda: _run(args), (AudioFileError, PortraitError, RenderError, OSError), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
