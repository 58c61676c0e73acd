"""Flow-matching sampling (spec section 5) with motion frames held clean (spec section 8).

Latents follow x_sigma = (1 - sigma) * x_0 + sigma * noise; the model predicts the velocity
v = noise - x_0 = dx/dsigma, so one Euler step from sigma_i to sigma_{i+1} is
x <- x + (sigma_{i+1} - sigma_i) * v.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

#: The DiT's timestep is 1000 * sigma.
TIMESTEP_SCALE = 1000.0


def flow_sigmas(steps: int, shift: float) -> Tensor:
    """Sigmas of ``steps`` Euler steps: [steps + 1] float64, from 1 down to exactly 0.

    ``s = linspace(1, 0, steps + 1)`` shifted ``s' = shift * s / (1 + (shift - 1) * s)``
    (spec section 5; shift 5 for Wan2.1-I2V-720P). Step i goes from s'_i to s'_{i+1}.
    Raises ValueError for steps < 1 or shift <= 0.
    """
    if steps < 1 or shift <= 0:
        raise ValueError(f"need steps >= 1 and shift > 0, got steps {steps}, shift {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def cfg_combine(pos: Tensor, noaudio: Tensor, uncond: Tensor, prompt_cfg: float, audio_cfg: float) -> Tensor:
    """Prompt + audio classifier-free guidance (spec section 5):

    ``uncond + prompt_cfg * (noaudio - uncond) + audio_cfg * (pos - noaudio)``

    ``pos``: prompt and audio; ``noaudio``: prompt, audio_scale 0; ``uncond``: negative
    prompt, audio_scale 0; all the same shape. Audio-only guidance (2 passes) is
    ``cfg_combine(pos, noaudio, noaudio, 1.0, audio_cfg)``.
    """
    return uncond + prompt_cfg * (noaudio - uncond) + audio_cfg * (pos - noaudio)


def sample(
    denoise: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor,
    *,
    clean_latents: Tensor | None = None,
) -> Tensor:
    """Euler flow-matching loop from ``noise`` at sigmas[0] to sigmas[-1] (0).

    ``denoise(latents [B, C, T, h, w], timestep [1] float32 = 1000 * sigma)`` returns the
    (CFG-combined) velocity, same shape as the latents. ``noise`` [B, C, T, h, w]
    (seed it for deterministic output: the loop itself has no randomness);
    ``sigmas`` from ``flow_sigmas``. ``clean_latents`` [B, C, m, h, w]: the motion
    frames' clean latents, written into ``latents[:, :, :m]`` before every model call
    and into the result, so the model always sees them as known (spec section 8).
    Latents are updated in float32. Returns the final latents, float32.
    Raises ValueError when ``clean_latents`` does not fit ``noise``.
    """
    latents = noise.float().clone()
    held = 0
    if clean_latents is not None:
        held = clean_latents.shape[2]
        if clean_latents.ndim != 5 or tuple(clean_latents.shape[:2]) != tuple(noise.shape[:2]) \
                or tuple(clean_latents.shape[3:]) != tuple(noise.shape[3:]) or held > noise.shape[2]:
            raise ValueError(
                f"clean_latents {tuple(clean_latents.shape)} must be the first latent frames of {tuple(noise.shape)}"
            )
        clean_latents = clean_latents.to(latents)
    for i in range(len(sigmas) - 1):
        if held:
            latents[:, :, :held] = clean_latents
        timestep = torch.tensor([float(sigmas[i]) * TIMESTEP_SCALE], dtype=torch.float32, device=latents.device)
        velocity = denoise(latents, timestep).float()
        latents = latents + float(sigmas[i + 1] - sigmas[i]) * velocity
    if held:
        latents[:, :, :held] = clean_latents
    return latents
