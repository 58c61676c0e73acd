"""The released audio projection: wav2vec2 features -> audio tokens (spec section 2, ``proj_model``)."""
from __future__ import annotations

from torch import Tensor, nn

#: Feature size of wav2vec2-base-960h.
WAV2VEC_DIM = 768
#: Audio token size of the released adapter.
AUDIO_DIM = 2048


class AudioProjModel(nn.Module):
    """Linear ``in_dim -> out_dim`` without bias, then LayerNorm(out_dim, eps 1e-5).

    Parameter names match the released ``proj_model`` state dict exactly:
    ``proj.weight`` [out_dim, in_dim], ``norm.weight`` and ``norm.bias`` [out_dim].
    The released sizes are 768 -> 2048; tests use smaller ones.
    """

    def __init__(self, in_dim: int = WAV2VEC_DIM, out_dim: int = AUDIO_DIM, eps: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, features: Tensor) -> Tensor:
        """``features`` [B, L, in_dim] (wav2vec2 last hidden state) -> audio tokens [B, L, out_dim].

        Raises ValueError when the last dimension is not ``in_dim``.
        """
        if features.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"audio features must have {self.proj.in_features} channels in the last dimension, "
                f"got shape {tuple(features.shape)}"
            )
        return self.norm(self.proj(features.to(self.proj.weight.dtype)))

    @property
    def out_dim(self) -> int:
        """Size of one audio token."""
        return self.proj.out_features


