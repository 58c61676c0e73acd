"""Conditioning inputs (spec sections 1 and 5): reference resize, CLIP input and
tokens, the I2V condition latent and mask, prompt embeddings (512 tokens, cache,
precomputed file). Tiny random models are built in code; nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.errors import PortraitError, WeightsError
from model.fantasytalking.conditioning import (
    CLIP_MEAN,
    CLIP_STD,
    NEGATIVE_PROMPT,
    TEXT_TOKENS,
    PromptEmbeddings,
    UMT5PromptEncoder,
    clip_pixels,
    clip_tokens,
    condition_latent,
    condition_mask,
    image_to_tensor,
    load_prompt_embeddings,
    pad_text_tokens,
    reference_size,
    resize_reference,
    save_prompt_embeddings,
)
from model.fantasytalking.tiny import tiny_vae
from model.fantasytalking.vae_stream import StreamingVaeDecoder


def rule_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Spec 5: longest edge max_side (sides truncated), then each side rounded up to 16."""
    scale = max_side / max(width, height)
    return tuple(16 * int(np.ceil(int(side * scale) / 16)) for side in (width, height))


@pytest.mark.parametrize("size", [(1000, 700), (640, 480), (300, 200), (333, 517), (512, 512)])
def test_reference_size_is_longest_edge_then_multiples_of_16(size):
    width, height = reference_size(*size, 512)
    assert (width, height) == rule_size(*size, 512)
    assert width % 16 == 0 and height % 16 == 0 and max(width, height) == 512


def test_resize_reference_keeps_the_picture():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((700, 500), Image.NEAREST))
    out = resize_reference(image, 512)
    assert out.dtype == np.uint8 and out.shape == (368, 512, 3)  # 512 x int(500*512/700)=365 -> 368
    # Block colours survive: the centre of each source block keeps its colour.
    for row, col in [(0, 0), (2, 3), (4, 6)]:
        y, x = int((row + 0.5) / 5 * 368), int((col + 0.5) / 7 * 512)
        assert np.abs(out[y, x].astype(int) - small[row, col]).max() <= 3


def test_resize_reference_refuses_non_rgb_arrays():
    with pytest.raises(PortraitError, match="RGB uint8"):
        resize_reference(np.zeros((64, 64), np.uint8), 512)


def test_image_to_tensor_maps_to_minus_one_one():
    image = np.array([[[0, 255, 51]]], np.uint8)
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 1, 1)
    torch.testing.assert_close(tensor.flatten(), torch.tensor([-1.0, 1.0, 51 * 2 / 255 - 1]))


def test_clip_input_squashes_the_whole_frame_and_normalises():
    # A tall image with a green band at the top: a centre crop would cut it off.
    image = np.full((448, 224, 3), 128, np.uint8)
    image[:112] = (0, 255, 0)
    pixels = clip_pixels(image_to_tensor(image))
    assert pixels.shape == (1, 3, 224, 224)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    green = (torch.tensor([0.0, 1.0, 0.0]) - mean) / std
    gray = (torch.tensor([128 / 255] * 3) - mean) / std
    torch.testing.assert_close(pixels[0, :, 20, 112], green, atol=1e-4, rtol=0)  # top quarter: band
    torch.testing.assert_close(pixels[0, :, 150, 112], gray, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                              image_size=224, patch_size=14)
    return CLIPVisionModel(config).eval()


def test_clip_tokens_are_the_penultimate_hidden_state(tiny_clip):
    from transformers import CLIPVisionModel

    image = image_to_tensor(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    tokens = clip_tokens(tiny_clip, image)
    assert tokens.shape == (1, 257, 16) and tokens.dtype == torch.float32
    # The same weights without the last layer: its output is the 3-layer model's penultimate state.
    shorter = CLIPVisionModel(tiny_clip.config.__class__(**{**tiny_clip.config.to_dict(), "num_hidden_layers": 2}))
    missing, unexpected = shorter.load_state_dict(tiny_clip.state_dict(), strict=False)
    assert not missing and all(".layers.2." in key for key in unexpected)
    with torch.no_grad():
        expected = shorter.eval()(pixel_values=clip_pixels(image)).last_hidden_state
        last = tiny_clip(pixel_values=clip_pixels(image)).last_hidden_state
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens, last)


def spec_mask(num_frames: int, h: int, w: int) -> torch.Tensor:
    """Spec 1 in words: per pixel frame 1 for frame 0, 0 after; frame 0 repeated 4
    times; consecutive groups of 4 entries form the 4 channels of each latent frame."""
    per_frame = [1.0] + [0.0] * (num_frames - 1)
    sequence = per_frame[:1] * 4 + per_frame[1:]
    latent_frames = len(sequence) // 4
    mask = torch.empty(1, 4, latent_frames, h, w)
    for t in range(latent_frames):
        for c in range(4):
            mask[0, c, t] = sequence[4 * t + c]
    return mask


@pytest.mark.parametrize("frames", [5, 33, 81])
def test_condition_mask_layout(frames):
    mask = condition_mask(frames, 3, 2)
    assert mask.shape == (1, 4, (frames - 1) // 4 + 1, 3, 2)
    torch.testing.assert_close(mask, spec_mask(frames, 3, 2), rtol=0, atol=0)


def test_condition_mask_refuses_frame_counts_that_are_not_4k_plus_1():
    with pytest.raises(ValueError, match="4k\\+1"):
        condition_mask(32, 2, 2)


def test_condition_latent_is_mask_then_vae_latent_of_image_and_zero_frames():
    stream = StreamingVaeDecoder(tiny_vae(seed=1))
    image = image_to_tensor(np.random.default_rng(2).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    cond = condition_latent(stream, image, 9)
    assert cond.shape == (1, 20, 3, 4, 6)
    torch.testing.assert_close(cond[:, :4], condition_mask(9, 4, 6))
    video = torch.cat([image.unsqueeze(2), torch.zeros(1, 3, 8, 32, 48)], dim=2)
    torch.testing.assert_close(cond[:, 4:], stream.encode(video))
    # The VAE is causal: the first latent frame is the image alone.
    torch.testing.assert_close(cond[:, 4:, :1], stream.encode(image.unsqueeze(2)), atol=1e-5, rtol=1e-5)


def test_text_is_padded_to_exactly_512_tokens():
    embeds = torch.randn(7, 16)
    padded = pad_text_tokens(embeds)
    assert padded.shape == (1, TEXT_TOKENS, 16)
    torch.testing.assert_close(padded[0, :7], embeds)
    assert not padded[0, 7:].any()
    with pytest.raises(ValueError, match="at most 512"):
        pad_text_tokens(torch.zeros(513, 16))


@pytest.fixture(scope="module")
def tiny_text_encoder():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "woman", "is", "talking", "static"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8)
    return UMT5EncoderModel(config).eval(), tokenizer


def test_umt5_encoder_keeps_the_valid_tokens(tiny_text_encoder):
    model, tokenizer = tiny_text_encoder
    encode = UMT5PromptEncoder(model, tokenizer)
    embeds = encode("  a woman   is talking ")
    assert embeds.shape == (5, 16)  # 4 words + </s>
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    with torch.no_grad():
        direct = model(ids, torch.ones_like(ids)).last_hidden_state[0]
    torch.testing.assert_close(embeds, direct, atol=1e-5, rtol=1e-5)


def test_prompt_embeddings_are_computed_once_per_text(tiny_text_encoder):
    model, tokenizer = tiny_text_encoder
    calls = []
    encoder = UMT5PromptEncoder(model, tokenizer)

    def counting(text):
        calls.append(text)
        return encoder(text)

    prompts = PromptEmbeddings(counting)
    first = prompts.get("a woman is talking")
    again = prompts.get("a woman is talking")
    other = prompts.get("static")
    assert calls == ["a woman is talking", "static"]
    assert first is again and first.shape == other.shape == (1, 512, 16)


def test_precomputed_file_round_trip_replaces_the_text_encoder(tmp_path):
    path = tmp_path / "prompts.safetensors"
    table = {"": torch.randn(1, 16), NEGATIVE_PROMPT: torch.randn(37, 16)}
    save_prompt_embeddings(path, table)
    loaded = load_prompt_embeddings(path)
    assert set(loaded) == set(table)
    prompts = PromptEmbeddings(None, loaded)
    torch.testing.assert_close(prompts.get(NEGATIVE_PROMPT), pad_text_tokens(table[NEGATIVE_PROMPT]))
    with pytest.raises(KeyError, match="text encoder is not loaded"):
        prompts.get("a prompt nobody computed")


def test_prompt_file_errors_name_the_file_and_layout(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="nope.safetensors.*embeds"):
        load_prompt_embeddings(missing)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(WeightsError, match="not a prompt embedding file"):
        load_prompt_embeddings(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_prompt_embeddings(garbage)
