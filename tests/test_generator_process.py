"""ProcessGenerator: a generator in a worker process gives the same frames as in
this process, survives its worker dying, and reports the wrapped generator's errors;
frames come back through a shared buffer; portraits prepared in a worker process
equal those prepared here."""
from __future__ import annotations

import functools
import io
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from PIL import Image

from avatar.generator_process import GeneratorProcessDied, ProcessGenerator, preparation_executor
from avatar.shared_frames import SharedFrames
from model.animator import CpuAnimator
from model.base import Generator, MotionSettings, PreparedPortrait, clip_windows
from model.portrait import load_portrait
from server.portraits import PortraitCache, PortraitRejected, prepare_image_bytes
from server.store import MemoryStore


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


class GrowingGenerator(Generator):
    """Random frames (seeded by the window's first frame) whose side grows by 64
    pixels a window, so the worker outgrows its shared buffer; ``delay_s``: each
    window takes this long (a slow generator)."""

    name = "growing"
    version = "1"
    window_frames = 2
    lookahead_frames = 0
    context_frames = 0

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def prepare(self, image):
        return PreparedPortrait(arrays={"none": np.zeros(1, np.uint8)})

    def generate(self, prepared, window, motion, state):
        if self.delay_s:
            time.sleep(self.delay_s)
        side = 64 * (1 + window.first_frame // 2)
        frames = np.random.default_rng(window.first_frame).integers(0, 256, (window.num_frames, side, side, 3))
        return frames.astype(np.uint8), window.first_frame


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not SharedFrames.available(), reason="shared frame buffers need Linux memfd")
def test_frames_of_growing_size_come_back_whole_through_new_shared_buffers():
    fds = open_fds()
    local, remote = GrowingGenerator(), ProcessGenerator(GrowingGenerator)
    try:
        prepared = remote.prepare(np.zeros((8, 8, 3), np.uint8))
        windows = list(clip_windows(np.zeros(16000, np.float32), remote))[:12]  # up to 768x768: over 1 MiB
        for window in windows:
            frames, state = remote.generate(prepared, window, MotionSettings(), None)
            expected, _ = local.generate(prepared, window, MotionSettings(), None)
            np.testing.assert_array_equal(frames, expected)
            assert state == window.first_frame
    finally:
        remote.close()
    assert open_fds() == fds  # pipe and shared buffer closed with the worker


class SignallingProcessGenerator(ProcessGenerator):
    """A ProcessGenerator that sets ``calling`` once a call has asked its worker."""

    def __init__(self, *args, **kwargs) -> None:
        self.calling = threading.Event()
        super().__init__(*args, **kwargs)

    def _call(self, *args):
        self.calling.set()
        return super()._call(*args)


def test_close_while_a_window_is_generated_ends_that_call_cleanly():
    fds = open_fds()
    generator = SignallingProcessGenerator(functools.partial(GrowingGenerator, delay_s=0.3))
    prepared = generator.prepare(np.zeros((8, 8, 3), np.uint8))
    window = next(clip_windows(np.zeros(1600, np.float32), generator))
    generator.generate(prepared, window, MotionSettings(), None)  # the shared buffer exists
    outcome: list = []

    def call() -> None:
        try:
            outcome.append(generator.generate(prepared, window, MotionSettings(), None))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    generator.calling.clear()
    caller = threading.Thread(target=call)
    caller.start()
    assert generator.calling.wait(timeout=5)
    generator.close()  # the worker is (nearly always) in its 0.3 s window: it finishes it, then exits
    caller.join(timeout=5)
    assert not caller.is_alive()
    (result,) = outcome
    if isinstance(result, Exception):  # close's stop message overtook the request
        assert isinstance(result, RuntimeError) and "closed" in str(result)
    else:
        assert result[1] == 0  # the window in flight came back whole
    with pytest.raises(RuntimeError, match="closed"):
        generator.generate(prepared, window, MotionSettings(), None)
    assert open_fds() == fds  # released by the call that finished last


@pytest.mark.skipif(not SharedFrames.available(), reason="shared frame buffers need Linux memfd")
def test_shared_frames_hand_back_copies_and_refuse_what_does_not_fit():
    writer = SharedFrames.create(100)
    reader = SharedFrames(os.dup(writer.fd), writer.size)  # as the server maps the worker's buffer
    try:
        assert writer.size == 1 << 20
        frames = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
        copy = reader.read(writer.write(frames))
        np.testing.assert_array_equal(copy, frames)
        writer.write(np.zeros_like(frames))  # the next window overwrites the buffer ...
        assert copy.any()  # ... not what was read before
        too_big = np.zeros(writer.size + 1, np.uint8)
        assert not writer.fits(too_big)
        with pytest.raises(ValueError, match="do not fit"):
            writer.write(too_big)
        with pytest.raises(ValueError, match="exceed"):
            reader.read(((writer.size + 1,), "|u1"))
    finally:
        writer.close()
        reader.close()
        writer.close()  # idempotent


async def test_portraits_prepared_in_a_worker_process_equal_those_prepared_here(cli_portrait_path):
    data = open(cli_portrait_path, "rb").read()
    executor = preparation_executor("model.animator.generator")
    try:
        cache = PortraitCache(MemoryStore(), CpuAnimator(), ttl_s=60, max_pixels=4096 * 4096, executor=executor)
        info = await cache.add(data)
        remote = await cache.get(info.portrait_id)
        local = prepare_image_bytes(CpuAnimator(), data)
        assert remote.meta == local.meta and sorted(remote.arrays) == sorted(local.arrays)
        for name, array in local.arrays.items():
            np.testing.assert_array_equal(remote.arrays[name], array)
        faceless = io.BytesIO()
        Image.new("RGB", (256, 256), (120, 130, 140)).save(faceless, format="PNG")
        with pytest.raises(PortraitRejected) as rejected:  # the worker's NoFaceError, carried back
            await cache.add(faceless.getvalue())
        assert rejected.value.code == "no_face"
    finally:
        executor.shutdown()


async def test_a_dead_preparation_process_leaves_uploads_working_in_a_thread(cli_portrait_path):
    executor = preparation_executor("model.animator.generator")
    with pytest.raises(BrokenProcessPool):
        executor.submit(os._exit, 3).result(timeout=30)  # the worker dies: the pool is broken
    try:
        cache = PortraitCache(MemoryStore(), CpuAnimator(), ttl_s=60, max_pixels=4096 * 4096, executor=executor)
        info = await cache.add(open(cli_portrait_path, "rb").read())
        assert await cache.get(info.portrait_id) is not None
    finally:
        executor.shutdown()
