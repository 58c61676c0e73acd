"""The generator interface the session engine drives.

A generator has two calls:

* ``prepare(image) -> PreparedPortrait``: everything the per-frame path needs from
  the portrait, computed once and cached by (image sha256, generator name, version).
* ``generate(prepared, window, motion, state) -> (frames, state)``: the video frames
  of one window of audio, continuing the previous window through ``state``.

The engine knows nothing else about a generator.
"""
from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

#: Sample rate of all audio given to generators, Hz (mono float32 in [-1, 1]).
AUDIO_SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class MotionSettings:
    """Motion intensity, each in [0, 1]; 0.5 is neutral, 0 nearly still, 1 lively.

    ``face``: expression and mouth/brow/eye amplitude. ``body``: head rotation,
    nods and shoulder breathing. Raises ValueError outside [0, 1].
    """

    face: float = 0.5
    body: float = 0.5

    def __post_init__(self) -> None:
        for name in ("face", "body"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"motion {name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class AudioWindow:
    """The audio of one generation window, on the session's media clock.

    ``audio``: float32 mono samples at AUDIO_SAMPLE_RATE, shape (n,), covering
    ``context_before`` samples before the window's first frame, the window itself,
    then ``context_after`` samples after its last frame (zeros where not yet known).
    The window's frames are ``first_frame .. first_frame + num_frames - 1``; frame k
    (global index) starts at sample ``frame_start_sample(k, fps)`` of the session.
    ``speech``: bool per frame, shape (num_frames,): voice activity (webrtcvad) of
    each frame's audio slice.
    """

    audio: np.ndarray
    first_frame: int
    num_frames: int
    fps: float
    context_before: int
    context_after: int
    speech: np.ndarray

    def __post_init__(self) -> None:
        if self.audio.dtype != np.float32 or self.audio.ndim != 1:
            raise ValueError(f"audio must be 1-D float32, got {self.audio.dtype} {self.audio.shape}")
        if self.speech.shape != (self.num_frames,):
            raise ValueError(f"speech must have shape ({self.num_frames},), got {self.speech.shape}")

    def frame_audio(self, k: int) -> np.ndarray:
        """Samples of the window's k-th frame (0-based within the window), shape (m,)."""
        offset = frame_start_sample(self.first_frame, self.fps) - self.context_before
        start = frame_start_sample(self.first_frame + k, self.fps) - offset
        stop = frame_start_sample(self.first_frame + k + 1, self.fps) - offset
        return self.audio[start:stop]


def frame_start_sample(frame: int, fps: float) -> int:
    """First sample (at AUDIO_SAMPLE_RATE) of video frame ``frame`` at ``fps``.

    Frame n owns samples [start(n), start(n+1)); rounding keeps the long-run
    rate exact for fps that do not divide 16 kHz (e.g. 23 fps).
    """
    return round(frame * AUDIO_SAMPLE_RATE / fps)


@dataclass
class PreparedPortrait:
    """A portrait's precomputed assets: named arrays plus JSON-able metadata.

    Serialised with ``to_bytes`` as an .npz of plain arrays (never pickle); the
    same image bytes always give the same ``to_bytes`` output.
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = np.frombuffer(json.dumps(self.meta, sort_keys=True).encode(), dtype=np.uint8)
        np.savez(buf, __meta__=meta, **dict(sorted(self.arrays.items())))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PreparedPortrait:
        """Inverse of ``to_bytes``. Raises ValueError on bytes that are not such an archive."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            raise ValueError(f"not a prepared-portrait archive: {exc}") from exc
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        return cls(arrays=arrays, meta=meta)


class Generator(ABC):
    """A talking-portrait generator (CPU animator, diffusion model, ...).

    Class attributes: ``name`` and ``version`` key the portrait cache; ``fps`` is
    the default frame rate; ``window_frames`` the frames produced per ``generate``
    call; ``lookahead_frames`` how many frames of audio after the window it wants
    in ``context_after`` (latency cost: lookahead / fps seconds);
    ``context_frames`` how many frames of audio before the window it wants.
    """

    name: str
    version: str
    fps: float = 25.0
    window_frames: int = 4
    lookahead_frames: int = 2
    context_frames: int = 4

    @abstractmethod
    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        """Precompute a portrait. ``image``: RGB uint8 (H, W, 3).

        Raises PortraitError (NoFaceError when no face is found).
        """

    @abstractmethod
    def generate(
        self,
        prepared: PreparedPortrait,
        window: AudioWindow,
        motion: MotionSettings,
        state: Any | None,
    ) -> tuple[np.ndarray, Any]:
        """Frames of one window: RGB uint8 (window.num_frames, H, W, 3), and the state
        to pass to the next call (``None`` on the first call of a session).

        Consecutive windows must join without a seam: the state carries whatever the
        generator needs (last pose, filter memory, motion frames). The given state is
        read-only: the engine passes it again when it drops frames after an interrupt,
        and the same (window, state) must give the same frames.
        """

    def close(self) -> None:
        """Release what the generator holds beyond memory (a worker process, GPU
        memory). Called once by the owner of its session when the session ends;
        the default does nothing."""


def check_prepared_by(prepared: PreparedPortrait, generator: Generator) -> None:
    """Raise ValueError unless ``prepared.meta`` names ``generator``'s name and
    version: assets of another generator, or of another version of this one,
    do not fit its per-frame path."""
    made_by = (prepared.meta.get("generator"), prepared.meta.get("version"))
    if made_by != (generator.name, generator.version):
        raise ValueError(
            f"prepared portrait comes from generator {made_by[0]!r} version {made_by[1]!r}, not "
            f"{generator.name!r} version {generator.version!r}; prepare the image again with this generator"
        )


def clip_windows(audio: np.ndarray, generator: Generator, fps: float | None = None,
                 window_frames: int | None = None) -> Iterator[AudioWindow]:
    """The AudioWindows of a whole clip, in order, as the session engine cuts them.

    ``audio``: float32 (n,) mono at AUDIO_SAMPLE_RATE. Each window gets the
    generator's ``context_frames`` of audio before and ``lookahead_frames`` after
    (zeros outside the clip) and speech flags all True. Covers
    ``int(n * fps / AUDIO_SAMPLE_RATE)`` frames in windows of ``window_frames``
    (default: the generator's). For benchmarks and tests that drive a generator
    directly, without the engine's clock.
    """
    fps = fps or generator.fps
    size = window_frames or generator.window_frames
    total = int(len(audio) * fps / AUDIO_SAMPLE_RATE)
    for first in range(0, total, size):
        count = min(size, total - first)
        start = frame_start_sample(first - generator.context_frames, fps)
        stop = frame_start_sample(first + count + generator.lookahead_frames, fps)
        chunk = np.zeros(stop - start, np.float32)
        lo, hi = max(0, start), min(len(audio), stop)
        chunk[lo - start : hi - start] = audio[lo:hi]
        yield AudioWindow(
            audio=chunk,
            first_frame=first,
            num_frames=count,
            fps=fps,
            context_before=frame_start_sample(first, fps) - start,
            context_after=stop - frame_start_sample(first + count, fps),
            speech=np.ones(count, bool),
        )
