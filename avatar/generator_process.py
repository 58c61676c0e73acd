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

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from multiprocessing import forkserver, spawn
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from model.base import AudioWindow, Generator, MotionSettings, PreparedPortrait

logger = logging.getLogger(__name__)

#: Environment variable telling the fork server the main script's path (see avatar.fork_server).
FORK_SERVER_MAIN_ENV = "AVATAR_FORK_SERVER_MAIN"

class GeneratorProcessDied(RuntimeError):
    """The worker process ended while a window was asked of it."""


def _serve(conn: Connection, factory: Callable[[], Generator]) -> None:
    """The worker's loop: ``(prepared or None, window, motion, state)`` in, ``("ok",
    (frames, state))`` or ``("error", exception)`` out, until ``None`` or the pipe closes."""
    # One BLAS thread: idle OpenBLAS workers spin between small calls and would
    # take a core from the other sessions.
    threadpool_limits(limits=1, user_api="blas")
    generator = factory()
    portrait: PreparedPortrait | None = None
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        sent, window, motion, state = request
        portrait = sent if sent is not None else portrait
        try:
            reply = ("ok", generator.generate(portrait, window, motion, state))
        except Exception as exc:  # the caller re-raises it
            reply = ("error", exc)
        conn.send(reply)


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
        self._sent: PreparedPortrait | None = None
        self._closed = False
        self._start()

    def _start(self) -> None:
        self._conn, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child, self._factory), daemon=True,
                                              name=f"generator-{self.name}")
        self._process.start()
        child.close()
        self._sent = None

    def _stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=1.0)
            if self._process.is_alive():
                self._process.kill()
        self._conn = self._process = None

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
        if self._closed:
            raise RuntimeError("the generator process was closed")
        try:
            self._conn.send((None if prepared is self._sent else prepared, window, motion, state))
            status, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            if self._closed:
                raise RuntimeError("the generator process was closed") from None
            logger.error("generator worker process died; starting a new one")
            self._stop()
            self._start()
            raise GeneratorProcessDied(f"the {self.name} worker process died: {type(exc).__name__}") from None
        self._sent = prepared
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the worker process. Idempotent."""
        if not self._closed:
            self._closed = True
            self._stop()
