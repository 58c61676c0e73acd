"""FantasyTalkingGenerator: streaming windows through the session engine, held motion
frames, the streamed VAE decode, determinism, CFG batching and FirstBlockCache, audio
alignment, prepared assets.

Tiny random networks built in code (``FantasyTalkingGenerator.tiny``) at 32 px with
13-frame diffusion windows (5 motion frames, 8 new) and 2 steps; nothing downloaded.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatar.clock import VirtualClock
from avatar.frames import AudioChunk
from avatar.session import AvatarSession
from model.base import AudioWindow, MotionSettings, PreparedPortrait, clip_windows, frame_start_sample
from model.fantasytalking import generator as generator_module
from model.fantasytalking.audio_features import split_audio_windows
from model.fantasytalking.config import FantasyTalkingConfig
from model.fantasytalking.generator import CONTEXT_FEATURES, FantasyTalkingGenerator
from model.fantasytalking.speed import apply_speed_levers
from model.fantasytalking.vae_stream import frames_to_uint8
from model.portrait import load_portrait

CONFIG = FantasyTalkingConfig(steps=2, max_side=32, window_frames=13, motion_frames=5)
PORTRAIT = "/work/shared/data/portraits/astronaut.png"
SAMPLE = generator_module.sample  # the real sampler, for tests that record its results


def make_generator(**changes) -> FantasyTalkingGenerator:
    return FantasyTalkingGenerator.tiny(seed=0, config=dataclasses.replace(CONFIG, **changes))


@pytest.fixture(scope="module")
def generator() -> FantasyTalkingGenerator:
    return make_generator()


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return load_portrait(PORTRAIT, size=128)


@pytest.fixture(scope="module")
def prepared(generator, portrait) -> PreparedPortrait:
    return generator.prepare(portrait)


@pytest.fixture(scope="module")
def speech(engine_speech) -> np.ndarray:
    return engine_speech.astype(np.float32) / 32768.0


def windows_of(generator, audio: np.ndarray) -> list[AudioWindow]:
    return list(clip_windows(audio, generator))


class Spy:
    """Wraps the tiny transformer's forward to keep every call's inputs."""

    def __init__(self, generator, monkeypatch) -> None:
        self.calls: list[dict] = []
        transformer = generator.models.transformer
        original = transformer.forward

        def forward(latent_input, timestep, text_embeds, image_embeds, audio_tokens, audio_k_lens, audio_scale,
                    motion=None, identity_tokens=None):
            self.calls.append(dict(latent_input=latent_input.clone(), timestep=timestep.clone(),
                                   text_embeds=text_embeds, audio_scale=audio_scale.clone(), motion=motion,
                                   audio_k_lens=audio_k_lens.clone()))
            return original(latent_input, timestep, text_embeds, image_embeds, audio_tokens, audio_k_lens,
                            audio_scale, motion=motion, identity_tokens=identity_tokens)

        monkeypatch.setattr(transformer, "forward", forward)


def test_generator_attributes_follow_the_config(generator):
    assert generator.name == "fantasytalking" and generator.fps == 23.0
    assert generator.window_frames == CONFIG.new_frames == 8
    # Audio of the motion frames plus 0.5 s of wav2vec2 context before them.
    assert generator.context_frames == 5 + 12 and generator.lookahead_frames == 6


def test_prepare_returns_the_cacheable_assets(generator, portrait, prepared):
    arrays, meta = prepared.arrays, prepared.meta
    assert set(arrays) == {"image", "clip_tokens", "condition"}  # no identity encoder in the tiny model
    assert arrays["image"].shape == (32, 32, 3) and arrays["image"].dtype == np.uint8
    assert arrays["clip_tokens"].shape == (257, generator.models.transformer.wan.config.image_dim)
    assert arrays["condition"].shape == (20, CONFIG.latent_frames, 4, 4)
    assert (meta["height"], meta["width"], meta["latent_frames"]) == (32, 32, 4)
    assert (meta["generator"], meta["version"]) == (generator.name, generator.version)
    assert generator.prepare(portrait).to_bytes() == prepared.to_bytes()  # same image, same cache entry


def test_a_portrait_from_another_version_is_refused(generator, prepared, speech):
    other = PreparedPortrait(arrays=prepared.arrays, meta={**prepared.meta, "version": "0-old"})
    with pytest.raises(ValueError, match="prepare the image again"):
        generator.generate(other, windows_of(generator, speech)[0], MotionSettings(), None)


def test_windows_chain_and_motion_frames_are_the_last_frames_shown(generator, prepared, speech):
    state, shown = None, []
    for window in windows_of(generator, speech[: 16000 * 2])[:3]:
        frames, new_state = generator.generate(prepared, window, MotionSettings(), state)
        assert frames.shape == (window.num_frames, 32, 32, 3) and frames.dtype == np.uint8
        assert new_state.next_frame == window.first_frame + window.num_frames
        # The next window starts from the decoded values of exactly the frames just shown.
        assert np.array_equal(frames_to_uint8(new_state.motion_pixels)[0].numpy(), frames[-5:])
        shown.append(frames)
        state = new_state
    assert not np.array_equal(shown[0], shown[1])


def test_motion_frames_are_held_clean_at_every_step(generator, prepared, speech, monkeypatch):
    windows = windows_of(generator, speech[: 16000 * 2])
    _, state = generator.generate(prepared, windows[0], MotionSettings(), None)
    spy = Spy(generator, monkeypatch)
    generator.generate(prepared, windows[1], MotionSettings(), state)
    clean = generator.models.vae.encode(state.motion_pixels)
    held = CONFIG.motion_latent_frames
    assert len(spy.calls) == CONFIG.steps
    for call in spy.calls:
        torch.testing.assert_close(call["latent_input"][:1, :16, :held], clean, rtol=1e-6, atol=1e-6)
    # The new latent frames do change from step to step.
    assert not torch.equal(spy.calls[0]["latent_input"][:1, :16, held:], spy.calls[1]["latent_input"][:1, :16, held:])


def test_first_window_starts_from_the_reference_image(generator, prepared, speech, monkeypatch):
    spy = Spy(generator, monkeypatch)
    generator.generate(prepared, windows_of(generator, speech)[0], MotionSettings(), None)
    reference = torch.from_numpy(prepared.arrays["image"]).permute(2, 0, 1).float() / 127.5 - 1
    still = reference[None, :, None].repeat(1, 1, CONFIG.motion_frames, 1, 1)
    expected = generator.models.vae.encode(still)
    torch.testing.assert_close(spy.calls[0]["latent_input"][:1, :16, :2], expected, rtol=1e-5, atol=1e-5)


def test_streamed_decode_equals_one_shot_decode_of_all_windows(generator, prepared, speech, monkeypatch):
    sampled = []

    def keep(*args, **kwargs):
        sampled.append(SAMPLE(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(generator_module, "sample", keep)
    state, shown = None, []
    for window in windows_of(generator, speech[: 16000 * 2])[:3]:
        frames, state = generator.generate(prepared, window, MotionSettings(), state)
        shown.append(frames)
    held = CONFIG.motion_latent_frames
    stream = torch.cat([sampled[0]] + [latents[:, :, held:] for latents in sampled[1:]], dim=2)
    vae = generator.models.vae
    with torch.no_grad():
        one_shot = vae.vae.decode(vae.denormalize(stream)).sample
    expected = frames_to_uint8(one_shot)[0, CONFIG.motion_frames :].numpy().astype(int)
    # Float-level equality is test_ft_vae_stream's; here a rounding flip of one level is allowed.
    assert np.abs(np.concatenate(shown).astype(int) - expected).max() <= 1


def test_same_window_and_state_give_the_same_frames(generator, prepared, speech):
    windows = windows_of(generator, speech[: 16000 * 2])
    _, state = generator.generate(prepared, windows[0], MotionSettings(), None)
    kept = state.motion_pixels.clone()
    first, after = generator.generate(prepared, windows[1], MotionSettings(), state)
    generator.generate(prepared, windows[2], MotionSettings(), after)  # other work in between
    again, _ = generator.generate(prepared, windows[1], MotionSettings(), state)
    assert np.array_equal(first, again)
    assert torch.equal(state.motion_pixels, kept)  # the state given is never changed
    rebuilt = make_generator()
    _, state2 = rebuilt.generate(prepared, windows[0], MotionSettings(), None)
    assert np.array_equal(rebuilt.generate(prepared, windows[1], MotionSettings(), state2)[0], first)


def test_a_short_last_window_returns_exactly_its_frames_and_the_stream_goes_on(generator, prepared, speech):
    windows = windows_of(generator, speech[: 16000 * 2])
    _, state = generator.generate(prepared, windows[0], MotionSettings(), None)
    short = dataclasses.replace(windows[1], num_frames=3, speech=windows[1].speech[:3])
    frames, after = generator.generate(prepared, short, MotionSettings(), state)
    assert frames.shape[0] == 3 and after.next_frame == short.first_frame + 3
    assert after.decoder is None  # stopped inside a latent frame: the next window restarts the decoder
    follow = dataclasses.replace(windows[1], first_frame=short.first_frame + 3)
    more, _ = generator.generate(prepared, follow, MotionSettings(), after)
    assert more.shape == (8, 32, 32, 3)
    with pytest.raises(ValueError, match="at most 8"):
        generator.generate(prepared, dataclasses.replace(windows[1], num_frames=9, speech=np.ones(9, bool)),
                           MotionSettings(), state)


def sampled_latents(generator, prepared, window, monkeypatch) -> torch.Tensor:
    """The latents the sampler returns for ``window`` (first window of a session)."""
    kept = []

    def keep(*args, **kwargs):
        kept.append(SAMPLE(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(generator_module, "sample", keep)
    generator.generate(prepared, window, MotionSettings(), None)
    return kept[0]


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_batched_and_separate_cfg_passes_give_the_same_latents(prepared, speech, passes, monkeypatch):
    window = windows_of(make_generator(), speech)[1]
    batched, separate, weaker_prompt = (
        sampled_latents(make_generator(cfg_passes=passes, batch_cfg=batch, prompt_cfg=g_p, audio_cfg=4.5),
                        prepared, window, monkeypatch)
        for batch, g_p in ((True, 3.0), (False, 3.0), (True, 1.0))
    )
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    if passes == 3:  # the comparison is fine enough to see the prompt guidance scale
        assert (batched - weaker_prompt).abs().max() > 1e-4


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_cfg_passes_get_the_spec_inputs(prepared, speech, passes, monkeypatch):
    generator = make_generator(cfg_passes=passes)
    spy = Spy(generator, monkeypatch)
    generator.generate(prepared, windows_of(generator, speech)[1], MotionSettings(0.2, 0.9), None)
    call = spy.calls[0]
    assert call["audio_scale"].tolist() == [1.0, 0.0, 0.0][:passes]
    assert call["motion"].tolist() == [[pytest.approx(0.2), pytest.approx(0.9)]] * passes
    texts = call["text_embeds"]
    assert texts.shape[1] == 512
    if passes >= 2:
        assert torch.equal(texts[0], texts[1])  # pos and noaudio share the prompt
    if passes == 3:
        assert not torch.equal(texts[2], texts[0])  # uncond: the negative prompt
    assert [float(c["timestep"][0]) for c in spy.calls] == pytest.approx([1000.0, 1000 * (5 * 0.5 / 3)])


def test_first_block_cache_skips_blocks_and_stays_deterministic(prepared, speech):
    window = windows_of(make_generator(), speech)[1]
    plain = make_generator(steps=3).generate(prepared, window, MotionSettings(), None)[0]
    exact = make_generator(steps=3, first_block_cache=1e-12).generate(prepared, window, MotionSettings(), None)[0]
    assert np.array_equal(plain, exact)  # a threshold nothing passes: every block always runs

    cached = make_generator(steps=3, first_block_cache=1e6)
    last_block = cached.models.transformer.wan.blocks[-1].attn1
    runs = []
    last_block.register_forward_hook(lambda *args: runs.append(1))
    frames = cached.generate(prepared, window, MotionSettings(), None)[0]
    assert len(runs) == 1  # only the first step ran the tail blocks; the later steps reused them
    assert np.array_equal(cached.generate(prepared, window, MotionSettings(), None)[0], frames)
    assert not np.array_equal(frames, plain)


def test_window_audio_is_aligned_with_the_diffusion_window(generator, prepared, speech, monkeypatch):
    given = []
    real = generator.models.wav2vec

    def recording(audio):
        given.append(audio.copy())
        features = real(audio)
        return torch.arange(features.shape[1], dtype=torch.float32)[None, :, None].expand_as(features).clone()

    received = []
    transformer = generator.models.transformer
    original = transformer.project_audio

    def project(features, num_frames):
        received.append(features.clone())
        return original(features, num_frames)

    monkeypatch.setattr(generator.models, "wav2vec", recording)
    monkeypatch.setattr(transformer, "project_audio", project)
    window = windows_of(generator, speech)[5]
    generator.generate(prepared, window, MotionSettings(), None)

    # The diffusion window starts 5 motion frames before the window's first frame.
    start = frame_start_sample(window.first_frame - CONFIG.motion_frames, 23.0)
    needed = int(CONFIG.window_frames / 23.0 * 16000)
    lead = CONTEXT_FEATURES * 320
    assert np.array_equal(given[0][lead : lead + needed], speech[start : start + needed])
    assert np.array_equal(given[0][:lead], speech[start - lead : start])  # context before
    length = (needed - 400) // 320 + 1
    assert received[0].shape[1] == length
    assert received[0][0, :, 0].tolist() == list(range(CONTEXT_FEATURES, CONTEXT_FEATURES + length))
    # The split follows the spec for a clip of the window's length.
    _, k_lens = split_audio_windows(torch.zeros(1, length, 1), CONFIG.window_frames)
    with torch.inference_mode():
        _, lens = original(received[0], CONFIG.window_frames)
    assert torch.equal(lens[0], k_lens)


async def test_three_windows_through_the_session_engine(generator, prepared, speech, monkeypatch):
    calls = []
    real_generate = generator.generate

    def recording(prepared_, window, motion, state):
        frames, new_state = real_generate(prepared_, window, motion, state)
        calls.append((window, state, new_state, frames))
        return frames, new_state

    monkeypatch.setattr(generator, "generate", recording)
    frames, seen_speech = [], False
    async with AvatarSession(generator, prepared, clock=VirtualClock()) as session:
        await session.push_audio(AudioChunk(speech[:16000], 16000))
        session.end_of_speech()
        async for frame in session:
            frames.append(frame)
            seen_speech |= frame.speaking
            if seen_speech and not frame.speaking:
                break

    assert sum(f.speaking for f in frames) == 23  # 1 s at the generator's 23 fps
    assert len(calls) >= 3
    for (_, _, out, _), (_, state_in, _, _) in zip(calls, calls[1:]):
        assert state_in is out  # each window continues the previous one
    shown = {w.first_frame + k: f for w, _, _, images in calls for k, f in enumerate(images)}
    for k, frame in enumerate(frames):
        assert frame.video.image.shape == (32, 32, 3)
        assert np.array_equal(frame.video.image, shown[k])
        assert frame.video.pts == frame_start_sample(k, 23.0)


@pytest.mark.xfail(strict=False, reason=(
    "known open bug: in some full-suite runs from a fresh clone the group-offloaded latents differ from "
    "the plain ones (max abs 7.24, the same value each time); not reproduced alone or under load"))
def test_group_offload_and_bfloat16_run_and_keep_the_fp32_modules(prepared, speech, monkeypatch):
    generator = make_generator()
    window = windows_of(generator, speech)[1]
    plain = sampled_latents(generator, prepared, window, monkeypatch)
    # The same networks, their Wan blocks now group-offloaded (CPU to CPU): the same latents.
    apply_speed_levers(generator.models.transformer, dataclasses.replace(CONFIG, group_offload=True),
                       torch.device("cpu"))
    assert generator.models.transformer.wan.blocks[0]._diffusers_hook.get_hook("group_offloading") is not None
    offloaded = sampled_latents(generator, prepared, window, monkeypatch)
    torch.testing.assert_close(offloaded, plain, rtol=1e-5, atol=1e-5)
    half = make_generator(dtype="bfloat16")
    wan = half.models.transformer.wan
    assert wan.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert wan.rope.freqs_cos.dtype == torch.float32  # diffusers' fp32 modules stay fp32
    assert wan.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    frames, _ = half.generate(prepared, window, MotionSettings(), None)
    assert frames.shape == (8, 32, 32, 3)


@pytest.mark.parametrize(("changes", "message", "package"), [
    ({"attention_backend": "flash"}, "flash-attn", "flash_attn"),
    ({"attention_backend": "sage"}, "sageattention", "sageattention"),
    ({"context_parallel": "ring"}, "torchrun", None),
])
def test_unavailable_speed_levers_fail_with_what_is_missing(changes, message, package):
    import importlib.util

    if package and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(RuntimeError, match=message):
        make_generator(**changes)
