"""Streaming Wan VAE: decode latent frames chunk by chunk, encode motion frames.

The Wan VAE decoder is causal in time: each of its causal 3-D convolutions keeps
the last two time steps of its input (diffusers' ``feat_cache``), and
``AutoencoderKLWan._decode`` simply runs the decoder one latent frame at a time
with that cache. ``StreamingVaeDecoder`` runs the same per-frame loop but hands
the cache back to the caller between calls (as an immutable ``DecoderCache``),
so the frames of a long stream are decoded once each, window after window, and
a chunked decode equals a one-shot ``vae.decode`` of the concatenated latents.

Latents outside this module are in the model's normalised space (spec section
1): ``z_model = (z_vae - latents_mean) / latents_std`` with the VAE config's
per-channel ``latents_mean`` / ``latents_std``, as diffusers' Wan pipelines do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderCache:
    """The Wan decoder's causal state after ``latent_frames`` latent frames of one stream.

    ``features``: one entry per causal convolution of the decoder, in the order the
    decoder visits them: None (not reached yet), the marker string ``"Rep"`` (the
    first frame of a temporal upsampler) or a tensor [B, C, <=2, h', w'] of that
    convolution's last input time steps. Never modified after creation: decoding
    from a cache returns a new one, so one cache may be decoded from again (the
    session engine re-runs a window from the same state after an interrupt).
    """

    features: tuple[Any, ...]
    latent_frames: int

    @property
    def pixel_frames(self) -> int:
        """Pixel frames decoded so far: 1 for the first latent frame, 4 for each later one."""
        return 0 if self.latent_frames == 0 else 1 + 4 * (self.latent_frames - 1)


class StreamingVaeDecoder:
    """Encode and decode with a diffusers ``AutoencoderKLWan``, decoding as a stream.

    ``vae``: the Wan 2.1 VAE (z_dim 16, 4x temporal, 8x spatial). Spatial tiling is
    not used (each latent frame is decoded whole). All tensors are float on the
    VAE's device; latents are in the model's normalised space (see module doc).
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        self._conv_count = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        z_dim = vae.config.z_dim
        self._mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self._std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z_dim, 1, 1, 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan 2.1)."""
        return int(self.vae.config.scale_factor_temporal or 4)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side (8 for Wan 2.1)."""
        return int(self.vae.config.scale_factor_spatial or 8)

    def start(self) -> DecoderCache:
        """The empty cache of a new stream: its first latent frame decodes to one pixel frame."""
        return DecoderCache(features=(None,) * self._conv_count, latent_frames=0)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, z_dim, T, h, w] -> model space: ``(z - mean) / std`` per channel."""
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents [B, z_dim, T, h, w] -> VAE latents: ``z * std + mean``."""
        mean, std = self._stats(latents)
        return latents * std + mean

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if latents.ndim != 5 or latents.shape[1] != self._mean.shape[1]:
            raise ValueError(
                f"latents must be [B, {self._mean.shape[1]}, T, h, w], got {tuple(latents.shape)}"
            )
        return (
            self._mean.to(latents.device, latents.dtype),
            self._std.to(latents.device, latents.dtype),
        )

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode a pixel clip as a new stream: [B, 3, F, H, W] in [-1, 1], F = 4k+1,
        H and W multiples of 8 -> model-space latents [B, 16, k+1, H/8, W/8].

        The first frame is encoded alone (as an image), then 4 frames per latent
        frame, as ``AutoencoderKLWan.encode``; the posterior's mode is taken (the
        reference I2V conditioning does the same). Raises ValueError for a frame
        count that is not 4k+1.
        """
        frames = video.shape[2]
        if video.ndim != 5 or (frames - 1) % self.temporal_factor:
            raise ValueError(f"video must be [B, 3, 4k+1, H, W], got {tuple(video.shape)}")
        video = video.to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(video).latent_dist
        return self.normalize(posterior.mode().float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """Decode model-space latents [B, 16, t, h, w] continuing the stream ``cache``.

        Returns (pixel frames [B, 3, n, 8h, 8w] float32 in [-1, 1], the cache after
        them); n = 1 + 4(t-1) when the stream starts here, else 4t. ``cache`` is not
        modified. Decoding a stream in any chunking gives the frames of one
        ``vae.decode`` of all its latents (same per-frame loop, same cache).
        """
        if latents.shape[2] == 0:
            empty = latents.new_zeros(latents.shape[0], 3, 0, *(s * self.spatial_factor for s in latents.shape[3:]))
            return empty, cache
        z = self.denormalize(latents.float()).to(device=self.vae.device, dtype=self.vae.dtype)
        # post_quant_conv is a 1x1x1 causal convolution: frame by frame, no time context needed.
        x = self.vae.post_quant_conv(z)
        features = list(cache.features)  # the decoder assigns into this list; the given cache stays intact
        outputs = []
        for i in range(x.shape[2]):
            first = cache.latent_frames + i == 0
            outputs.append(
                self.vae.decoder(x[:, :, i : i + 1], feat_cache=features, feat_idx=[0], first_chunk=first)
            )
        out = torch.cat(outputs, dim=2)
        if self.vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        frames = out.float().clamp(-1.0, 1.0)
        return frames, DecoderCache(features=tuple(features), latent_frames=cache.latent_frames + x.shape[2])


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Pixel frames [B, 3, n, H, W] in [-1, 1] -> uint8 [B, n, H, W, 3] (RGB), as the
    reference pipeline converts them: ``(x + 1) * 127.5`` clipped to [0, 255], truncated."""
    return ((frames.float() + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 4, 1)

