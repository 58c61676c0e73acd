"""Tiny random stand-ins for the networks around the DiT, built from configs in code.

For tests, the ``fantasytalking-tiny`` smoke-test generator and the CPU run of the
benchmark: same layouts as the real models (Wan VAE 4x/8x compression and
latents_mean/std, CLIP ViT/14 at 224 px giving 257 tokens, wav2vec2's conv stack
giving one feature per 320 samples), tiny widths, fixed seeds, nothing downloaded.
The tiny DiT itself is ``transformer.tiny_transformer``.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """A random Wan VAE (base_dim 8, one residual block per level, z_dim 16, the real
    temporal/spatial layout and latents_mean/std), CPU float32, eval mode."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return vae.eval().requires_grad_(False)


def tiny_clip_vision(hidden_size: int, seed: int = 0) -> torch.nn.Module:
    """A random transformers ``CLIPVisionModel``: 224 px input, patch 14 (so 257
    tokens, as ViT-H/14), 3 layers of width ``hidden_size`` (the DiT's image_dim)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    heads = 2 if hidden_size % 2 == 0 else 1
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
        num_attention_heads=heads, image_size=224, patch_size=14,
    )
    return CLIPVisionModel(config).eval().requires_grad_(False)


def tiny_wav2vec2(hidden_size: int, seed: int = 0) -> torch.nn.Module:
    """A random transformers ``Wav2Vec2Model`` with the base model's conv strides and
    kernels (L = floor((n - 400) / 320) + 1 features), 2 layers of width
    ``hidden_size`` (the audio projection's input size), layerdrop 0, no masking."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden_size,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        layerdrop=0.0, mask_time_prob=0.0,
    )
    return Wav2Vec2Model(config).eval().requires_grad_(False)


def tiny_prompt_embeddings(texts: list[str], text_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-ins for UMT5 embeddings: text -> random float32 [n, text_dim], n = 1 + the
    text's word count (at most 512), seeded by ``seed`` and the text's position."""
    generator = torch.Generator().manual_seed(seed)
    return {text: torch.randn(min(1 + len(text.split()), 512), text_dim, generator=generator) for text in texts}
