"""Audio features for FantasyTalking (spec section 3).

Steps 1-3 (``crop_audio``, ``normalize_audio``, ``Wav2Vec2Features``): 16 kHz mono
speech -> wav2vec2-base-960h last hidden state [1, L, 768] at 50 Hz.
Step 5 (``split_audio_windows``): projected tokens [1, L, C] -> one window of
tokens per latent frame, zero-padded at the end, with the count of valid tokens.
Step 4 (the projection) is ``audio_adapter.AudioProjModel``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.base import AUDIO_SAMPLE_RATE
from model.errors import WeightsError

logger = logging.getLogger(__name__)

#: Tokens each window is widened by on both sides (spec section 3 step 5).
WINDOW_EXPAND = 4
#: wav2vec2's receptive field: fewer samples than this give no feature at all.
MIN_SAMPLES = 400


def crop_audio(audio: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """Spec section 3 step 1: the first ``int(num_frames / fps * 16000)`` samples.

    ``audio``: float32 (n,) mono at 16 kHz. Raises ValueError when it is shorter
    than that (pad with silence first) or not 1-D float32.
    """
    _check_audio(audio)
    needed = int(num_frames / fps * AUDIO_SAMPLE_RATE)
    if len(audio) < needed:
        raise ValueError(
            f"{num_frames} frames at {fps} fps need {needed} samples of 16 kHz audio, got {len(audio)}"
        )
    return audio[:needed]


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Spec section 3 step 2: zero mean, unit variance over the whole segment.

    Same arithmetic as ``Wav2Vec2FeatureExtractor(do_normalize=True)``:
    ``(x - mean) / sqrt(var + 1e-7)`` in float32. Returns float32 (n,).
    """
    _check_audio(audio)
    return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)


def _check_audio(audio: np.ndarray) -> None:
    if not isinstance(audio, np.ndarray) or audio.dtype != np.float32 or audio.ndim != 1:
        raise ValueError(
            "audio must be a 1-D float32 numpy array of 16 kHz mono samples, got "
            f"{type(audio).__name__} {getattr(audio, 'dtype', '')} {getattr(audio, 'shape', '')}"
        )


class Wav2Vec2Features:
    """wav2vec2 features of a speech segment (spec section 3 steps 2-3).

    ``model``: a transformers ``Wav2Vec2Model`` (wav2vec2-base-960h for the released
    weights: 768-d, one feature per 320 samples, L = floor((n - 400) / 320) + 1).
    It is put in eval mode, so no layer drop and no time masking apply; run in fp32.
    """

    def __init__(self, model) -> None:
        self.model = model.eval()

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu") -> Wav2Vec2Features:
        """Load ``Wav2Vec2Model`` from a local wav2vec2-base-960h directory (config.json +
        model weights), never from a hub, in float32, with layerdrop 0 and no time masking.

        Raises WeightsError naming the directory when it is missing or incomplete.
        """
        from transformers import Wav2Vec2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise WeightsError(
                f"wav2vec2 directory {path} has no config.json: expected the local "
                "facebook/wav2vec2-base-960h directory (config.json, model.safetensors or pytorch_model.bin)"
            )
        try:
            model = Wav2Vec2Model.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, layerdrop=0.0, mask_time_prob=0.0
            )
        except OSError as exc:
            raise WeightsError(f"cannot load wav2vec2 from {path}: {exc}") from exc
        logger.info("wav2vec2 loaded from %s", path)
        return cls(model.to(device))

    @property
    def hidden_size(self) -> int:
        """Feature size (768 for wav2vec2-base-960h)."""
        return self.model.config.hidden_size

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> Tensor:
        """``audio``: float32 (n,) 16 kHz mono, n >= 400 (already cropped, spec step 1).

        Normalises it (step 2) and returns the last hidden state [1, L, hidden] float32
        on the model's device (step 3). Raises ValueError for shorter or non-float32 audio.
        """
        _check_audio(audio)
        if len(audio) < MIN_SAMPLES:
            raise ValueError(f"wav2vec2 needs at least {MIN_SAMPLES} samples (25 ms at 16 kHz), got {len(audio)}")
        device = next(self.model.parameters()).device
        values = torch.from_numpy(normalize_audio(audio))[None].to(device)
        return self.model(values).last_hidden_state.float()


def window_ranges(num_tokens: int, num_frames: int) -> list[tuple[int, int]]:
    """Inclusive token ranges of the latent frames, before widening (spec section 3 step 5).

    ``num_tokens`` L and ``num_frames`` F (4k+1, >= 5): ``tpf = L / F``,
    ``half = int(2 * tpf)``; centre ``c_0 = 0``, ``c_i = int(tpf * (4i - 1)) - 1``;
    range ``[c_i - half, c_i + half]`` for i >= 1 and ``[start_1 - 2 half, start_1]``
    for i = 0. Returns (F - 1) / 4 + 1 ranges; they may reach outside [0, L).
    Raises ValueError for F not 4k+1 >= 5 or L < 1.
    """
    if num_frames < 5 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 and >= 5, got {num_frames}")
    if num_tokens < 1:
        raise ValueError(f"need at least one audio token, got {num_tokens}")
    tpf = num_tokens / num_frames
    half = int(2 * tpf)
    latent_frames = (num_frames - 1) // 4 + 1
    ranges = [(int(tpf * (4 * i - 1)) - 1 - half, int(tpf * (4 * i - 1)) - 1 + half) for i in range(1, latent_frames)]
    start_1 = ranges[0][0]
    return [(start_1 - 2 * half, start_1), *ranges]


def split_audio_windows(audio_proj: Tensor, num_frames: int) -> tuple[Tensor, Tensor]:
    """Cut projected audio tokens into one window per latent frame (spec section 3 step 5).

    ``audio_proj`` [1, L, C]; ``num_frames`` F pixel frames (4k+1, >= 5). Each range of
    ``window_ranges`` is widened by 4 tokens on both sides, cut to the valid region
    [0, L), and zero-padded at the END (also when it started below 0).
    Returns (windows [1, T_lat, W, C] in ``audio_proj``'s dtype and device, with
    W = 2 * half + 9, and k_lens [T_lat] int64: valid tokens of each window).
    Example (spec): fps 23, F = 81 -> L = 175, W = 17, k_lens 6, 14, 17, ..., 17, 14.
    Raises ValueError for a bad shape or F.
    """
    if audio_proj.ndim != 3 or audio_proj.shape[0] != 1:
        raise ValueError(f"audio_proj must have shape [1, L, C], got {tuple(audio_proj.shape)}")
    num_tokens = audio_proj.shape[1]
    ranges = window_ranges(num_tokens, num_frames)
    width = ranges[0][1] - ranges[0][0] + 1 + 2 * WINDOW_EXPAND
    windows = audio_proj.new_zeros(1, len(ranges), width, audio_proj.shape[2])
    k_lens = torch.zeros(len(ranges), dtype=torch.int64)
    for index, (first, last) in enumerate(ranges):
        lo = max(first - WINDOW_EXPAND, 0)
        hi = min(last + WINDOW_EXPAND + 1, num_tokens)
        if hi > lo:
            windows[0, index, : hi - lo] = audio_proj[0, lo:hi]
            k_lens[index] = hi - lo
    return windows, k_lens
