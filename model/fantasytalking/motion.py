"""Motion-intensity embedding (paper Sec. 3.4, spec section 6; not in the released weights).

The face coefficient w_l and the body coefficient w_b, each in [0, 1] (0.5 neutral), go
through MLP layers, a ResNet layer and average pooling; the result is added to the
timestep embedding of the DiT. The paper gives the layer types, not their sizes: the
MLP lifts (w_l, w_b) to a short sequence of feature vectors, the ResNet layer is a 1-D
residual convolution block over that sequence, and average pooling over the sequence
gives one vector, projected to the timestep embedding's size. The projection is
zero-initialised, so an untrained module adds exactly 0 (spec section 6).
"""
from __future__ import annotations

from torch import Tensor, nn

#: (face, body) of neutral motion.
NEUTRAL_MOTION = (0.5, 0.5)


class MotionResBlock(nn.Module):
    """Pre-norm residual block of two 1-D convolutions (kernel 3) over the token axis:
    [B, C, N] -> [B, C, N]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class MotionIntensityEmbedding(nn.Module):
    """(w_l, w_b) [B, 2] in [0, 1] -> embedding [B, embed_dim] for the timestep embedding.

    ``embed_dim``: the DiT's hidden size (5120 for Wan2.1-14B); ``hidden_dim`` and
    ``num_tokens``: width and length of the intermediate sequence. Parameters:
    ``mlp`` (Linear 2 -> hidden, SiLU, Linear hidden -> num_tokens*hidden), ``res``
    (``MotionResBlock``), ``proj`` (Linear hidden -> embed_dim, zero-initialised).
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 256, num_tokens: int = 8) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(2, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_tokens * hidden_dim)
        )
        self.res = MotionResBlock(hidden_dim)
        self.proj = nn.Linear(hidden_dim, embed_dim)
        # Zero output: with no trained weights the DiT's behaviour is unchanged (spec section 6).
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, motion: Tensor) -> Tensor:
        """``motion`` [B, 2] (face, body) in [0, 1] -> [B, embed_dim] in the module's dtype.

        Raises ValueError for another shape or values outside [0, 1].
        """
        if motion.ndim != 2 or motion.shape[1] != 2:
            raise ValueError(f"motion must have shape [B, 2] (face, body), got {tuple(motion.shape)}")
        if not bool(((motion >= 0) & (motion <= 1)).all()):
            raise ValueError(f"motion coefficients must be in [0, 1], got {motion.tolist()}")
        tokens = self.mlp(motion.to(self.proj.weight.dtype)).unflatten(1, (self.num_tokens, -1))
        pooled = self.res(tokens.transpose(1, 2)).mean(dim=2)
        return self.proj(pooled)
