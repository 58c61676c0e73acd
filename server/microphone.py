"""Inbound audio of a live session: a remote microphone track as utterances.

Decoded frames -> 16 kHz mono (PyAV's resampler) -> WebRTC VAD on 10 ms frames
-> ``avatar.push_audio`` while voiced (with a pre-roll of the audio just before
the voice started), ``avatar.end_of_speech`` after ~500 ms of silence
(``MicrophoneInput``).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import av
import numpy as np
import webrtcvad
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar.frames import AUDIO_SAMPLE_RATE, AudioChunk
from avatar.session import AvatarSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VadSettings:
    """Microphone turn detection. ``mode``: WebRTC VAD aggressiveness 0..3;
    ``start_ms`` voiced audio within the last ``start_window_ms`` that opens an
    utterance; ``preroll_ms`` audio before that pushed with it; ``hangover_ms``
    silence that ends it. All durations in milliseconds, multiples of 10."""

    mode: int = 2
    start_ms: int = 60
    start_window_ms: int = 100
    preroll_ms: int = 200
    hangover_ms: int = 500


class MicrophoneInput:
    """Turns a remote microphone track into utterances of an AvatarSession.

    Each received frame (any rate/layout, as aiortc decodes it) is resampled to
    16 kHz mono s16 and cut into 10 ms VAD frames. While waiting, the last
    ``preroll_ms`` are kept; when ``start_ms`` of the last ``start_window_ms`` are
    voiced, the pre-roll and everything after is pushed with
    ``avatar.push_audio`` until ``hangover_ms`` of unvoiced audio in a row, then
    ``avatar.end_of_speech()``. ``run()`` returns when the track ends.
    """

    _VAD_SAMPLES = AUDIO_SAMPLE_RATE // 100  # 10 ms

    def __init__(self, track: MediaStreamTrack, avatar: AvatarSession, settings: VadSettings = VadSettings()) -> None:
        self._track = track
        self._avatar = avatar
        self._settings = settings
        self._vad = webrtcvad.Vad(settings.mode)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_SAMPLE_RATE)
        self._pending = np.zeros(0, np.int16)
        self._preroll: deque[np.ndarray] = deque(maxlen=settings.preroll_ms // 10)
        self._recent: deque[bool] = deque(maxlen=settings.start_window_ms // 10)
        self._speaking = False
        self._silent_frames = 0
        self.utterances = 0

    async def run(self) -> None:
        """Read the track until it ends (or the avatar session closes); an
        utterance still open then is ended."""
        try:
            while True:
                try:
                    frame = await self._track.recv()
                except MediaStreamError:
                    break
                for converted in self._resampler.resample(frame):
                    await self._feed(converted.to_ndarray().reshape(-1))
            if self._speaking:
                self._end_utterance()
        except RuntimeError as exc:  # the avatar session closed under us
            logger.debug("microphone input stops: %s", exc)

    async def _feed(self, samples: np.ndarray) -> None:
        stream = np.concatenate([self._pending, samples])
        step = self._VAD_SAMPLES
        count = len(stream) // step
        self._pending = stream[count * step:]
        to_push: list[np.ndarray] = []
        for k in range(count):
            chunk = stream[k * step:(k + 1) * step]
            voiced = self._vad.is_speech(chunk.tobytes(), AUDIO_SAMPLE_RATE)
            if self._speaking:
                to_push.append(chunk)
                self._silent_frames = 0 if voiced else self._silent_frames + 1
                if self._silent_frames * 10 >= self._settings.hangover_ms:
                    await self._push(to_push)
                    to_push = []
                    self._end_utterance()
                continue
            self._preroll.append(chunk)
            self._recent.append(voiced)
            if sum(self._recent) * 10 >= self._settings.start_ms:
                self._speaking = True
                self._silent_frames = 0
                self.utterances += 1
                to_push.extend(self._preroll)
                self._preroll.clear()
                logger.debug("microphone: speech starts")
        await self._push(to_push)

    async def _push(self, chunks: list[np.ndarray]) -> None:
        if chunks:
            await self._avatar.push_audio(AudioChunk(np.concatenate(chunks), AUDIO_SAMPLE_RATE))

    def _end_utterance(self) -> None:
        self._speaking = False
        self._recent.clear()
        self._avatar.end_of_speech()
        logger.debug("microphone: speech ends")
