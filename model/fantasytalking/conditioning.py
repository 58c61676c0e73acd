"""Conditioning inputs of the I2V model: reference image, CLIP tokens, condition latent, prompt.

Spec sections 1 and 5 (../shared/specs/fantasytalking.md):

* reference image: longest edge ``max_side`` (Lanczos, sides truncated as the
  reference code does), then both sides rounded UP to a multiple of 16 (bicubic
  resize to that size, as the reference pipeline's ``image.resize``);
* CLIP input: the whole frame squashed (no crop) to 224x224 with bicubic
  interpolation of the [-1, 1] tensor, mapped to [0, 1] and normalised with
  OpenAI CLIP mean/std; tokens are the penultimate hidden state [1, 257, 1280];
* condition: ``[mask 4 | VAE latent 16]`` of the video ``[reference image, then
  F-1 zero frames]``; the mask is 1 for frame 0 repeated 4 times, 0 elsewhere,
  reshaped to (B, 4, T_lat, h, w);
* prompt: UMT5 embedding of the valid tokens, zero-padded to exactly 512 tokens
  (diffusers' Wan cross-attention splits image and text context at
  ``context.shape[1] - 512``), computed once per text and cached, or read from a
  precomputed safetensors file so the 11 GB text encoder need not stay loaded.
"""
from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.errors import PortraitError, WeightsError
from model.fantasytalking.vae_stream import StreamingVaeDecoder

logger = logging.getLogger(__name__)

#: Text tokens the Wan cross-attention expects, exactly (spec section 1).
TEXT_TOKENS = 512
#: Side of the CLIP ViT-H/14 input, pixels.
CLIP_SIZE = 224
#: OpenAI CLIP normalisation (the Wan image encoder's transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Multiple of 16 for H and W: 8x VAE compression times the (2, 2) patch.
SIZE_MULTIPLE = 16
#: The reference code's negative prompt (spec section 5): Wan's default negative
#: prompt with "the person is static, motionless" in front.
NEGATIVE_PROMPT = (
    "人物静止不动，静止，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
#: ``format`` metadata of a precomputed prompt-embedding file.
PROMPT_FILE_FORMAT = "fantasytalking-prompt-embeddings/1"


# -- reference image -------------------------------------------------------------


def reference_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the model's reference image: longest edge scaled to
    ``max_side`` (each side truncated, as the reference's resize), then rounded up
    to a multiple of 16. Raises ValueError for a side that scales below 1 pixel."""
    scale = max_side / max(width, height)
    scaled = int(width * scale), int(height * scale)
    if min(scaled) < 1:
        raise ValueError(f"a {width}x{height} image cannot be scaled to a longest edge of {max_side} pixels")
    return tuple(-(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE for side in scaled)  # type: ignore[return-value]


def resize_reference(image: np.ndarray, max_side: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> the model's reference image, RGB uint8 (H', W', 3) with
    H', W' multiples of 16 and the longest edge ``max_side`` (rounded up).

    Two resizes, as the reference: Lanczos to the longest edge, then bicubic to the
    16-multiple size when it differs. Raises PortraitError for a non-RGB-uint8 array.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise PortraitError(f"portrait must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    scale = max_side / max(width, height)
    scaled = (int(width * scale), int(height * scale))
    if scaled != (width, height):
        picture = picture.resize(scaled, Image.LANCZOS)
    final = reference_size(width, height, max_side)
    if final != scaled:
        picture = picture.resize(final, Image.BICUBIC)
    return np.asarray(picture, dtype=np.uint8).copy()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 [1, 3, H, W] in [-1, 1] (x * 2/255 - 1)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32)
    return (tensor * (2.0 / 255.0) - 1.0).permute(2, 0, 1).unsqueeze(0)


# -- CLIP tokens -----------------------------------------------------------------------


def clip_pixels(image: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """The CLIP input of a reference image: [1, 3, H, W] in [-1, 1] -> float32
    [1, 3, size, size], the whole frame squashed with bicubic interpolation (no
    crop), then OpenAI CLIP mean/std normalisation of the [0, 1] values."""
    squashed = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=image.device).view(1, 3, 1, 1)
    return (squashed * 0.5 + 0.5 - mean) / std


@torch.no_grad()
def clip_tokens(image_encoder: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Image tokens of a reference image [1, 3, H, W] in [-1, 1]: the penultimate
    hidden state of a transformers ``CLIPVisionModel`` (spec section 1), float32
    [1, 257, hidden] for ViT-H/14 at 224 px (hidden 1280)."""
    size = int(image_encoder.config.image_size)
    param = next(image_encoder.parameters())
    pixels = clip_pixels(image, size).to(device=param.device, dtype=param.dtype)
    hidden = image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
    return hidden[-2].float()


# -- I2V condition ------------------------------------------------------------------


def condition_mask(num_frames: int, height: int, width: int) -> torch.Tensor:
    """The I2V mask, float32 [1, 4, T_lat, height, width] (latent height/width):
    1 for pixel frame 0, repeated 4 times (the pixel frames the first latent frame
    stands for), 0 for the other F-1 frames, reshaped to (B, 4, T_lat, h, w).
    Raises ValueError unless ``num_frames`` is 4k+1."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
    mask = torch.zeros(1, num_frames + 3, height, width)
    mask[:, :4] = 1.0  # frame 0 repeated 4 times
    return mask.view(1, (num_frames + 3) // 4, 4, height, width).transpose(1, 2).contiguous()


@torch.no_grad()
def condition_latent(stream: StreamingVaeDecoder, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The 20 conditioning channels of the model input, float32 [1, 20, T_lat, h, w]:
    ``[mask 4 | model-space VAE latent 16]`` of ``[reference image, F-1 zero frames]``.

    ``image``: [1, 3, H, W] in [-1, 1], H and W multiples of 16; ``num_frames``: F,
    4k+1. Raises ValueError for other frame counts.
    """
    _, _, height, width = image.shape
    video = torch.cat([image.unsqueeze(2), image.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    latent = stream.encode(video)
    mask = condition_mask(num_frames, latent.shape[3], latent.shape[4]).to(latent.device)
    return torch.cat([mask, latent], dim=1)


# -- prompt embeddings ------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The Wan pipelines' prompt cleaning without ftfy: HTML entities decoded,
    runs of whitespace collapsed, ends stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def _token_rows(embeds: torch.Tensor) -> torch.Tensor:
    """[n, C] or [1, n, C] -> [n, C]; ValueError for another shape or n > 512."""
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.ndim != 2:
        raise ValueError(f"text embeddings must be [n, C], got {tuple(embeds.shape)}")
    if embeds.shape[0] > TEXT_TOKENS:
        raise ValueError(f"text embeddings have {embeds.shape[0]} tokens; at most {TEXT_TOKENS} are accepted")
    return embeds


def pad_text_tokens(embeds: torch.Tensor) -> torch.Tensor:
    """Valid-token text embeddings [n, C] (or [1, n, C]), n <= 512 -> [1, 512, C]
    with zero rows after the n valid ones. Raises ValueError for more than 512 tokens."""
    rows = _token_rows(embeds)
    padded = rows.new_zeros(TEXT_TOKENS, rows.shape[1])
    padded[: rows.shape[0]] = rows
    return padded.unsqueeze(0)


class UMT5PromptEncoder:
    """Text -> UMT5 embeddings of its valid tokens, float32 [n, 4096] (n <= 512), as
    diffusers' Wan pipelines: tokenised to 512 with padding and truncation, encoded
    with the attention mask, the padded positions dropped.

    ``text_encoder``: transformers ``UMT5EncoderModel``; ``tokenizer``: its tokenizer
    (any transformers tokenizer called as ``tokenizer(texts, padding=..., ...)``).
    """

    def __init__(self, text_encoder: torch.nn.Module, tokenizer: Callable) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(text)], padding="max_length", max_length=TEXT_TOKENS, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return hidden[0, : int(mask[0].gt(0).sum())].float()


def save_prompt_embeddings(path: str | Path, embeddings: Mapping[str, torch.Tensor]) -> None:
    """Write text -> valid-token embeddings [n, C] to a safetensors file that
    ``load_prompt_embeddings`` reads: tensors ``embeds.{i}``, metadata ``text.{i}``
    (the exact texts) and ``format``."""
    from safetensors.torch import save_file

    tensors, metadata = {}, {"format": PROMPT_FILE_FORMAT}
    for i, (text, embeds) in enumerate(embeddings.items()):
        tensors[f"embeds.{i}"] = _token_rows(embeds).float().contiguous().cpu()
        metadata[f"text.{i}"] = text
    save_file(tensors, str(path), metadata=metadata)


_PROMPT_LAYOUT = (
    f"expected a safetensors file with metadata format={PROMPT_FILE_FORMAT!r}, tensors 'embeds.<i>' [n, C] "
    "(n <= 512 valid tokens) and metadata 'text.<i>' holding each prompt's exact text"
)


def prompt_table(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> dict[str, torch.Tensor]:
    """The text -> float32 [n, C] table of a prompt-embedding file's tensors and string
    metadata (see ``save_prompt_embeddings``). Raises WeightsError naming ``source``
    and the offending tensor when they are not in that layout."""
    if metadata.get("format") != PROMPT_FILE_FORMAT:
        raise WeightsError(f"{source} is not a prompt embedding file; {_PROMPT_LAYOUT}")
    table = {}
    for key, tensor in sorted(tensors.items()):
        index = key.removeprefix("embeds.")
        if not key.startswith("embeds.") or f"text.{index}" not in metadata:
            raise WeightsError(f"{source}: unexpected tensor {key!r}; {_PROMPT_LAYOUT}")
        if tensor.ndim != 2 or tensor.shape[0] > TEXT_TOKENS:
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}; {_PROMPT_LAYOUT}")
        table[metadata[f"text.{index}"]] = tensor.float()
    return table


def load_prompt_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a precomputed prompt-embedding file (see ``save_prompt_embeddings``):
    text -> float32 [n, C]. Raises WeightsError naming the file when it is missing
    or not in that layout."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"prompt embedding file not found: {path}; {_PROMPT_LAYOUT}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise WeightsError(f"{path} cannot be read as safetensors ({exc}); {_PROMPT_LAYOUT}") from exc
    return prompt_table(tensors, metadata, str(path))


class PromptEmbeddings:
    """Prompt text -> padded embedding [1, 512, C], computed once per text and kept.

    ``encoder``: a text -> [n, C] callable (``UMT5PromptEncoder``) or None when the
    text encoder is not loaded; ``precomputed``: text -> [n, C] (from
    ``load_prompt_embeddings``), looked up first. ``device``/``dtype``: of the
    returned tensors. ``get`` raises KeyError naming the text when neither source
    has it.
    """

    def __init__(
        self,
        encoder: Callable[[str], torch.Tensor] | None = None,
        precomputed: Mapping[str, torch.Tensor] | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._encoder = encoder
        self._precomputed = dict(precomputed or {})
        self._cache: dict[str, torch.Tensor] = {}
        self._device = torch.device(device)
        self._dtype = dtype

    def get(self, text: str) -> torch.Tensor:
        """The embedding of ``text`` (exact text first, then the cleaned text), [1, 512, C]."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        if text in self._precomputed:
            embeds = self._precomputed[text]
        elif clean_prompt(text) in self._precomputed:
            embeds = self._precomputed[clean_prompt(text)]
        elif self._encoder is not None:
            logger.info("encoding prompt %r with the text encoder", text[:40])
            embeds = self._encoder(text)
        else:
            known = ", ".join(repr(t[:30]) for t in self._precomputed) or "none"
            raise KeyError(
                f"no embedding for prompt {text[:60]!r}: the text encoder is not loaded and the precomputed "
                f"embeddings hold only {known}"
            )
        padded = pad_text_tokens(embeds.to(torch.float32)).to(device=self._device, dtype=self._dtype)
        self._cache[text] = padded
        return padded
