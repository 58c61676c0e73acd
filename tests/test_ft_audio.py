"""FantasyTalking audio path (spec section 3): wav2vec2 features, projection, per-latent-frame windows."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.errors import WeightsError  # noqa: E402
from model.fantasytalking.audio_adapter import AudioProjModel  # noqa: E402
from model.fantasytalking.audio_features import (  # noqa: E402
    Wav2Vec2Features,
    crop_audio,
    normalize_audio,
    split_audio_windows,
    window_ranges,
)


def tiny_wav2vec2(seed: int = 0):
    """A random Wav2Vec2Model with the base model's conv stack (so L matches) and tiny widths."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        layerdrop=0.0, mask_time_prob=0.0,
    )
    return Wav2Vec2Model(config)


def speech(seconds: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    tone = np.sin(np.arange(n) * 2 * np.pi * 220 / 16000)
    return (0.3 * tone + 0.05 * rng.standard_normal(n) + 0.02).astype(np.float32)


@pytest.fixture(scope="module")
def features() -> Wav2Vec2Features:
    return Wav2Vec2Features(tiny_wav2vec2())


def test_worked_example_23_fps(features):
    """fps 23, 81 frames: L = 175, windows of 17, ranges and k_lens as in the spec."""
    audio = crop_audio(speech(4.0), 81, 23.0)
    assert len(audio) == int(81 / 23 * 16000)
    feats = features(audio)
    assert feats.shape == (1, 175, 32)

    ranges = window_ranges(175, 81)
    assert len(ranges) == 21
    assert ranges[:3] == [(-7, 1), (1, 9), (10, 18)]
    assert ranges[-1] == (165, 173)

    proj = torch.randn(1, 175, 6, generator=torch.Generator().manual_seed(0))
    windows, k_lens = split_audio_windows(proj, 81)
    assert windows.shape == (1, 21, 17, 6)
    assert k_lens.dtype == torch.int64
    assert k_lens.tolist() == [6, 14] + [17] * 18 + [14]
    # Window 0 covers [-11, 5] after widening: tokens 0..5 first, then zeros at the end.
    assert torch.equal(windows[0, 0, :6], proj[0, 0:6])
    assert not windows[0, 0, 6:].any()
    # Window 1 covers [-3, 13]; window 2 covers [6, 22]; the last covers [161, 177].
    assert torch.equal(windows[0, 1, :14], proj[0, 0:14])
    assert not windows[0, 1, 14:].any()
    assert torch.equal(windows[0, 2], proj[0, 6:23])
    assert torch.equal(windows[0, 20, :14], proj[0, 161:175])
    assert not windows[0, 20, 14:].any()


def test_25_fps_windows_have_15_tokens(features):
    audio = crop_audio(speech(4.0), 81, 25.0)
    feats = features(audio)
    assert feats.shape[1] == (len(audio) - 400) // 320 + 1 == 161
    windows, k_lens = split_audio_windows(feats, 81)
    assert windows.shape == (1, 21, 15, 32)
    assert k_lens[2:-1].tolist() == [15] * 18
    assert k_lens[0] < 15 and k_lens[1] < 15


def test_window_ranges_follow_the_formula():
    """A 33-frame window at 23 fps: every range comes from the spec's centre formula."""
    num_tokens, num_frames = 71, 33
    tpf = num_tokens / num_frames
    half = int(2 * tpf)
    ranges = window_ranges(num_tokens, num_frames)
    assert len(ranges) == 9
    for i in range(1, 9):
        centre = int(tpf * (4 * i - 1)) - 1
        assert ranges[i] == (centre - half, centre + half)
    assert ranges[0] == (ranges[1][0] - 2 * half, ranges[1][0])


@pytest.mark.parametrize("frames", [4, 3, 6, 1])
def test_bad_frame_counts_are_refused(frames):
    with pytest.raises(ValueError, match="4k\\+1"):
        split_audio_windows(torch.zeros(1, 50, 4), frames)


def test_normalisation_matches_the_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    audio = speech(1.3)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    reference = extractor(audio, sampling_rate=16000, return_tensors="np").input_values[0]
    assert np.array_equal(normalize_audio(audio), reference)


def test_features_are_the_models_last_hidden_state(features):
    audio = speech(0.5)
    out = features(audio)
    direct = features.model(torch.from_numpy(normalize_audio(audio))[None]).last_hidden_state
    assert out.dtype == torch.float32
    assert torch.equal(out, direct)
    # Deterministic: eval mode, no layer drop, no time masking.
    assert torch.equal(out, features(audio))
    assert not features.model.training


def test_features_refuse_bad_audio(features):
    with pytest.raises(ValueError, match="float32"):
        features(np.zeros(1000, np.float64))
    with pytest.raises(ValueError, match="400"):
        features(np.zeros(399, np.float32))
    with pytest.raises(ValueError, match="need 56347 samples"):
        crop_audio(np.zeros(1000, np.float32), 81, 23.0)


def test_from_dir_loads_a_local_model(tmp_path, features):
    features.model.save_pretrained(tmp_path / "wav2vec2")
    loaded = Wav2Vec2Features.from_dir(tmp_path / "wav2vec2")
    assert loaded.model.config.layerdrop == 0.0 and loaded.model.config.mask_time_prob == 0.0
    audio = speech(0.4)
    assert torch.allclose(loaded(audio), features(audio), atol=1e-6)


def test_from_dir_names_the_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="wav2vec2-base-960h"):
        Wav2Vec2Features.from_dir(tmp_path / "nowhere")


def test_projection_is_linear_then_layernorm():
    torch.manual_seed(0)
    proj = AudioProjModel(in_dim=12, out_dim=10)
    assert sorted(proj.state_dict()) == ["norm.bias", "norm.weight", "proj.weight"]
    assert proj.proj.bias is None and proj.norm.eps == 1e-5
    with torch.no_grad():
        proj.norm.weight.normal_()
        proj.norm.bias.normal_()
    x = torch.randn(1, 7, 12)
    y = x @ proj.proj.weight.T
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    expected = (y - mean) / torch.sqrt(var + 1e-5) * proj.norm.weight + proj.norm.bias
    assert torch.allclose(proj(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="12 channels"):
        proj(torch.zeros(1, 7, 11))
