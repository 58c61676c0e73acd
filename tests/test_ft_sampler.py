"""Flow-matching sampler (spec sections 5 and 8)."""
from __future__ import annotations

import pytest
import torch

from model.fantasytalking.sampler import cfg_combine, flow_sigmas, sample
from model.fantasytalking.transformer import tiny_transformer


def test_sigmas_follow_the_spec():
    sigmas = flow_sigmas(30, 5.0)
    assert sigmas.shape == (31,) and sigmas.dtype == torch.float64
    for i, value in enumerate(sigmas.tolist()):
        s = 1 - i / 30
        assert value == pytest.approx(5 * s / (1 + 4 * s), abs=1e-15)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert flow_sigmas(4, 1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError):
        flow_sigmas(0, 5.0)


def test_cfg_combine_is_the_formula():
    g = torch.Generator().manual_seed(0)
    pos, noaudio, uncond = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    out = cfg_combine(pos, noaudio, uncond, 5.0, 4.5)
    assert torch.allclose(out, uncond + 5.0 * (noaudio - uncond) + 4.5 * (pos - noaudio))
    # Scales of 1 give the conditional prediction back; audio scale 0 ignores the audio pass.
    assert torch.allclose(cfg_combine(pos, noaudio, uncond, 1.0, 1.0), pos)
    assert torch.allclose(cfg_combine(pos, noaudio, uncond, 1.0, 0.0), noaudio)


def test_euler_steps_follow_the_velocity():
    """A constant velocity field moves the latent by (sigma_end - sigma_start) * v; the
    timesteps handed to the model are 1000 * sigma."""
    v = torch.full((1, 2, 3, 2, 2), 0.25)
    seen = []

    def denoise(latents, timestep):
        seen.append(timestep)
        return v

    sigmas = flow_sigmas(5, 3.0)
    noise = torch.randn(1, 2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    out = sample(denoise, noise, sigmas)
    assert torch.allclose(out, noise - 0.25)
    assert [float(t) for t in seen] == pytest.approx([1000 * float(s) for s in sigmas[:-1]], rel=1e-6)
    assert all(t.shape == (1,) and t.dtype == torch.float32 for t in seen)


def test_a_perfect_velocity_reaches_the_data():
    """With v = noise - x0 exactly, the loop lands on x0 (flow-matching convention)."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    out = sample(lambda latents, t: noise - x0, noise, flow_sigmas(7, 5.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_motion_frames_are_held_clean():
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 5, 3, 3, generator=g)
    clean = torch.randn(1, 4, 2, 3, 3, generator=g)

    def denoise(latents, timestep):
        assert torch.equal(latents[:, :, :2], clean)  # the model always sees them clean
        return torch.ones_like(latents)

    out = sample(denoise, noise, flow_sigmas(4, 5.0), clean_latents=clean)
    assert torch.equal(out[:, :, :2], clean)
    assert torch.allclose(out[:, :, 2:], noise[:, :, 2:] - 1.0)
    with pytest.raises(ValueError, match="first latent frames"):
        sample(denoise, noise, flow_sigmas(4, 5.0), clean_latents=torch.zeros(1, 4, 6, 3, 3))


@torch.no_grad()
def test_sampling_the_tiny_model_is_deterministic_with_a_seed():
    model = tiny_transformer(seed=0)
    g = torch.Generator().manual_seed(4)
    cond = dict(
        text_embeds=torch.randn(1, 512, 16, generator=g),
        image_embeds=torch.randn(1, 257, 12, generator=g),
        audio_tokens=torch.randn(1, 3, 5, 16, generator=g),
        audio_k_lens=torch.tensor([[4, 5, 5]]),
        audio_scale=torch.ones(1),
    )
    extra = torch.randn(1, 20, 3, 4, 4, generator=g)

    def denoise(latents, timestep):
        return model(torch.cat([latents, extra], dim=1), timestep, **cond)

    def run(seed):
        noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        return sample(denoise, noise, flow_sigmas(3, 5.0))

    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))
