"""The cross-attention (``attn2``) processor of every Wan block, with FantasyTalking's
audio branch (spec section 4) and the paper's identity branch (paper Sec. 3.3, spec section 6).

For a block's video tokens x (query ``q = norm_q(to_q(x))``, shared by all branches):

    out = to_out(text + image + l1 * audio_scale * audio + l2 * identity)

* text, image: exactly what diffusers' stock ``WanAttnProcessor`` computes (image tokens
  first in the context, then exactly 512 text tokens; image keys through ``norm_added_k``);
  with audio_scale = 0 and no identity tokens the output is bit-identical to it.
* audio: per latent frame f, the h*w query tokens of f attend to the W tokens of audio
  window f (``k_proj``/``v_proj``, no bias, no key norm, no RoPE). Padded window tokens
  (past ``k_len``) are never given to the attention kernel: the frames are grouped by
  ``k_len`` and each group attends to its first ``k_len`` keys only, so padding takes no
  softmax mass on any backend (native SDPA, flash, sage) and needs no mask.
* identity: all query tokens attend to the identity tokens (``identity_k_proj``/``_v_proj``).

The per-call inputs (audio windows, k_lens, scales, identity tokens) cannot travel through
diffusers' ``WanTransformer3DModel.forward``; ``FantasyTalkingTransformer`` puts them in a
``BranchInputs`` shared by all processors for the duration of one forward call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: diffusers' Wan cross-attention takes the last 512 context tokens as text (spec section 1).
TEXT_TOKENS = 512


class FrameAudio:
    """Audio inputs of one forward call, shared by the processors of all blocks.

    ``tokens`` [B, T_lat, W, C] projected audio windows; ``k_lens`` [B, T_lat] int valid
    tokens of each window (padding at the end, 0..W); ``scale`` [B] float, the audio
    branch's weight per batch item (l1 * audio_scale); ``tokens_per_frame`` h*w, the
    video tokens of one latent frame after patching. Raises ValueError on shape mismatch.
    """

    def __init__(self, tokens: Tensor, k_lens: Tensor, scale: Tensor, tokens_per_frame: int) -> None:
        if tokens.ndim != 4:
            raise ValueError(f"audio tokens must have shape [B, T_lat, W, C], got {tuple(tokens.shape)}")
        if tuple(k_lens.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"audio k_lens must have shape {tuple(tokens.shape[:2])}, got {tuple(k_lens.shape)}")
        if tuple(scale.shape) != (tokens.shape[0],):
            raise ValueError(f"audio_scale must have shape ({tokens.shape[0]},), got {tuple(scale.shape)}")
        # One host copy per forward call (not per block): the grouping by k_len is host-side.
        self._k_lens: list[list[int]] = k_lens.tolist()
        if any(not 0 <= n <= tokens.shape[2] for row in self._k_lens for n in row):
            raise ValueError(f"audio k_lens must be in [0, {tokens.shape[2]}], got {self._k_lens}")
        self.tokens = tokens
        self.scale = scale
        self.tokens_per_frame = tokens_per_frame
        self.active = bool(scale.any())
        self._groups: dict[tuple[int, int], list[tuple[int, Tensor | None]]] = {}

    @property
    def num_frames(self) -> int:
        """Latent frames T_lat."""
        return self.tokens.shape[1]

    def groups(self, first: int, stop: int) -> list[tuple[int, Tensor | None]]:
        """Frames ``first..stop-1`` of every batch item, numbered ``b * (stop - first) + t - first``,
        grouped by k_len: a list of (k_len, index tensor on the tokens' device, or None when
        the group holds every frame). Frames with k_len 0 are left out (their audio output is 0).
        """
        key = (first, stop)
        if key not in self._groups:
            by_len: dict[int, list[int]] = {}
            count = stop - first
            for b, row in enumerate(self._k_lens):
                for t in range(first, stop):
                    by_len.setdefault(row[t], []).append(b * count + t - first)
            total = count * len(self._k_lens)
            self._groups[key] = [
                (k_len, None if len(index) == total else torch.tensor(index, device=self.tokens.device))
                for k_len, index in sorted(by_len.items())
                if k_len > 0
            ]
        return self._groups[key]


@dataclass
class BranchInputs:
    """What one forward call hands to every block's processor (None = branch off).

    ``audio``: the audio windows; ``identity``: identity tokens [B, N_id, C_id];
    ``identity_weight``: l2 (paper Sec. 3.3, 0.5).
    """

    audio: FrameAudio | None = None
    identity: Tensor | None = None
    identity_weight: float = 0.5

    def clear(self) -> None:
        """Drop the call's tensors (called when the forward call ends)."""
        self.audio = None
        self.identity = None


class AudioCrossAttnProcessor(nn.Module):
    """Processor for a Wan block's ``attn2`` (see the module docstring for the formula).

    ``inputs``: the shared per-call inputs; ``dim``: the block's hidden size (heads *
    head_dim); ``audio_dim``: audio token size (2048 released); ``identity_dim``: identity
    token size, or None for no identity branch. Parameters: ``k_proj``, ``v_proj``
    [dim, audio_dim] (the released ``blocks.N.cross_attn.processor.{k,v}_proj.weight``),
    ``identity_k_proj``, ``identity_v_proj`` [dim, identity_dim] when built.
    Works with diffusers' ``set_attention_backend`` and, for the audio branch, with
    context parallelism (the local query tokens are placed by their rank's offset).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, inputs: BranchInputs, dim: int, audio_dim: int, identity_dim: int | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.k_proj = nn.Linear(audio_dim, dim, bias=False)
        self.v_proj = nn.Linear(audio_dim, dim, bias=False)
        self.identity_k_proj = self.identity_v_proj = None
        if identity_dim is not None:
            self.identity_k_proj = nn.Linear(identity_dim, dim, bias=False)
            self.identity_v_proj = nn.Linear(identity_dim, dim, bias=False)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``hidden_states`` [B, S, dim] video tokens (S = T_lat*h*w, or this rank's share);
        ``encoder_hidden_states`` [B, N_img + 512, dim] (image tokens, then 512 text tokens;
        no image tokens when the block has no ``add_k_proj``). Returns [B, S, dim].
        Raises ValueError when used for self-attention or given rotary embeddings.
        """
        if encoder_hidden_states is None or rotary_emb is not None:
            raise ValueError("AudioCrossAttnProcessor serves the cross-attention attn2 only (a context, no RoPE)")
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - TEXT_TOKENS
            image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]

        heads = attn.heads
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        if attn.fused_projections:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key = attn.norm_k(key)
        out = self._attend(query, key.unflatten(2, (heads, -1)), value.unflatten(2, (heads, -1)), attention_mask)

        if image_context is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            key_img = attn.norm_added_k(key_img)
            out = out + self._attend(query, key_img.unflatten(2, (heads, -1)), value_img.unflatten(2, (heads, -1)))

        audio = self.inputs.audio
        if audio is not None and audio.active:
            offset = self._token_offset(query.shape[1], audio)
            audio_out = self.frame_attention(query, audio, offset)
            out = out + audio.scale.to(out.dtype)[:, None, None] * audio_out

        identity = self.inputs.identity
        if identity is not None:
            if self.identity_k_proj is None:
                raise ValueError("identity tokens were given but this model has no identity branch")
            identity = identity.to(self.identity_k_proj.weight.dtype)
            key_id = self.identity_k_proj(identity).unflatten(2, (heads, -1))
            value_id = self.identity_v_proj(identity).unflatten(2, (heads, -1))
            out = out + self.inputs.identity_weight * self._attend(query, key_id, value_id)

        return attn.to_out[1](attn.to_out[0](out))

    def frame_attention(self, query: Tensor, audio: FrameAudio, offset: int = 0) -> Tensor:
        """Per-latent-frame audio attention (spec section 4), before scaling.

        ``query`` [B, S, heads, head_dim]: video tokens ``offset .. offset+S-1`` of the
        (F, H, W)-flattened latent (offset > 0 for a context-parallel shard; shards need
        not fall on frame boundaries). Token i belongs to latent frame
        ``i // tokens_per_frame`` and attends to that frame's first k_len window tokens.
        Returns [B, S, heads*head_dim] in the query's dtype (zeros for k_len 0).
        """
        batch, length, heads, _ = query.shape
        per_frame = audio.tokens_per_frame
        first, stop = offset // per_frame, -(-(offset + length) // per_frame)
        if stop > audio.num_frames:
            raise ValueError(
                f"video tokens {offset}..{offset + length - 1} reach past the {audio.num_frames} latent frames "
                f"of {per_frame} tokens the audio windows cover"
            )
        lead = offset - first * per_frame
        trail = stop * per_frame - offset - length
        # Pad the query to whole frames so every frame is one attention problem.
        if lead or trail:
            query = F.pad(query, (0, 0, 0, 0, lead, trail))
        frames = query.reshape(batch * (stop - first), per_frame, heads, -1)
        windows = audio.tokens[:, first:stop].to(self.k_proj.weight.dtype)
        keys = self.k_proj(windows).flatten(0, 1).unflatten(2, (heads, -1))
        values = self.v_proj(windows).flatten(0, 1).unflatten(2, (heads, -1))
        out = frames.new_zeros(frames.shape[0], per_frame, frames.shape[2] * frames.shape[3])
        for k_len, index in audio.groups(first, stop):
            if index is None:
                out = self._attend(frames, keys[:, :k_len], values[:, :k_len])
            else:
                part = self._attend(frames[index], keys[index, :k_len], values[index, :k_len])
                out = out.index_copy(0, index, part)
        return out.reshape(batch, -1, out.shape[-1])[:, lead : lead + length]

    def _token_offset(self, length: int, audio: FrameAudio) -> int:
        """Offset of this rank's video tokens: 0 unless context parallelism shards them
        (diffusers splits the sequence into world-size parts as ``tensor_split`` does)."""
        total = audio.num_frames * audio.tokens_per_frame
        if length == total:
            return 0
        config = getattr(self._parallel_config, "context_parallel_config", None)
        if config is None:
            raise ValueError(
                f"attn2 got {length} video tokens but the audio covers {audio.num_frames} latent frames "
                f"x {audio.tokens_per_frame} tokens = {total}"
            )
        mesh = config._flattened_mesh
        world, rank = mesh.size(), torch.distributed.get_rank(mesh.get_group())
        sizes = [total // world + (1 if r < total % world else 0) for r in range(world)]
        if sizes[rank] != length:
            raise ValueError(f"context-parallel rank {rank} got {length} video tokens, expected {sizes[rank]}")
        return sum(sizes[:rank])

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention on the configured diffusers backend: [N, Lq, H, D] x [N, Lk, H, D] -> [N, Lq, H*D]."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=None,
        )
        return out.flatten(2, 3).type_as(query)

