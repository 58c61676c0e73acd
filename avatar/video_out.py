"""Writing avatar frames to an MP4 file (H.264 video + AAC audio) with PyAV.

Video pts come from the frames' pts and audio from their paired slices, so the
two streams are aligned by construction. The file appears at its path only when
complete: it is written to a hidden temporary file in the same directory and
renamed on success; on failure the temporary file is removed.
"""
from __future__ import annotations

import logging
import os
import secrets
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avatar.frames import AUDIO_SAMPLE_RATE, TIME_BASE, AvatarFrame

logger = logging.getLogger(__name__)

VIDEO_CODEC = "libx264"
VIDEO_CRF = 20  # visually near-lossless for talking heads at a modest size
VIDEO_PRESET = "veryfast"  # encoding must not slow down the render noticeably
AUDIO_CODEC = "aac"
AUDIO_BITRATE = 64_000  # bits/s; plenty for 16 kHz mono speech


def _create_temp_beside(path: Path) -> Path:
    # Same directory so the final rename is atomic; created with the mode a plain
    # open() would give (mkstemp's 0600 would end up on the finished file).
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return temp
        except FileExistsError:
            continue


class Mp4Writer:
    """An MP4 file being written; use as a context manager.

    ``path``: final file; ``width``, ``height``: pixels (even, as yuv420p needs);
    ``fps``: frames per second (float; stored as a fraction). Frames are
    AvatarFrame with RGB uint8 (height, width, 3) images and float32 mono 16 kHz
    audio slices, pts in TIME_BASE (1/16000 s) units; the file's time 0 is the
    first frame's pts (a session's utterance rarely starts at frame 0). Leaving the ``with``
    block normally finishes the file and renames it into place; leaving it with
    an exception (or calling ``abort``) removes everything written.
    Raises ValueError for a frame of the wrong size, OSError when the directory
    is not writable.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"video size must be even for yuv420p, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self._temp = _create_temp_beside(self.path)
        self._closed = False
        self._origin: int | None = None
        self.frames_written = 0
        try:
            self._container = av.open(str(self._temp), mode="w", format="mp4")
            self._video = self._container.add_stream(VIDEO_CODEC, rate=Fraction(fps).limit_denominator(1001))
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"
            self._video.options = {"crf": str(VIDEO_CRF), "preset": VIDEO_PRESET}
            self._audio = self._container.add_stream(AUDIO_CODEC, rate=AUDIO_SAMPLE_RATE, layout="mono")
            self._audio.bit_rate = AUDIO_BITRATE
        except BaseException:
            self._temp.unlink(missing_ok=True)
            raise

    def add(self, frame: AvatarFrame) -> None:
        """Encode one frame and its audio slice."""
        image = frame.video.image
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 ({self.height}, {self.width}, 3), got {image.dtype} {image.shape}"
            )
        if self._origin is None:
            self._origin = frame.video.pts
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        picture.pts, picture.time_base = frame.video.pts - self._origin, TIME_BASE
        self._mux(self._video.encode(picture))
        samples = np.asarray(frame.audio.samples, dtype=np.float32).reshape(1, -1)
        if samples.size:
            sound = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            sound.sample_rate = AUDIO_SAMPLE_RATE
            sound.pts, sound.time_base = frame.audio.pts - self._origin, TIME_BASE
            self._mux(self._audio.encode(sound))
        self.frames_written += 1

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def finish(self) -> Path:
        """Flush the encoders, close the file and rename it to ``path``; returns ``path``."""
        try:
            self._mux(self._video.encode(None))
            self._mux(self._audio.encode(None))
            self._container.close()
            self._closed = True
            os.replace(self._temp, self.path)
        except BaseException:
            self.abort()
            raise
        logger.info("wrote %s (%d frames)", self.path, self.frames_written)
        return self.path

    def abort(self) -> None:
        """Stop writing and remove the temporary file; ``path`` is left untouched."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except av.FFmpegError:
                pass  # the file is deleted next; a failed trailer does not matter
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
