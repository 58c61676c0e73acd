"""Text to speech for the ``say`` message, with espeak-ng (a formant synthesiser:
robotic but small, fast and offline).

The text goes to espeak-ng on stdin, never on the command line, so no text can
be taken for an option; the WAV it writes to stdout is decoded with ``wave``.
"""
from __future__ import annotations

import asyncio
import io
import logging
import shutil
import subprocess
import wave

import numpy as np

logger = logging.getLogger(__name__)

VOICE = "en-us"
WORDS_PER_MINUTE = 165
#: Longest a synthesis may take, seconds (espeak-ng needs well under one for 1000 characters).
TIMEOUT_S = 20.0
UNAVAILABLE_MESSAGE = (
    "text-to-speech needs espeak-ng, which is not installed on the server "
    "(Debian/Ubuntu: apt-get install espeak-ng); send audio instead"
)


class TtsUnavailable(RuntimeError):
    """No speech synthesiser is installed; the message says what to install."""


class TtsError(RuntimeError):
    """The synthesiser failed on a text."""


class EspeakTts:
    """espeak-ng run as a subprocess per text.

    ``executable``: path of espeak-ng; default: found on PATH (None when not
    installed: ``available`` is False and ``synthesize`` raises TtsUnavailable).
    """

    def __init__(self, executable: str | None = None, *, search_path: bool = True) -> None:
        self.executable = executable or (shutil.which("espeak-ng") if search_path else None)

    @property
    def available(self) -> bool:
        """Whether synthesis can run."""
        return self.executable is not None

    async def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Speech for ``text``: int16 (n,) mono samples and their rate in Hz
        (espeak-ng: 22050). Raises TtsUnavailable, or TtsError when espeak-ng
        fails, times out after TIMEOUT_S or writes no audio."""
        if self.executable is None:
            raise TtsUnavailable(UNAVAILABLE_MESSAGE)
        # subprocess (vfork/posix_spawn) in a thread, not the event loop's subprocess
        # support: uvloop starts children with fork(), whose at-fork handlers stop
        # OpenBLAS's worker threads under a generator thread that is mid-call and
        # hang it for good. A cancelled await (an interrupt) lets the short
        # synthesis finish in its thread and drops the result.
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                [self.executable, "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "--stdout", "--stdin"],
                input=text.encode("utf-8"),
                capture_output=True,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise TtsError(f"espeak-ng took longer than {TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise TtsError(f"espeak-ng failed (exit {done.returncode}): {detail[-1] if detail else 'no message'}")
        out = done.stdout
        return _decode_wav(out)


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise TtsError(f"espeak-ng wrote {8 * wav.getsampwidth()}-bit audio; expected 16-bit PCM")
            rate, channels = wav.getframerate(), wav.getnchannels()
            # espeak-ng streams to stdout without knowing the length: the header's
            # frame count is a placeholder, so read everything after it.
            frames = wav.readframes(1 << 31)
    except (wave.Error, EOFError) as exc:
        raise TtsError(f"espeak-ng wrote no readable WAV audio: {exc}") from None
    samples = np.frombuffer(frames[: len(frames) // (2 * channels) * 2 * channels], dtype="<i2")
    samples = samples.reshape(-1, channels)[:, 0].astype(np.int16)
    if samples.size == 0:
        raise TtsError("espeak-ng produced no audio for this text")
    return samples, rate
