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
at-fork handlers). Arguments and states cross the pipe pickled: a prepared
portrait once per worker, then per window the AudioWindow, MotionSettings and
state in, the new state out. Frames (1.5 MB for a window of two 512x512
frames) come back through a shared buffer (``avatar.shared_frames``), which
costs a tenth of pickling them through the pipe.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing import forkserver, reduction, spawn
from multiprocessing.connection import Connection
from typing import Any

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from avatar.shared_frames import SharedFrames
from model.base import AudioWindow, Generator, MotionSettings, PreparedPortrait

logger = logging.getLogger(__name__)

#: Environment variable telling the fork server the main script's path (see avatar.fork_server).
FORK_SERVER_MAIN_ENV = "AVATAR_FORK_SERVER_MAIN"

class GeneratorProcessDied(RuntimeError):
    """The worker process ended while a window was asked of it."""


def limit_math_threads() -> None:
    """One BLAS and one OpenCV thread in this process, for processes that run
    sessions' generators side by side (workers, or the server without them)."""
    # Idle OpenBLAS workers spin between small calls and cost nearly a core per
    # process (bench: 1.34 -> 0.44 cores per session). OpenCV's pool splits each
    # 512x512 remap across the cores and costs more CPU for the same frames (the
    # animator: 11.7 -> 8.7 ms of CPU a frame), which the other sessions need.
    threadpool_limits(limits=1, user_api="blas")
    cv2.setNumThreads(1)


def preparation_executor(generator_module: str) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of one worker process, forked from the fork server (which imports
    ``generator_module``), for ``Generator.prepare``: MediaPipe and the animator's
    field solves hold the interpreter lock for up to about 0.2 s at a time, which
    in a thread of the server stalls every live session's frames (measured with
    an event-loop lag probe in bench/server_latency.py's server). Arguments and
    results are pickled; a worker that dies breaks the pool
    (``concurrent.futures.process.BrokenProcessPool``). Its worker starts at
    once, in a background thread: started by the first ``submit`` it would
    stall the submitting thread, the event loop, for up to 0.7 s."""
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=_configure_fork_server([generator_module]), initializer=limit_math_threads
    )
    threading.Thread(target=_start_pool, args=(pool,), name="preparation-start", daemon=True).start()
    return pool


def _start_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    with contextlib.suppress(RuntimeError):  # shut down before it started: nothing to start
        pool.submit(os.getpid)


def _serve(conn: Connection, factory: Callable[[], Generator]) -> None:
    """The worker's loop: ``(prepared or None, window, motion, state)`` in, ``("ok",
    frames, state)`` or ``("error", exception)`` out, until ``None`` or the pipe
    closes. ``frames`` is ``("shared", layout, new_buffer_size)`` when the frames
    are in the SharedFrames buffer (a new buffer's file descriptor follows the
    reply when ``new_buffer_size`` > 0), else the frames themselves."""
    limit_math_threads()
    generator = factory()
    portrait: PreparedPortrait | None = None
    shared: SharedFrames | None = None
    use_shared = SharedFrames.available()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        sent, window, motion, state = request
        portrait = sent if sent is not None else portrait
        new_buffer = None
        try:
            frames, state = generator.generate(portrait, window, motion, state)
            if use_shared and isinstance(frames, np.ndarray) and frames.flags.c_contiguous:
                if shared is None or not shared.fits(frames):
                    if shared is not None:
                        shared.close()
                    shared = new_buffer = SharedFrames.create(frames.nbytes)
                frames = ("shared", shared.write(frames), new_buffer.size if new_buffer else 0)
            reply = ("ok", frames, state)
        except Exception as exc:  # the caller re-raises it
            reply = ("error", exc)
        try:
            conn.send(reply)
            if new_buffer is not None:
                reduction.send_handle(conn, new_buffer.fd, None)  # the pid is unused on Unix
        except OSError:  # the session closed while this window was generated: nobody waits for it
            return


def _configure_fork_server(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """The forkserver context, its preload list set (it takes effect when the fork
    server starts, at the first worker or ``start_fork_server``)."""
    context = multiprocessing.get_context("forkserver")
    main_path = spawn.get_preparation_data("main").get("init_main_from_path")
    if main_path and FORK_SERVER_MAIN_ENV not in os.environ:  # read once, when the fork server starts
        os.environ[FORK_SERVER_MAIN_ENV] = main_path
    context.set_forkserver_preload([__name__, *preload, "avatar.fork_server"])
    return context


def factory_module(factory: Callable[..., Any]) -> str:
    """The module a fork server must import for ``factory`` to run in its
    workers: the factory's own (a Generator class, a partial of one)."""
    target = getattr(factory, "func", factory)  # a functools.partial names its function's module
    return getattr(target, "__module__", None) or __name__


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
    and ``prepare``, and once in the worker (one process, one pipe: the caller's
    thread waits in ``recv`` without the interpreter lock). ``preload``: modules the fork
    server imports once (default: ``factory``'s module), besides the main
    module and this one (see ``avatar.fork_server``). The worker starts at
    construction, so it is ready before the first window. ``generate`` blocks
    the calling thread (not the interpreter) until the worker answers; a worker
    that died raises GeneratorProcessDied, and the next call starts a new one.
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
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._shared: SharedFrames | None = None
        self._sent: PreparedPortrait | None = None
        # close() may run while a generate call waits on the worker: the send lock
        # keeps their messages from interleaving on the pipe, and whichever of the
        # two finishes last releases the pipe and the shared buffer.
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._in_call = False
        self._closed = False
        self._start()

    def _start(self) -> None:
        self._conn, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child, self._factory), daemon=True,
                                              name=f"generator-{self.name}")
        self._process.start()
        child.close()
        self._sent = None

    def _stop_process(self) -> None:
        """Ask the worker to exit (it finishes a window in progress first); kill it after 1 s."""
        conn, process = self._conn, self._process  # a generate call may release them meanwhile
        if conn is not None:
            with self._send_lock, contextlib.suppress(OSError):
                conn.send(None)
        if process is not None:
            process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join()

    def _release(self) -> None:
        """Close the pipe and unmap the shared buffer (after ``_stop_process``)."""
        if self._conn is not None:
            with self._send_lock:
                self._conn.close()
        if self._shared is not None:
            self._shared.close()
        self._conn = self._process = self._shared = None

    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        """As the wrapped generator's ``prepare`` (run in this process)."""
        return self._local.prepare(image)

    def generate(
        self, prepared: PreparedPortrait, window: AudioWindow, motion: MotionSettings, state: Any | None
    ) -> tuple[np.ndarray, Any]:
        """As the wrapped generator's ``generate``, run in the worker process.
        Raises what it raises, GeneratorProcessDied when the worker died (the
        next call starts a new one), and RuntimeError after ``close``. One
        caller at a time (the session engine's generation thread)."""
        with self._state_lock:
            if self._closed:
                raise RuntimeError("the generator process was closed")
            self._in_call = True
        try:
            return self._call(prepared, window, motion, state)
        finally:
            with self._state_lock:
                self._in_call = False
                closed = self._closed
            if closed:
                self._release()

    def _call(
        self, prepared: PreparedPortrait, window: AudioWindow, motion: MotionSettings, state: Any | None
    ) -> tuple[np.ndarray, Any]:
        conn = self._conn
        try:
            with self._send_lock:
                conn.send((None if prepared is self._sent else prepared, window, motion, state))
            status, frames, *rest = conn.recv()
            if status == "ok" and isinstance(frames, tuple):
                _, layout, new_size = frames
                if new_size:
                    if self._shared is not None:
                        self._shared.close()
                    self._shared = SharedFrames(reduction.recv_handle(conn), new_size)
                frames = self._shared.read(layout)
        except (EOFError, OSError) as exc:
            if self._closed:
                raise RuntimeError("the generator process was closed") from None
            logger.error("generator worker process died; starting a new one")
            self._stop_process()
            self._release()
            self._start()
            raise GeneratorProcessDied(f"the {self.name} worker process died: {type(exc).__name__}") from None
        self._sent = prepared
        if status == "error":
            raise frames
        return frames, rest[0]

    def close(self) -> None:
        """Stop the worker process (waiting up to 1 s for a window in progress);
        safe while another thread is in ``generate``, which then raises
        RuntimeError. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            busy = self._in_call
        self._stop_process()
        if not busy:
            self._release()
