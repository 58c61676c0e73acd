"""StreamingVaeDecoder: chunked decoding with the causal cache equals one-shot decoding.

A tiny random AutoencoderKLWan (seeded, built in code) decodes the same latents
once with diffusers' own ``vae.decode`` and in chunks through the stream; the
decoder is counted to prove each latent frame goes through it exactly once.
"""
from __future__ import annotations

import pytest
import torch

from model.fantasytalking.tiny import tiny_vae
from model.fantasytalking.vae_stream import StreamingVaeDecoder, frames_to_uint8


@pytest.fixture(scope="module")
def stream() -> StreamingVaeDecoder:
    return StreamingVaeDecoder(tiny_vae(seed=3))


def latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def one_shot(stream: StreamingVaeDecoder, z: torch.Tensor) -> torch.Tensor:
    return stream.vae.decode(stream.denormalize(z)).sample


def decode_in_chunks(stream, z, bounds):
    cache, pieces = stream.start(), []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        frames, cache = stream.decode(z[:, :, lo:hi], cache)
        pieces.append(frames)
    return torch.cat(pieces, dim=2), cache


@pytest.mark.parametrize("bounds", [[0, 7], [0, 1, 7], [0, 2, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_chunked_decode_equals_one_shot_decode(stream, bounds):
    z = latents(7)
    expected = one_shot(stream, z)
    got, cache = decode_in_chunks(stream, z, bounds)
    assert got.shape == expected.shape == (1, 3, 1 + 4 * 6, 32, 48)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert cache.latent_frames == 7 and cache.pixel_frames == 25


def test_each_latent_frame_goes_through_the_decoder_once(stream, monkeypatch):
    calls = []
    original = stream.vae.decoder.forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape[2])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(stream.vae.decoder, "forward", counting)
    z = latents(6, seed=1)
    frames, _ = decode_in_chunks(stream, z, [0, 2, 4, 6])
    assert calls == [1] * 6  # one call per latent frame, one latent frame per call
    assert frames.shape[2] == 1 + 4 * 5


def test_first_chunk_gives_one_frame_and_later_chunks_four_per_latent_frame(stream):
    z = latents(3, seed=2)
    first, cache = stream.decode(z[:, :, :1], stream.start())
    rest, _ = stream.decode(z[:, :, 1:], cache)
    assert first.shape[2] == 1 and rest.shape[2] == 8


def test_a_cache_can_be_decoded_from_twice(stream):
    z = latents(5, seed=4)
    _, cache = stream.decode(z[:, :, :2], stream.start())
    before = [f.clone() if isinstance(f, torch.Tensor) else f for f in cache.features]
    once, _ = stream.decode(z[:, :, 2:], cache)
    again, _ = stream.decode(z[:, :, 2:], cache)
    torch.testing.assert_close(once, again, rtol=0, atol=0)
    for kept, now in zip(before, cache.features):
        if isinstance(kept, torch.Tensor):
            assert torch.equal(kept, now)
        else:
            assert kept == now


def test_the_stream_continues_seamlessly_across_windows(stream):
    # Decoding window 2's latents from window 1's cache is what one long decode gives,
    # unlike starting a fresh stream (which would restart at a one-frame "image").
    z = latents(6, seed=5)
    expected = one_shot(stream, z)
    _, cache = stream.decode(z[:, :, :3], stream.start())
    continued, _ = stream.decode(z[:, :, 3:], cache)
    fresh, _ = stream.decode(z[:, :, 3:], stream.start())
    torch.testing.assert_close(continued, expected[:, :, 9:], rtol=0, atol=1e-6)
    assert fresh.shape[2] == 9 and continued.shape[2] == 12


def test_latent_normalisation_uses_the_vae_config(stream):
    z = latents(2, seed=6)
    mean = torch.tensor(stream.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(stream.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(stream.normalize(z), (z - mean) / std)
    torch.testing.assert_close(stream.denormalize(stream.normalize(z)), z)


def test_encode_gives_model_space_latents_of_the_posterior_mode(stream):
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1
    encoded = stream.encode(video)
    with torch.no_grad():
        mode = stream.vae.encode(video).latent_dist.mode()
    assert encoded.shape == (1, 16, 2, 4, 6)
    torch.testing.assert_close(stream.denormalize(encoded), mode, rtol=1e-5, atol=1e-5)


def test_encode_refuses_frame_counts_that_are_not_4k_plus_1(stream):
    with pytest.raises(ValueError, match="4k\\+1"):
        stream.encode(torch.zeros(1, 3, 4, 32, 32))


def test_frames_to_uint8_maps_the_range_like_the_reference():
    frames = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    out = frames_to_uint8(frames)
    assert out.shape == (1, 5, 1, 1, 3) and out.dtype == torch.uint8
    assert out[0, :, 0, 0, 0].tolist() == [0, 0, 127, 254, 255]
