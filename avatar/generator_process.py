"""ProcessGenerator: a session's generator run in a worker process of its own.

Why: the CPU animator's per-frame work is many small NumPy/OpenCV calls with
Python between them, so generators of several sessions in one process queue on
the interpreter lock. Measured with four speaking 512x512 sessions in one
process (bench/server_latency.py): generation ran at 1.19x real time and a
third of the frames were late, with the machine's cores not yet busy. In a
worker process each session's generator has an interpreter of its own.

Workers are forked from multiprocessing's fork server, which starts once as a
fresh interpreter with the generator modules imported (``preload``): a new
session's worker starts in tens of milliseconds and never inherits the
server's threads (forking a threaded process can hang in OpenBLAS or uvloop
at-fork handlers). Arguments and results cross the pipe pickled: a prepared
portrait once per worker, then per window the AudioWindow, MotionSettings and
state in, frames and state out (about 1.5 MB for two 512x512 frames).
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver, spawn
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from model.base import AudioWindow, Generator, MotionSettings, PreparedPortrait

logger = logging.getLogger(__name__)

#: Environment variable telling the fork server the main script's path (see avatar.fork_server).
FORK_SERVER_MAIN_ENV = "AVATAR_FORK_SERVER_MAIN"

# In a worker process: its generator and the prepared portraits it was sent, by key.
_worker_generator: Generator | None = None
_worker_portraits: dict[int, PreparedPortrait] = {}


def _start_worker(factory: Callable[[], Generator]) -> None:
    global _worker_generator
    # One BLAS thread: idle OpenBLAS workers spin between small calls and would
    # take a core from the other sessions.
    threadpool_limits(limits=1, user_api="blas")
    _worker_generator = factory()


def _generate_in_worker(
    key: int, prepared: PreparedPortrait | None, window: AudioWindow, motion: MotionSettings, state: Any
) -> tuple[np.ndarray, Any]:
    if prepared is not None:
        _worker_portraits.clear()  # a session uses one portrait: keep only the newest
        _worker_portraits[key] = prepared
    return _worker_generator.generate(_worker_portraits[key], window, motion, state)


def _ready() -> bool:
    return _worker_generator is not None


def _configure_fork_server(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """The forkserver context, its preload list set (it takes effect when the fork
    server starts, at the first worker or ``start_fork_server``)."""
    context = multiprocessing.get_context("forkserver")
    main_path = spawn.get_preparation_data("main").get("init_main_from_path")
    if main_path and FORK_SERVER_MAIN_ENV not in os.environ:  # read once, when the fork server starts
        os.environ[FORK_SERVER_MAIN_ENV] = main_path
    context.set_forkserver_preload([__name__, *preload, "avatar.fork_server"])
    return context


def start_fork_server(generator_module: str) -> None:
    """Start the fork server now (blocking: it imports the main module and
    ``generator_module``, a second or more), so the first session's worker does
    not wait for it. Safe to call from a thread."""
    _configure_fork_server([generator_module])
    forkserver.ensure_running()


class ProcessGenerator(Generator):
    """Runs the generator made by ``factory`` in a worker process; same interface.

    ``factory``: a picklable callable (a Generator class, or a
    ``functools.partial`` of one) called once here, for the class attributes
    and ``prepare``, and once in the worker. ``preload``: modules the fork
    server imports once (default: ``factory``'s module), besides the main
    module and this one (see ``avatar.fork_server``). The worker starts at
    construction, so it is ready before the first window. ``generate`` blocks
    the calling thread (not the interpreter) until the worker answers; a worker
    that died raises BrokenProcessPool, and the next call starts a new one.
    Call ``close`` when the session ends. Intended for CPU generators; a GPU
    model shared by sessions should stay in one process.
    """

    def __init__(self, factory: Callable[[], Generator], *, preload: Sequence[str] | None = None) -> None:
        local = factory()
        self._local = local
        self.name, self.version, self.fps = local.name, local.version, local.fps
        self.window_frames = local.window_frames
        self.lookahead_frames = local.lookahead_frames
        self.context_frames = local.context_frames
        self._factory = factory
        self._context = _configure_fork_server(preload or [type(local).__module__])
        self._sent: PreparedPortrait | None = None
        self._executor = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=self._context, initializer=_start_worker, initargs=(self._factory,)
        )
        executor.submit(_ready)  # start the worker now rather than at the first window
        self._sent = None
        return executor

    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        """As the wrapped generator's ``prepare`` (run in this process)."""
        return self._local.prepare(image)

    def generate(
        self, prepared: PreparedPortrait, window: AudioWindow, motion: MotionSettings, state: Any | None
    ) -> tuple[np.ndarray, Any]:
        """As the wrapped generator's ``generate``, run in the worker process.
        Raises what it raises, BrokenProcessPool when the worker died, and
        RuntimeError after ``close``."""
        if self._executor is None:
            raise RuntimeError("the generator process was closed")
        send = None if prepared is self._sent else prepared
        try:
            frames, new_state = self._executor.submit(
                _generate_in_worker, id(prepared), send, window, motion, state
            ).result()
        except BrokenProcessPool:
            logger.error("generator worker process died; starting a new one")
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
            raise
        self._sent = prepared
        return frames, new_state

    def close(self) -> None:
        """Stop the worker process. Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
