"""FantasyTalkingTransformer and the paper's identity and motion modules (spec section 6):
zero-initialised modules leave the output exactly unchanged; trained (non-zero) ones change it."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.errors import NoFaceError, PortraitError, WeightsError
from model.fantasytalking.identity import IdentityEncoder, IdentityQFormer
from model.fantasytalking.motion import MotionIntensityEmbedding
from model.fantasytalking.transformer import tiny_transformer

FRAMES, HEIGHT, WIDTH, WINDOW = 3, 4, 6, 5


def make_inputs(model, batch: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    config = model.wan.config
    return dict(
        latent_input=torch.randn(batch, 36, FRAMES, HEIGHT, WIDTH, generator=g),
        timestep=torch.full((batch,), 750.0),
        text_embeds=torch.randn(batch, 512, config.text_dim, generator=g),
        image_embeds=torch.randn(batch, 257, config.image_dim, generator=g),
        audio_tokens=torch.randn(batch, FRAMES, WINDOW, model.audio_proj.out_dim, generator=g),
        audio_k_lens=torch.tensor([[3, 5, 4]] * batch),
        audio_scale=torch.ones(batch),
    )


def released_only(full):
    """A model with only the released parts (no identity or motion module) whose released
    weights are those of ``full``."""
    plain = tiny_transformer(seed=7, identity=False, motion=False)
    missing, unexpected = full.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    added = ("identity_qformer.", "motion_embedding.")
    assert missing and all(k.startswith(added) or ".identity_" in k for k in missing)
    return plain


@torch.no_grad()
def test_forward_shape_and_determinism():
    model = tiny_transformer(seed=0)
    inputs = make_inputs(model)
    out = model(**inputs)
    assert out.shape == (2, 16, FRAMES, HEIGHT, WIDTH) and out.dtype == torch.float32
    assert torch.equal(out, tiny_transformer(seed=0)(**inputs))
    assert not torch.equal(out, tiny_transformer(seed=1)(**inputs))


@torch.no_grad()
def test_zero_initialised_identity_and_motion_change_nothing():
    full = tiny_transformer(seed=0)
    plain = released_only(full)
    inputs = make_inputs(full)
    reference = plain(**inputs)
    embedding = torch.nn.functional.normalize(torch.randn(2, 512), dim=1)
    identity = full.identity_qformer(embedding)
    assert not identity.any()
    for motion in (None, torch.tensor([[0.0, 1.0], [0.9, 0.2]])):
        assert torch.equal(full(**inputs, motion=motion, identity_tokens=identity), reference)


@torch.no_grad()
def test_trained_identity_and_motion_change_the_output():
    full = tiny_transformer(seed=0)
    plain = released_only(full)
    inputs = make_inputs(full)
    reference = plain(**inputs)
    torch.manual_seed(5)
    full.motion_embedding.proj.weight.normal_()
    full.motion_embedding.proj.bias.normal_()
    still = full(**inputs, motion=torch.tensor([[0.1, 0.1]] * 2))
    lively = full(**inputs, motion=torch.tensor([[0.9, 0.9]] * 2))
    assert not torch.allclose(still, reference) and not torch.allclose(still, lively)

    full.motion_embedding.proj.weight.zero_()
    full.motion_embedding.proj.bias.zero_()
    full.identity_qformer.proj_out.weight.normal_()
    identity = full.identity_qformer(torch.nn.functional.normalize(torch.randn(2, 512), dim=1))
    assert identity.any()
    assert not torch.allclose(full(**inputs, identity_tokens=identity), reference)


@torch.no_grad()
def test_audio_off_equals_the_stock_wan_model():
    """audio_scale 0 and no identity: exactly diffusers' Wan2.1-I2V output (released
    processors replaced, zero motion embedding added)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_transformer(seed=0)
    stock = copy.deepcopy(model.wan)
    for block in stock.blocks:
        block.attn2.set_processor(WanAttnProcessor())
    inputs = make_inputs(model)
    expected = stock(inputs["latent_input"], inputs["timestep"], inputs["text_embeds"], inputs["image_embeds"],
                     return_dict=False)[0]
    assert torch.equal(model(**{**inputs, "audio_scale": torch.zeros(2)}), expected)
    assert not torch.allclose(model(**inputs), expected)


@torch.no_grad()
def test_batched_passes_equal_separate_passes():
    """CFG passes batched in one forward give each pass's own result."""
    model = tiny_transformer(seed=0)
    inputs = make_inputs(model)
    inputs["audio_scale"] = torch.tensor([1.0, 0.0])
    batched = model(**inputs)
    for b in range(2):
        single = {k: v[b : b + 1] for k, v in inputs.items()}
        assert torch.allclose(model(**single)[0], batched[b], atol=1e-5)


def test_project_audio_shapes():
    model = tiny_transformer(seed=0)
    tokens, k_lens = model.project_audio(torch.randn(1, 71, 32), 33)
    assert tokens.shape == (1, 9, tokens.shape[2], 16) and k_lens.shape == (1, 9) and k_lens.dtype == torch.int64
    with pytest.raises(ValueError, match="32 channels"):
        model.project_audio(torch.randn(1, 71, 30), 33)


@torch.no_grad()
def test_bad_inputs_name_what_is_wrong():
    model = tiny_transformer(seed=0)
    inputs = make_inputs(model)
    with pytest.raises(ValueError, match="text_embeds must have shape \\[2, 512, 16\\]"):
        model(**{**inputs, "text_embeds": inputs["text_embeds"][:, :300]})
    with pytest.raises(ValueError, match="one window per latent frame"):
        model(**{**inputs, "audio_tokens": inputs["audio_tokens"][:, :2]})
    with pytest.raises(ValueError, match="latent_input"):
        model(**{**inputs, "latent_input": inputs["latent_input"][:, :16]})
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        model(**inputs, motion=torch.tensor([[1.5, 0.5]] * 2))
    plain = tiny_transformer(seed=0, identity=False)
    with pytest.raises(ValueError, match="no identity module"):
        plain(**inputs, identity_tokens=torch.zeros(2, 4, 16))


def test_identity_qformer_tokens():
    torch.manual_seed(0)
    qformer = IdentityQFormer(out_dim=24, dim=16, num_tokens=5, depth=2, heads=2)
    tokens = qformer(torch.randn(3, 512))
    assert tokens.shape == (3, 5, 24) and not tokens.any()
    with pytest.raises(ValueError, match="\\[B, 512\\]"):
        qformer(torch.randn(3, 128))


def test_motion_embedding_is_zero_until_trained():
    torch.manual_seed(0)
    motion = MotionIntensityEmbedding(embed_dim=10, hidden_dim=8, num_tokens=4)
    values = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 0.2]])
    assert not motion(values).any()
    torch.nn.init.normal_(motion.proj.weight)
    out = motion(values)
    assert out.shape == (3, 10) and not torch.allclose(out[0], out[1])
    # face and body are not interchangeable
    assert not torch.allclose(motion(torch.tensor([[0.2, 0.8]])), motion(torch.tensor([[0.8, 0.2]])))
    with pytest.raises(ValueError, match="\\[B, 2\\]"):
        motion(torch.zeros(3))


class FakeAnalyser:
    """Stands in for insightface's FaceAnalysis: returns the given faces, records the image."""

    def __init__(self, faces):
        self.faces = faces
        self.seen = None

    def get(self, image):
        self.seen = image
        return self.faces


def test_identity_encoder_takes_the_largest_face_in_bgr():
    small = SimpleNamespace(bbox=np.array([0, 0, 10, 10.0]), normed_embedding=np.full(512, 0.1))
    large = SimpleNamespace(bbox=np.array([5, 5, 60, 70.0]), normed_embedding=np.full(512, 0.2))
    analyser = FakeAnalyser([small, large])
    image = np.zeros((80, 80, 3), np.uint8)
    image[..., 0] = 255  # red in RGB
    embedding = IdentityEncoder(analyser)(image)
    assert embedding.dtype == np.float32 and embedding.shape == (512,)
    assert np.allclose(embedding, 0.2)
    assert analyser.seen[0, 0].tolist() == [0, 0, 255]  # handed over as BGR


def test_identity_encoder_errors(tmp_path):
    with pytest.raises(NoFaceError):
        IdentityEncoder(FakeAnalyser([]))(np.zeros((80, 80, 3), np.uint8))
    with pytest.raises(PortraitError, match="RGB uint8"):
        IdentityEncoder(FakeAnalyser([]))(np.zeros((80, 80), np.uint8))
    with pytest.raises(WeightsError, match="antelopev2"):
        IdentityEncoder.from_dir(tmp_path)
