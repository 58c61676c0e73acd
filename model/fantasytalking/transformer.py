"""The FantasyTalking DiT: diffusers' ``WanTransformer3DModel`` (Wan2.1-I2V) with the audio
adapter (spec sections 2, 4), the identity branch and the motion-intensity embedding (spec
section 6) installed.

Every block's ``attn2`` gets an ``AudioCrossAttnProcessor``; the motion embedding is added
to the output of the timestep embedder (``condition_embedder.time_embedder``, whose output
feeds both the blocks' modulation and the output head) by a forward hook. diffusers' Wan
forward cannot carry extra inputs to the blocks, so ``forward`` hands the audio windows,
identity tokens and motion embedding to the processors and the hook for the duration of
one call. All diffusers speed features of ``wan`` (attention backends, FirstBlockCache,
group offload, regional compile, context parallelism) stay usable.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from model.fantasytalking.attention import TEXT_TOKENS, AudioCrossAttnProcessor, BranchInputs, FrameAudio
from model.fantasytalking.audio_adapter import AudioProjModel
from model.fantasytalking.audio_features import split_audio_windows
from model.fantasytalking.config import FantasyTalkingConfig
from model.fantasytalking.identity import IdentityQFormer
from model.fantasytalking.motion import NEUTRAL_MOTION, MotionIntensityEmbedding

logger = logging.getLogger(__name__)

#: Tiny Wan2.1-I2V configuration for tests (same structure as the 14B model: 36 input
#: channels, patch (1, 2, 2), image key/value projections; everything else small).
TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16,
    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=12, added_kv_proj_dim=16, rope_max_seq_len=32,
)


class FantasyTalkingTransformer(nn.Module):
    """The DiT with FantasyTalking's modules.

    ``wan``: a Wan2.1-I2V ``WanTransformer3DModel`` (its attn2 processors are replaced);
    ``audio_proj``: the released projection; ``config``: gives l1 (``audio_weight``) and
    l2 (``identity_weight``); ``identity_qformer`` / ``motion_embedding``: optional
    paper modules (None = not built; the released weights have neither).
    Parameter names: ``wan.blocks.N.attn2.processor.{k_proj,v_proj}.weight`` hold the
    released ``blocks.N.cross_attn.processor.{k_proj,v_proj}.weight``; ``audio_proj.*``
    the released ``proj_model``.
    """

    def __init__(
        self,
        wan: nn.Module,
        audio_proj: AudioProjModel,
        config: FantasyTalkingConfig | None = None,
        identity_qformer: IdentityQFormer | None = None,
        motion_embedding: MotionIntensityEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.config = config or FantasyTalkingConfig()
        self.wan = wan
        self.audio_proj = audio_proj
        self.identity_qformer = identity_qformer
        self.motion_embedding = motion_embedding
        self._inputs = BranchInputs(identity_weight=self.config.identity_weight)
        self._motion: Tensor | None = None
        dim = wan.config.num_attention_heads * wan.config.attention_head_dim
        identity_dim = identity_qformer.out_dim if identity_qformer is not None else None
        for block in wan.blocks:
            block.attn2.set_processor(AudioCrossAttnProcessor(self._inputs, dim, audio_proj.out_dim, identity_dim))
        if motion_embedding is not None:
            wan.condition_embedder.time_embedder.register_forward_hook(self._add_motion)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks (40 for Wan2.1-14B)."""
        return len(self.wan.blocks)

    def added_modules(self) -> list[nn.Module]:
        """The modules FantasyTalking adds to the Wan DiT: the audio projection, every block's
        attn2 processor, and the identity Q-Former and motion embedding when built."""
        extra = [m for m in (self.identity_qformer, self.motion_embedding) if m is not None]
        return [self.audio_proj, *(block.attn2.processor for block in self.wan.blocks), *extra]

    def _add_motion(self, module: nn.Module, args: tuple, temb: Tensor) -> Tensor | None:
        # Paper Sec. 3.4: the motion embedding is added to the timestep embedding.
        return None if self._motion is None else temb + self._motion.to(temb.dtype)

    def project_audio(self, features: Tensor, num_frames: int) -> tuple[Tensor, Tensor]:
        """wav2vec2 features [1, L, 768] of ``num_frames`` pixel frames (4k+1) ->
        (audio tokens [1, T_lat, W, 2048], k_lens [1, T_lat] int64): the projection, then
        the per-latent-frame windows (spec section 3 steps 4-5). Raises ValueError on bad shapes.
        """
        tokens, k_lens = split_audio_windows(self.audio_proj(features), num_frames)
        return tokens, k_lens[None].to(tokens.device)

    def forward(
        self,
        latent_input: Tensor,
        timestep: Tensor,
        text_embeds: Tensor,
        image_embeds: Tensor,
        audio_tokens: Tensor,
        audio_k_lens: Tensor,
        audio_scale: Tensor,
        motion: Tensor | None = None,
        identity_tokens: Tensor | None = None,
    ) -> Tensor:
        """Velocity prediction [B, 16, T_lat, h, w] (flow matching, spec section 5).

        ``latent_input`` [B, 36, T_lat, h, w]: [noisy latent 16 | mask 4 | condition latent 16];
        ``timestep`` [B] float, 1000 * sigma; ``text_embeds`` [B, 512, text_dim];
        ``image_embeds`` [B, 257, image_dim] (CLIP penultimate hidden state);
        ``audio_tokens`` [B, T_lat, W, audio_dim] (projected windows), ``audio_k_lens``
        [B, T_lat] int valid tokens per window; ``audio_scale`` [B] (1 conditional pass,
        0 audio-free passes); ``motion`` [B, 2] (face, body) in [0, 1], None = neutral
        (0.5, 0.5), ignored when no motion module is loaded; ``identity_tokens``
        [B, N_id, C] or None (identity branch off).
        Raises ValueError for shapes that do not fit together or identity tokens without
        an identity module.
        """
        batch = self._check_inputs(latent_input, timestep, text_embeds, image_embeds, audio_tokens, audio_k_lens,
                                   audio_scale, identity_tokens)
        _, p_h, p_w = self.wan.config.patch_size
        tokens_per_frame = (latent_input.shape[3] // p_h) * (latent_input.shape[4] // p_w)
        scale = self.config.audio_weight * audio_scale.float()
        self._inputs.audio = FrameAudio(audio_tokens, audio_k_lens, scale, tokens_per_frame)
        self._inputs.identity = identity_tokens
        if self.motion_embedding is not None:
            if motion is None:
                motion = torch.tensor([NEUTRAL_MOTION] * batch, device=latent_input.device)
            self._motion = self.motion_embedding(motion.to(latent_input.device))
        try:
            return self.wan(
                hidden_states=latent_input, timestep=timestep, encoder_hidden_states=text_embeds,
                encoder_hidden_states_image=image_embeds, return_dict=False,
            )[0]
        finally:
            self._inputs.clear()
            self._motion = None

    def _check_inputs(self, latent_input, timestep, text_embeds, image_embeds, audio_tokens, audio_k_lens,
                      audio_scale, identity_tokens) -> int:
        config = self.wan.config
        if latent_input.ndim != 5 or latent_input.shape[1] != config.in_channels:
            raise ValueError(
                f"latent_input must have shape [B, {config.in_channels}, T_lat, h, w], got {tuple(latent_input.shape)}"
            )
        batch, frames = latent_input.shape[0], latent_input.shape[2] // config.patch_size[0]
        expected = {
            "timestep": (timestep, (batch,)),
            "text_embeds": (text_embeds, (batch, TEXT_TOKENS, config.text_dim)),
            "audio_k_lens": (audio_k_lens, (batch, frames)),
            "audio_scale": (audio_scale, (batch,)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if image_embeds.ndim != 3 or image_embeds.shape[0] != batch or image_embeds.shape[2] != config.image_dim:
            raise ValueError(
                f"image_embeds must have shape [{batch}, 257, {config.image_dim}], got {list(image_embeds.shape)}"
            )
        audio_dim = self.audio_proj.out_dim
        shape = tuple(audio_tokens.shape)
        if audio_tokens.ndim != 4 or shape[:2] != (batch, frames) or shape[3] != audio_dim:
            raise ValueError(
                f"audio_tokens must have shape [{batch}, {frames}, W, {audio_dim}] (one window per latent frame), "
                f"got {list(audio_tokens.shape)}"
            )
        if identity_tokens is not None:
            if self.identity_qformer is None:
                raise ValueError("identity_tokens were given but no identity module is loaded; pass None")
            if identity_tokens.ndim != 3 or identity_tokens.shape[0] != batch:
                raise ValueError(
                    f"identity_tokens must have shape [{batch}, N_id, C], got {list(identity_tokens.shape)}"
                )
        return batch


def tiny_transformer(seed: int = 0, **overrides) -> FantasyTalkingTransformer:
    """A tiny random FantasyTalkingTransformer on CPU in float32, for tests and the CPU bench.

    ``overrides``: any ``WanTransformer3DModel`` config field (defaults ``TINY_WAN_CONFIG``:
    2 blocks, 2 heads x 8, text_dim 16, image_dim 12, added_kv_proj_dim 16), and
    ``audio_in_dim`` (wav2vec2 feature size, 32), ``audio_dim`` (audio token size, 16),
    ``identity`` / ``motion`` (build the zero-initialised paper modules, True),
    ``config`` (a FantasyTalkingConfig). Same seed -> same weights.
    """
    from diffusers import WanTransformer3DModel

    audio_in_dim = overrides.pop("audio_in_dim", 32)
    audio_dim = overrides.pop("audio_dim", 16)
    with_identity = overrides.pop("identity", True)
    with_motion = overrides.pop("motion", True)
    config = overrides.pop("config", None)
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**{**TINY_WAN_CONFIG, **overrides}).eval()
    dim = wan.config.num_attention_heads * wan.config.attention_head_dim
    audio_proj = AudioProjModel(audio_in_dim, audio_dim)
    identity = None
    if with_identity:
        identity = IdentityQFormer(out_dim=16, dim=16, num_tokens=4, depth=1, heads=2, context_tokens=2)
    motion = MotionIntensityEmbedding(dim, hidden_dim=8, num_tokens=4) if with_motion else None
    return FantasyTalkingTransformer(wan, audio_proj, config, identity, motion).eval()
