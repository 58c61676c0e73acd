"""The session's audio timeline: queued utterances and the audio of committed frames.

Frame n of the media clock owns the 16 kHz samples [start(n), start(n+1)) with
start = ``frame_start_sample``. Pushed speech waits in per-utterance FIFOs until a
generation window takes it: the window's frames are *planned* (which samples each
frame gets) without consuming anything, and *committed* only once the generator's
frames for them are accepted, so a window whose result is thrown away (interrupt,
new speech) loses no audio. Utterances play back to back; a frame with no
utterance audio is an idle frame (silence).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from model.base import frame_start_sample

logger = logging.getLogger(__name__)


class SampleQueue:
    """FIFO of float32 16 kHz samples that can be read ahead without consuming."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._offset = 0  # samples of _chunks[0] already consumed
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, samples: np.ndarray) -> None:
        """Queue float32 (n,) samples at the end."""
        if samples.shape[0]:
            self._chunks.append(samples)
            self._size += samples.shape[0]

    def peek(self, start: int, count: int) -> np.ndarray:
        """Copy of queued samples [start, start + count), float32 (m,) with m < count
        when fewer are queued; nothing is consumed."""
        parts = []
        skip = start + self._offset
        for chunk in self._chunks:
            if count <= 0:
                break
            if skip >= chunk.shape[0]:
                skip -= chunk.shape[0]
                continue
            part = chunk[skip:skip + count]
            parts.append(part)
            count -= part.shape[0]
            skip = 0
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def drop(self, count: int) -> None:
        """Consume the first ``count`` samples (at most ``len(self)``)."""
        count = min(count, self._size)
        self._size -= count
        count += self._offset
        while self._chunks and count >= self._chunks[0].shape[0]:
            count -= self._chunks.popleft().shape[0]
        self._offset = count


@dataclass(eq=False)
class Utterance:
    """One utterance: the speech pushed from its first chunk to ``end_of_speech``.

    ``opened_at``: session clock time (s) of the first push. ``pending``: its
    samples not yet given to committed frames. ``ended``: no more audio will come.
    ``ready``: enough audio has come to start playing without running dry at once
    (or it ended); until then frames stay idle. ``first_frame`` /
    ``last_committed``: first and last committed frame indices (None before the
    first commit). ``last_frame``: its final frame, set once the utterance has
    ended and all its audio is committed.
    """

    uid: int
    opened_at: float
    pending: SampleQueue = field(default_factory=SampleQueue)
    ended: bool = False
    ready: bool = False
    first_frame: int | None = None
    last_committed: int | None = None
    last_frame: int | None = None


@dataclass(frozen=True)
class FramePlan:
    """One planned frame: global ``index``, its audio slice (float32, exactly
    start(index+1) - start(index) samples, zero-padded where no speech is
    available), and the utterance it belongs to (None: idle frame)."""

    index: int
    audio: np.ndarray
    utterance: Utterance | None


@dataclass(frozen=True)
class WindowPlan:
    """The frames of one generation window and the audio the generator sees.

    ``audio``: float32, ``context_before`` samples before the first frame, the
    frames' samples, then ``context_after`` lookahead samples (as in AudioWindow).
    ``consumed``: samples each utterance gives to the frames, taken at commit.
    """

    frames: list[FramePlan]
    audio: np.ndarray
    context_before: int
    context_after: int
    consumed: list[tuple[Utterance, int]]

    @property
    def first_frame(self) -> int:
        return self.frames[0].index


class Timeline:
    """Queued utterances plus the audio of recently committed frames (for context).

    ``fps``: frames per second of the media clock. ``history_frames``: how many
    committed frames' audio to keep; it must cover the context of any window that
    can follow a truncation (context + the most frames queued ahead).
    ``start_samples``: 16 kHz samples an open utterance needs before it is ready
    to start (typically one window plus its lookahead).
    """

    def __init__(self, fps: float, history_frames: int, start_samples: int) -> None:
        self.fps = fps
        self._history_frames = history_frames
        self._start_samples = start_samples
        self._utterances: deque[Utterance] = deque()
        self._history: dict[int, np.ndarray] = {}
        self._next_uid = 0

    # -- utterances ---------------------------------------------------------

    @property
    def open_utterance(self) -> Utterance | None:
        """The utterance still receiving audio, if any."""
        if self._utterances and not self._utterances[-1].ended:
            return self._utterances[-1]
        return None

    @property
    def has_utterances(self) -> bool:
        """Whether any utterance has audio or frames still to commit."""
        return bool(self._utterances)

    def pending_samples(self) -> int:
        """Samples pushed but not yet committed to frames, all utterances."""
        return sum(len(u.pending) for u in self._utterances)

    def open(self, now: float) -> Utterance:
        """Start a new utterance after any queued ones; ``now``: clock time, s."""
        utterance = Utterance(uid=self._next_uid, opened_at=now)
        self._next_uid += 1
        self._utterances.append(utterance)
        return utterance

    def append(self, samples: np.ndarray) -> None:
        """Add float32 (n,) 16 kHz samples to the open utterance (ValueError if
        none); it becomes ready once ``start_samples`` are queued."""
        utterance = self.open_utterance
        if utterance is None:
            raise ValueError("no open utterance to append audio to")
        utterance.pending.append(samples)
        if len(utterance.pending) >= self._start_samples:
            utterance.ready = True

    def end(self) -> Utterance | None:
        """Mark the open utterance ended. Returns it when that completes it (all
        its audio already committed; ``last_frame`` is then set, or it is dropped
        when it never had a frame), else None."""
        utterance = self.open_utterance
        if utterance is None:
            return None
        utterance.ended = True
        utterance.ready = True
        if len(utterance.pending) == 0:
            self._utterances.remove(utterance)
            utterance.last_frame = utterance.last_committed
            return utterance
        return None

    def clear(self) -> None:
        """Forget every queued utterance (an interrupt)."""
        self._utterances.clear()

    # -- planning -----------------------------------------------------------

    def plan(self, first: int, num: int, context: int, lookahead: int, may_underrun: bool) -> WindowPlan | None:
        """Plan frames ``first .. first + num - 1`` with ``context`` frames of
        audio before and ``lookahead`` frames after.

        Utterances play in order, each frame taking its slice from the current
        one; frames are idle while the next utterance is not ready. When a started
        utterance has too little audio for a frame or the lookahead, returns None
        (wait for more) unless ``may_underrun``; then the missing samples are
        zeros and the utterance's later audio comes after them.
        """
        frames: list[FramePlan] = []
        consumed: list[tuple[Utterance, int]] = []
        after: list[np.ndarray] = []
        queue = list(self._utterances)
        current, offset = 0, 0
        for n in range(first, first + num + lookahead):
            length = frame_start_sample(n + 1, self.fps) - frame_start_sample(n, self.fps)
            # An ended utterance with nothing left stops before this frame.
            while current < len(queue) and queue[current].ended and len(queue[current].pending) <= offset:
                current, offset = current + 1, 0
            utterance = queue[current] if current < len(queue) and queue[current].ready else None
            if utterance is None:
                audio = np.zeros(0, np.float32)
            else:
                audio = utterance.pending.peek(offset, length)
                if audio.shape[0] < length and not utterance.ended and not may_underrun:
                    return None
                offset += audio.shape[0]
            audio = np.pad(audio, (0, length - audio.shape[0]))
            if n < first + num:
                frames.append(FramePlan(n, audio, utterance))
                if utterance is not None:
                    if consumed and consumed[-1][0] is utterance:
                        consumed.pop()
                    consumed.append((utterance, offset))
            else:
                after.append(audio)
        before = [self._history.get(n, self._silence(n)) for n in range(first - context, first)]
        parts = before + [f.audio for f in frames] + after
        return WindowPlan(
            frames=frames,
            audio=np.concatenate(parts).astype(np.float32, copy=False),
            context_before=sum(p.shape[0] for p in before),
            context_after=sum(p.shape[0] for p in after),
            consumed=consumed,
        )

    def commit(self, plan: WindowPlan) -> None:
        """Give the planned frames their audio: consume it from the utterances,
        remember it as history, and complete utterances now ended and empty."""
        for utterance, count in plan.consumed:
            utterance.pending.drop(count)
        for frame in plan.frames:
            self._history[frame.index] = frame.audio
            utterance = frame.utterance
            if utterance is not None:
                if utterance.first_frame is None:
                    utterance.first_frame = frame.index
                utterance.last_committed = frame.index
        for utterance in list(self._utterances):
            if utterance.ended and len(utterance.pending) == 0:
                utterance.last_frame = utterance.last_committed
                self._utterances.remove(utterance)
        oldest = plan.frames[-1].index - self._history_frames
        for index in [i for i in self._history if i <= oldest]:
            del self._history[index]

    def truncate(self, frame: int) -> None:
        """Forget committed frames ``frame`` and later (they will be planned again)."""
        for index in [i for i in self._history if i >= frame]:
            del self._history[index]

    def _silence(self, n: int) -> np.ndarray:
        return np.zeros(frame_start_sample(n + 1, self.fps) - frame_start_sample(n, self.fps), np.float32)
