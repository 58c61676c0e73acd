"""What the command-line tools share: one-line errors, no tracebacks, quiet native libraries,
and the choice of generator (``--generator``, ``--weights``)."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.base import Generator

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: ``--generator`` values: the CPU animator, FantasyTalking on real weights (``--weights``),
#: and FantasyTalking on tiny random networks (a smoke test of the diffusion path; noise video).
GENERATORS = ("animator", "fantasytalking", "fantasytalking-tiny")


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are the single line ``PROG: error: MESSAGE`` (exit 2),
    without the usage block argparse prints by default."""

    def error(self, message: str):  # noqa: D102 - argparse's documented hook
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def bounded(kind: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], float]:
    """argparse ``type`` converting with ``kind`` and accepting only [low, high];
    raises argparse.ArgumentTypeError naming the accepted range otherwise."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number in [{low:g}, {high:g}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in [{low:g}, {high:g}], got {text}")
        return value

    return convert


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--generator`` (one of GENERATORS, default animator) and ``--weights DIR``."""
    parser.add_argument("--generator", choices=GENERATORS, default="animator",
                        help="animator: real-time CPU face rig (default); fantasytalking: the FantasyTalking "
                        "diffusion model (needs --weights; a GPU in practice); fantasytalking-tiny: the same "
                        "model with tiny random networks, for smoke tests (its video is noise; --size 128 is quick)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="FantasyTalking weights directory (local files only; layout in README)")


def check_generator_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 (``parser.error``) when ``--weights`` is missing for ``--generator
    fantasytalking`` or given for a generator that takes none."""
    if args.generator == "fantasytalking" and args.weights is None:
        parser.error("--generator fantasytalking needs --weights DIR (the local weights directory)")
    if args.generator != "fantasytalking" and args.weights is not None:
        parser.error(f"--weights is only used with --generator fantasytalking, not {args.generator}")


def make_generator(name: str, weights: Path | None, *, seed: int, size: int) -> Generator:
    """The generator ``name`` (see GENERATORS). ``seed``: the animator's idle motion or the
    diffusion noise; ``size``: long side of the video, which FantasyTalking rounds down
    to a multiple of 16 (its reference image's longest edge). Raises WeightsError (an
    OSError) naming the missing file for an incomplete weights directory."""
    if name == "animator":
        from model.animator import CpuAnimator

        return CpuAnimator(seed=seed)
    import dataclasses

    from model.fantasytalking.generator import TINY_CONFIG, WEIGHTS_CONFIG, FantasyTalkingGenerator

    max_side = max(16, size // 16 * 16)
    if name == "fantasytalking":
        return FantasyTalkingGenerator.from_weights(
            weights, dataclasses.replace(WEIGHTS_CONFIG, seed=seed, max_side=max_side)
        )
    return FantasyTalkingGenerator.tiny(seed, dataclasses.replace(TINY_CONFIG, seed=seed, max_side=max_side))


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, so records
    still reach the terminal while ``native_stderr_silenced`` has replaced it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always sys.stderr


def configure_logging(prog: str, verbose: bool) -> None:
    """Log records go to stderr as ``PROG: message``; INFO and up with ``verbose``, else WARNING."""
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what native libraries write to file descriptor 2 to /dev/null, while Python's
    ``sys.stderr`` (errors, logging, progress bars) still reaches the real stderr.

    Why: MediaPipe's C++ logging prints several warning lines per face-mesh graph,
    which would bury the one-line error messages the tools promise.
    """
    try:
        python_uses_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        python_uses_fd2 = False
    sys.stderr.flush()
    saved_fd = os.dup(2)
    original_stderr = sys.stderr
    if python_uses_fd2:
        sys.stderr = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding=original_stderr.encoding, errors="replace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        if sys.stderr is not original_stderr:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = original_stderr
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def run_cli(prog: str, body: Callable[[], int], expected: tuple[type[BaseException], ...], verbose: bool) -> int:
    """Run a tool's body and turn failures into one line on stderr and an exit code.

    ``expected`` errors (bad input) print ``PROG: error: MESSAGE`` and return 2;
    Ctrl-C returns 130; anything else prints ``PROG: internal error: ...`` and
    returns 1 (the traceback is printed only with ``verbose``). Never raises.
    """
    try:
        if verbose:
            return body()
        with native_stderr_silenced():
            return body()
    except expected as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort: users get one line, not a traceback
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with --verbose for the traceback)"
        print(f"{prog}: internal error: {exc.__class__.__name__}: {exc}{hint}", file=sys.stderr)
        return 1
