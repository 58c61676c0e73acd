"""FantasyTalkingGenerator: the audio-driven Wan2.1 I2V diffusion model behind the session engine.

``prepare`` computes the per-portrait assets once (spec sections 1 and 5): the
reference image resized to a 16-multiple size, its CLIP tokens, the 20-channel
condition (mask + VAE latent of [image, zero frames]) and, when an identity
encoder is loaded, the identity tokens.

``generate`` produces one streaming window (spec section 8): a diffusion window
of ``config.window_frames`` (4k+1) frames whose first ``config.motion_frames`` are
the previous window's last decoded frames, re-encoded by the VAE into the first
latent frames and held clean at every denoising step; the remaining
``config.new_frames`` are new. The new latent frames are decoded as one stream
with the VAE decoder's causal cache carried from window to window in the state,
so no frame is decoded twice and consecutive windows join as one decode would.
Sampling is flow matching with 3/2/1-pass CFG (spec section 5), seeded by
``config.seed`` and the window's first frame.
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.base import (
    AUDIO_SAMPLE_RATE,
    AudioWindow,
    Generator,
    MotionSettings,
    PreparedPortrait,
    check_prepared_by,
    frame_start_sample,
)
from model.errors import WeightsError
from model.fantasytalking.conditioning import (
    NEGATIVE_PROMPT,
    PromptEmbeddings,
    UMT5PromptEncoder,
    clip_tokens,
    condition_latent,
    image_to_tensor,
    prompt_table,
    resize_reference,
)
from model.fantasytalking.config import FantasyTalkingConfig
from model.fantasytalking.sampler import cfg_combine, flow_sigmas, sample
from model.fantasytalking.speed import apply_speed_levers, reset_step_cache, torch_dtype
from model.fantasytalking.vae_stream import DecoderCache, StreamingVaeDecoder, frames_to_uint8

logger = logging.getLogger(__name__)

#: wav2vec2-base: one feature per 320 samples, each seeing 400 samples.
FEATURE_STRIDE, FEATURE_FIELD = 320, 400
#: wav2vec2 features are computed with this much audio before the diffusion window
#: (25 features = 0.5 s): its self-attention sees the whole input and its positional
#: convolution +-64 features, so features near a cut differ from those the model saw
#: in training (whole clips); past audio is already known, so this costs no latency.
CONTEXT_FEATURES = 25
#: Frames of audio after the window the generator asks for (lookahead_frames): the
#: same reasoning for the window's last frames; each frame of it adds 1/fps s of latency,
#: so 6 frames (0.26 s at 23 fps) against the 1.2 s a 28-frame window already costs.
LOOKAHEAD_FRAMES = 6
#: Format of the version string (cache key of prepared portraits, with the name).
VERSION_FORMAT = "1-{tag}-{frames}f-{side}px{identity}"
#: Settings the CLI and the server use with real weights: the defaults in bfloat16
#: (the 14B DiT alone is 57 GB in float32).
WEIGHTS_CONFIG = FantasyTalkingConfig(dtype="bfloat16")
#: Settings of the tiny smoke-test generator: 2 steps at 128 px, fast on a CPU.
TINY_CONFIG = FantasyTalkingConfig(steps=2, max_side=128)


@dataclass(eq=False)
class FantasyTalkingModels:
    """The loaded networks, shared by every generator (session) of a process.

    ``transformer``: ``FantasyTalkingTransformer``; ``vae``: ``StreamingVaeDecoder``
    around the Wan VAE; ``image_encoder``: ``CLIPVisionModel``; ``wav2vec``:
    ``Wav2Vec2Features``; ``prompts``: text -> UMT5 embedding [n, text_dim] of the
    config's prompt and the negative prompt (computed at load: the text encoder is
    not kept); ``identity_encoder``: ArcFace ``IdentityEncoder`` or None; ``tag``
    names the weights in the version string.
    ``dtype``: compute dtype of the DiT and CLIP (config.dtype). ``lock`` serialises
    GPU work: sessions in different threads share the models and the
    FirstBlockCache state.
    """

    transformer: torch.nn.Module
    vae: StreamingVaeDecoder
    image_encoder: torch.nn.Module
    wav2vec: Callable[[np.ndarray], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    tag: str
    prompts: dict[str, torch.Tensor]
    identity_encoder: Callable[[np.ndarray], np.ndarray] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class FantasyTalkingState:
    """What one session carries from window to window; never modified once made.

    ``next_frame``: first frame the next window continues from. ``motion_pixels``:
    the last ``motion_frames`` frames handed out, decoded values [1, 3, M, H, W]
    float32 in [-1, 1] (re-encoded as the next window's clean first latent frames).
    ``decoder``: the VAE decoder's causal cache right after those frames, or None
    when the frames handed out stopped inside a latent frame (the next window then
    restarts the decoder stream on its motion latents).
    """

    next_frame: int
    motion_pixels: torch.Tensor
    decoder: DecoderCache | None


@dataclass
class _Assets:
    """A prepared portrait's arrays as tensors on the compute device."""

    image: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    clip_tokens: torch.Tensor  # [1, 257, image_dim]
    condition: torch.Tensor  # [1, 20, T_lat, h, w]
    identity_tokens: torch.Tensor | None  # [1, N_id, C] or None


class FantasyTalkingGenerator(Generator):
    """FantasyTalking on Wan2.1-I2V-14B as a streaming ``Generator`` (issue 4 section 3).

    ``models``: loaded networks (``from_weights`` / ``tiny`` build them; share one
    ``FantasyTalkingModels`` between generators); ``config``: ``FantasyTalkingConfig``.
    ``fps`` is ``config.fps`` (23 for the released weights), ``window_frames`` the new
    frames per window (``config.new_frames``), ``context_frames`` the motion frames'
    audio plus 0.5 s before them, ``lookahead_frames`` 6 (see LOOKAHEAD_FRAMES).
    """

    name = "fantasytalking"

    def __init__(self, models: FantasyTalkingModels, config: FantasyTalkingConfig = FantasyTalkingConfig()) -> None:
        self.models = models
        self.config = config
        self.fps = float(config.fps)
        self.window_frames = config.new_frames
        self.lookahead_frames = LOOKAHEAD_FRAMES
        context_seconds = CONTEXT_FEATURES * FEATURE_STRIDE / AUDIO_SAMPLE_RATE
        self.context_frames = config.motion_frames + math.ceil(context_seconds * config.fps)
        self.version = VERSION_FORMAT.format(
            tag=models.tag, frames=config.window_frames, side=config.max_side,
            identity="-id" if models.identity_encoder is not None else "",
        )
        self.prompts = PromptEmbeddings(None, models.prompts, device=models.device, dtype=models.dtype)
        self.sigmas = flow_sigmas(config.steps, config.shift)
        self._assets: dict[int, tuple[weakref.ref, _Assets]] = {}

    # -- constructors -----------------------------------------------------------------

    @classmethod
    def from_weights(
        cls, weights_dir: str | Path, config: FantasyTalkingConfig = FantasyTalkingConfig(),
        device: str | torch.device | None = None,
    ) -> FantasyTalkingGenerator:
        """Load the weights directory (layout: ``checkpoint.load_fantasytalking``) on
        ``device`` (default: CUDA when available, else CPU) and build a generator.
        Raises WeightsError naming a missing or mismatching file."""
        return cls(load_models(weights_dir, config, device), config)

    @classmethod
    def tiny(cls, seed: int = 0, config: FantasyTalkingConfig | None = None) -> FantasyTalkingGenerator:
        """A generator on tiny random networks (CPU, for tests and smoke runs): tiny DiT,
        VAE, CLIP and wav2vec2 built from configs with ``seed``, random prompt
        embeddings. Default config: TINY_CONFIG."""
        config = config or TINY_CONFIG
        return cls(tiny_models(seed, config), config)

    # -- prepare ------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> PreparedPortrait:
        """Cacheable assets of a portrait, RGB uint8 (H, W, 3) in:

        ``image`` uint8 (H', W', 3), the reference resized (longest edge max_side, sides
        rounded up to 16); ``clip_tokens`` float32 (257, image_dim); ``condition``
        float32 (20, T_lat, H'/8, W'/8): mask 4 + latent 16 (spec section 1);
        ``identity_tokens`` float32 (N_id, C) when an identity encoder is loaded.
        meta: generator, version, height, width, window_frames, latent_frames.
        Raises PortraitError for a non-RGB-uint8 image, NoFaceError (identity
        encoder on and no face found).
        """
        config, models = self.config, self.models
        resized = resize_reference(image, config.max_side)
        with models.lock, torch.inference_mode():
            pixels = image_to_tensor(resized).to(models.device)
            tokens = clip_tokens(models.image_encoder, pixels)
            condition = condition_latent(models.vae, pixels, config.window_frames)
            arrays = {
                "image": resized,
                "clip_tokens": tokens[0].float().cpu().numpy(),
                "condition": condition[0].float().cpu().numpy(),
            }
            if models.identity_encoder is not None:
                embedding = torch.from_numpy(models.identity_encoder(image))[None]
                identity = models.transformer.identity_qformer(embedding.to(models.device, models.dtype))
                arrays["identity_tokens"] = identity[0].float().cpu().numpy()
        meta = {
            "generator": self.name, "version": self.version, "height": int(resized.shape[0]),
            "width": int(resized.shape[1]), "window_frames": config.window_frames,
            "latent_frames": config.latent_frames,
        }
        return PreparedPortrait(arrays=arrays, meta=meta)

    def _assets_of(self, prepared: PreparedPortrait) -> _Assets:
        # Moving the assets to the GPU once per live prepared portrait, not once per window.
        key = id(prepared)
        entry = self._assets.get(key)
        if entry is not None and entry[0]() is prepared:
            return entry[1]
        check_prepared_by(prepared, self)
        device, dtype = self.models.device, self.models.dtype
        arrays = prepared.arrays
        identity = arrays.get("identity_tokens")
        assets = _Assets(
            image=image_to_tensor(arrays["image"]).to(device),
            clip_tokens=torch.from_numpy(arrays["clip_tokens"])[None].to(device, dtype),
            condition=torch.from_numpy(arrays["condition"])[None].to(device),
            identity_tokens=None if identity is None else torch.from_numpy(identity)[None].to(device, dtype),
        )
        self._assets = {k: v for k, v in self._assets.items() if v[0]() is not None}
        self._assets[key] = (weakref.ref(prepared), assets)
        return assets

    def close(self) -> None:
        """Drop this session's portrait tensors on the device; the shared networks stay."""
        self._assets.clear()

    # -- generate -----------------------------------------------------------------------

    def generate(
        self,
        prepared: PreparedPortrait,
        window: AudioWindow,
        motion: MotionSettings,
        state: FantasyTalkingState | None,
    ) -> tuple[np.ndarray, FantasyTalkingState | None]:
        """Frames of one window: RGB uint8 (window.num_frames, H', W', 3), and the new state.

        ``window.num_frames`` must be at most ``window_frames`` (the engine asks for
        fewer at a clip's end). The first window (state None) uses the reference
        image repeated as its motion frames (the avatar starts from the portrait).
        The given state is not modified. Raises ValueError for a portrait prepared by
        another generator or version, or too many frames.
        """
        count = window.num_frames
        if count > self.window_frames:
            raise ValueError(f"a window has at most {self.window_frames} new frames, {count} were asked for")
        assets = self._assets_of(prepared)
        if count == 0:
            return np.zeros((0, *prepared.arrays["image"].shape), np.uint8), state
        if state is not None and state.next_frame != window.first_frame:
            logger.debug("window starts at frame %d, state continues frame %d", window.first_frame, state.next_frame)
        with self.models.lock, torch.inference_mode():
            return self._generate(assets, window, motion, state)

    def _generate(
        self, assets: _Assets, window: AudioWindow, motion: MotionSettings, state: FantasyTalkingState | None
    ) -> tuple[np.ndarray, FantasyTalkingState]:
        config, models = self.config, self.models
        vae = models.vae
        count = window.num_frames
        if state is None:
            motion_pixels = assets.image.unsqueeze(2).repeat(1, 1, config.motion_frames, 1, 1)
        else:
            motion_pixels = state.motion_pixels
        clean = vae.encode(motion_pixels)  # [1, 16, m, h, w]: the held-clean first latent frames
        audio_tokens, k_lens = self._audio_tokens(window)
        noise = self._noise(window.first_frame, assets.condition.shape)
        denoise = self._denoiser(assets, audio_tokens, k_lens, motion)
        reset_step_cache(models.transformer)
        latents = sample(denoise, noise, self.sigmas, clean_latents=clean)

        held = config.motion_latent_frames
        if state is not None and state.decoder is not None:
            cache = state.decoder
        else:
            # A new decoder stream: run the motion latents through it first (their frames are
            # already on screen, so they are not returned) to give the new frames their context.
            _, cache = vae.decode(latents[:, :, :held], vae.start())
        needed = math.ceil(count / vae.temporal_factor)
        pixels, cache = vae.decode(latents[:, :, held : held + needed], cache)
        pixels = pixels[:, :, :count]
        frames = frames_to_uint8(pixels)[0].cpu().numpy()

        history = torch.cat([motion_pixels, pixels], dim=2)[:, :, -config.motion_frames :]
        aligned = count % vae.temporal_factor == 0  # the decoder cache ends exactly after the last frame
        new_state = FantasyTalkingState(
            next_frame=window.first_frame + count,
            motion_pixels=history.contiguous(),
            decoder=cache if aligned else None,
        )
        return frames, new_state

    def _noise(self, first_frame: int, condition_shape: torch.Size) -> torch.Tensor:
        """Initial noise [1, 16, T_lat, h, w] float32, drawn on the CPU from a generator
        seeded by (config.seed, first_frame): the same window gives the same noise on
        any device."""
        _, _, latent_frames, height, width = condition_shape
        seed = (self.config.seed * 1_000_003 + first_frame) % (1 << 63)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(1, 16, latent_frames, height, width, generator=generator, dtype=torch.float32)
        return noise.to(self.models.device)

    def _audio_tokens(self, window: AudioWindow) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio windows of the diffusion window: (tokens [1, T_lat, W, C], k_lens [1, T_lat]).

        The diffusion window starts ``motion_frames`` frames before ``window.first_frame``.
        Its audio follows spec section 3 as if the window were a clip of its own: the
        first ``int(F / fps * 16000)`` samples from its first frame, L = floor((n - 400)
        / 320) + 1 features; but wav2vec2 runs on that audio with CONTEXT_FEATURES *
        320 samples before it and the available lookahead after it, and the L features
        aligned with the window are kept (same 320-sample grid, so feature 0 sees the
        window's first 400 samples as in the reference). Audio before the session's
        start or not given is silence.
        """
        config = self.config
        frames, fps = config.window_frames, window.fps
        start = frame_start_sample(window.first_frame - config.motion_frames, fps)
        needed = int(frames / fps * AUDIO_SAMPLE_RATE)
        given_start = frame_start_sample(window.first_frame, fps) - window.context_before
        given_stop = given_start + window.audio.shape[0]
        lo = start - CONTEXT_FEATURES * FEATURE_STRIDE
        hi = max(start + needed, given_stop)
        buffer = np.zeros(hi - lo, np.float32)
        a, b = max(lo, given_start), min(hi, given_stop)
        if b > a:
            buffer[a - lo : b - lo] = window.audio[a - given_start : b - given_start]
        features = self.models.wav2vec(buffer)
        length = (needed - FEATURE_FIELD) // FEATURE_STRIDE + 1
        features = features[:, CONTEXT_FEATURES : CONTEXT_FEATURES + length]
        tokens, k_lens = self.models.transformer.project_audio(features, frames)
        return tokens, k_lens.reshape(1, -1)

    def _denoiser(
        self, assets: _Assets, audio_tokens: torch.Tensor, k_lens: torch.Tensor, motion: MotionSettings
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The sampler's ``denoise(latents, timestep) -> velocity`` with CFG (spec section 5).

        Passes: ``pos`` (prompt, audio_scale 1), ``noaudio`` (prompt, audio 0), ``uncond``
        (negative prompt, audio 0); 3 passes combine as ``cfg_combine``, 2 passes as
        ``noaudio + g_a (pos - noaudio)``, 1 pass is ``pos``. With ``batch_cfg`` the
        passes run as one batch; otherwise one call each, each in its own cache context.
        """
        config, models = self.config, self.models
        transformer, dtype = models.transformer, models.dtype
        passes = config.cfg_passes
        prompt = self.prompts.get(config.prompt)
        texts = ([prompt, prompt] + ([self.prompts.get(NEGATIVE_PROMPT)] if passes == 3 else []))[:passes]
        scales = torch.tensor([1.0, 0.0, 0.0][:passes], device=models.device, dtype=dtype)
        motion_tensor = torch.tensor([[motion.face, motion.body]], device=models.device, dtype=dtype)
        condition = assets.condition.to(dtype)
        audio_tokens = audio_tokens.to(dtype)
        k_lens = k_lens.to(models.device)

        def run(latents: torch.Tensor, timestep: torch.Tensor, index: slice) -> torch.Tensor:
            batch = index.stop - index.start
            model_input = torch.cat([latents.to(dtype), condition], dim=1).expand(batch, -1, -1, -1, -1)
            identity = assets.identity_tokens
            return transformer(
                model_input,
                timestep.to(models.device, torch.float32).reshape(1).expand(batch),
                torch.cat(texts[index], dim=0),
                assets.clip_tokens.expand(batch, -1, -1),
                audio_tokens.expand(batch, -1, -1, -1),
                k_lens.expand(batch, -1),
                scales[index],
                motion=motion_tensor.expand(batch, -1),
                identity_tokens=None if identity is None else identity.expand(batch, -1, -1),
            ).float()

        def denoise(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            if config.batch_cfg:
                with transformer.wan.cache_context("cfg"):
                    preds = run(latents, timestep, slice(0, passes)).chunk(passes)
            else:
                preds = []
                for i in range(passes):
                    with transformer.wan.cache_context(f"cfg{i}"):
                        preds.append(run(latents, timestep, slice(i, i + 1)))
            if passes == 3:
                return cfg_combine(preds[0], preds[1], preds[2], config.prompt_cfg, config.audio_cfg)
            if passes == 2:
                return cfg_combine(preds[0], preds[1], preds[1], 1.0, config.audio_cfg)
            return preds[0]

        return denoise


def load_models(
    weights_dir: str | Path, config: FantasyTalkingConfig, device: str | torch.device | None = None
) -> FantasyTalkingModels:
    """Load every network from a local weights directory (``checkpoint.load_fantasytalking``)
    and apply the config's speed levers; share the result between generators.

    The config's prompt and (for 3-pass CFG) the negative prompt are embedded here, from
    ``prompt_embeds.safetensors`` when it has them, else with the UMT5 text encoder,
    which is then released (11 GB that sampling never needs). Raises WeightsError
    naming a missing or mismatching file, or a prompt with no embedding.
    """
    from model.fantasytalking.checkpoint import PROMPT_EMBEDS, load_fantasytalking

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_fantasytalking(weights_dir, config, device, torch_dtype(config))
    precomputed = {}
    if loaded.prompt_embeds is not None:
        precomputed = prompt_table(loaded.prompt_embeds, loaded.prompt_embeds_meta, str(Path(weights_dir) / PROMPT_EMBEDS))
    encoder = None if loaded.text_encoder is None else UMT5PromptEncoder(loaded.text_encoder, loaded.tokenizer)
    table = PromptEmbeddings(encoder, precomputed)
    try:
        needed = (config.prompt, NEGATIVE_PROMPT) if config.cfg_passes == 3 else (config.prompt,)
        prompts = {text: table.get(text) for text in needed}
    except KeyError as exc:
        raise WeightsError(f"{exc.args[0]}; add it to {PROMPT_EMBEDS} or provide the text encoder") from None
    del encoder, table
    loaded.text_encoder = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    apply_speed_levers(loaded.transformer, config, device)
    return FantasyTalkingModels(
        transformer=loaded.transformer,
        vae=StreamingVaeDecoder(loaded.vae.to(device)),
        image_encoder=loaded.image_encoder.to(device),
        wav2vec=loaded.wav2vec,
        device=device,
        dtype=torch_dtype(config),
        tag="wan21",
        prompts=prompts,
        identity_encoder=loaded.identity_encoder,
    )


def tiny_models(seed: int, config: FantasyTalkingConfig) -> FantasyTalkingModels:
    """Tiny random networks on the CPU (``tiny``, ``transformer.tiny_transformer``) with
    the config's speed levers; prompt embeddings for ``config.prompt`` and the
    negative prompt are random stand-ins."""
    from model.fantasytalking.audio_features import Wav2Vec2Features
    from model.fantasytalking.tiny import tiny_clip_vision, tiny_prompt_embeddings, tiny_vae, tiny_wav2vec2
    from model.fantasytalking.transformer import tiny_transformer

    device = torch.device("cpu")
    transformer = tiny_transformer(seed, config=config)
    apply_speed_levers(transformer, config, device)
    wan_config = transformer.wan.config
    image_dim = wan_config.image_dim
    return FantasyTalkingModels(
        transformer=transformer,
        vae=StreamingVaeDecoder(tiny_vae(seed)),
        image_encoder=tiny_clip_vision(image_dim, seed).to(dtype=torch_dtype(config)),
        wav2vec=Wav2Vec2Features(tiny_wav2vec2(transformer.audio_proj.proj.in_features, seed)),
        device=device,
        dtype=torch_dtype(config),
        tag=f"tiny{seed}",
        prompts=tiny_prompt_embeddings([config.prompt, NEGATIVE_PROMPT], wan_config.text_dim, seed),
    )
