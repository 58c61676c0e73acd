"""ProcessGenerator: a generator in a worker process gives the same frames as in
this process, survives its worker dying, and reports the wrapped generator's errors."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from avatar.generator_process import GeneratorProcessDied, ProcessGenerator
from model.animator import CpuAnimator
from model.base import Generator, MotionSettings, PreparedPortrait, clip_windows
from model.portrait import load_portrait


class FailingGenerator(Generator):
    """Frames of one grey level per window; on frame ``exit_at`` the worker process
    exits, on frame ``raise_at`` generate raises ValueError."""

    name = "failing"
    version = "1"
    window_frames = 2
    lookahead_frames = 0
    context_frames = 0

    def __init__(self, exit_at: int = -1, raise_at: int = -1, marker: str = "") -> None:
        self.exit_at, self.raise_at, self.marker = exit_at, raise_at, marker

    def prepare(self, image):
        return PreparedPortrait(arrays={"level": np.array(7, np.uint8)})

    def generate(self, prepared, window, motion, state):
        if window.first_frame == self.exit_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()  # die once: the replacement worker goes on
            os._exit(3)
        if window.first_frame == self.raise_at:
            raise ValueError(f"no frames for {window.first_frame}")
        level = int(prepared.arrays["level"]) + window.first_frame
        return np.full((window.num_frames, 4, 4, 3), level, np.uint8), (state or 0) + 1


@pytest.fixture(scope="module")
def animator_portrait(cli_portrait_path):
    image = load_portrait(cli_portrait_path, size=256)
    return CpuAnimator(seed=3).prepare(image)


def test_worker_frames_equal_in_process_frames(animator_portrait, engine_speech):
    windows = list(clip_windows(engine_speech[: 16000 // 2], CpuAnimator()))[:4]
    motion = MotionSettings(face=0.8, body=0.3)
    local, state = CpuAnimator(seed=3), None
    expected = []
    for window in windows:
        frames, state = local.generate(animator_portrait, window, motion, state)
        expected.append(frames)
    remote = ProcessGenerator(functools.partial(CpuAnimator, seed=3))
    try:
        assert (remote.name, remote.window_frames, remote.lookahead_frames) == ("animator", 2, 1)
        state = None
        for window, want in zip(windows, expected):
            frames, state = remote.generate(animator_portrait, window, motion, state)
            np.testing.assert_array_equal(frames, want)
    finally:
        remote.close()


def test_a_dead_worker_fails_one_window_then_a_new_worker_goes_on(tmp_path):
    generator = ProcessGenerator(functools.partial(FailingGenerator, exit_at=2, marker=str(tmp_path / "died")))
    try:
        prepared = generator.prepare(np.zeros((8, 8, 3), np.uint8))
        windows = list(clip_windows(np.zeros(16000, np.float32), generator))
        frames, state = generator.generate(prepared, windows[0], MotionSettings(), None)
        assert int(frames[0, 0, 0, 0]) == 7 and state == 1
        with pytest.raises(GeneratorProcessDied):
            generator.generate(prepared, windows[1], MotionSettings(), state)
        frames, state = generator.generate(prepared, windows[1], MotionSettings(), state)
        assert int(frames[0, 0, 0, 0]) == 7 + 2 and state == 2  # the portrait was sent to the new worker
    finally:
        generator.close()


def test_errors_of_the_wrapped_generator_reach_the_caller_and_close_ends_it():
    generator = ProcessGenerator(functools.partial(FailingGenerator, raise_at=0))
    prepared = generator.prepare(np.zeros((8, 8, 3), np.uint8))
    window = next(clip_windows(np.zeros(1600, np.float32), generator))
    with pytest.raises(ValueError, match="no frames for 0"):
        generator.generate(prepared, window, MotionSettings(), None)
    generator.close()
    generator.close()
    with pytest.raises(RuntimeError, match="closed"):
        generator.generate(prepared, window, MotionSettings(), None)
