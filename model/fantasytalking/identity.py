"""Identity module (paper Sec. 3.3, spec section 6; not in the released weights).

``IdentityEncoder``: insightface finds the face in the reference image, aligns and crops
it by its five landmarks and embeds the crop with ArcFace -> a unit-norm 512-d vector.
``IdentityQFormer``: learned query tokens read that embedding through cross-attention
(a Q-Former) and become the identity tokens F_id that every block's identity
cross-attention attends to (``attention.AudioCrossAttnProcessor``, weight l2 = 0.5).
Its output projection is zero-initialised, so untrained identity tokens are exactly 0
and the identity branch adds exactly 0.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from model.errors import NoFaceError, PortraitError, WeightsError

logger = logging.getLogger(__name__)

#: ArcFace embedding size.
ARCFACE_DIM = 512


class IdentityEncoder:
    """Face crop + ArcFace embedding of a portrait.

    ``analyser``: an object with ``get(bgr_image) -> faces``, each face having ``bbox``
    (x0, y0, x1, y1) and ``normed_embedding`` (512,) — insightface's ``FaceAnalysis``
    with detection and recognition models.
    """

    def __init__(self, analyser: Any) -> None:
        self.analyser = analyser

    @classmethod
    def from_dir(
        cls, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), det_size: int = 640
    ) -> IdentityEncoder:
        """insightface ``FaceAnalysis`` from a local model directory (e.g. antelopev2 or
        buffalo_l: a detection .onnx and an ArcFace recognition .onnx), never downloaded.

        Raises WeightsError naming the directory when it is missing, has no .onnx file,
        or lacks a detection or recognition model.
        """
        path = Path(path)
        if not path.is_dir() or not any(path.glob("*.onnx")):
            raise WeightsError(
                f"insightface model directory {path} is missing or has no .onnx files: expected a local "
                "insightface model pack (e.g. antelopev2 or buffalo_l) with a face detection model "
                "and an ArcFace recognition model"
            )
        from insightface.app import FaceAnalysis

        try:
            analyser = FaceAnalysis(
                name=str(path.resolve()), allowed_modules=["detection", "recognition"], providers=list(providers)
            )
        except AssertionError as exc:  # insightface asserts a detection model was found
            raise WeightsError(f"insightface directory {path} has no face detection model") from exc
        if "recognition" not in analyser.models:
            raise WeightsError(f"insightface directory {path} has no ArcFace recognition model")
        analyser.prepare(ctx_id=-1, det_size=(det_size, det_size))
        logger.info("insightface models loaded from %s", path)
        return cls(analyser)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """ArcFace embedding of the largest face: ``image`` RGB uint8 (H, W, 3) ->
        float32 (512,), unit norm.

        Raises PortraitError for a non-RGB-uint8 image, NoFaceError when no face is found.
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise PortraitError(f"portrait must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
        faces = self.analyser.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface wants BGR
        if not faces:
            raise NoFaceError("no face found in the portrait for the identity embedding: use a frontal face photo")
        face = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
        embedding = np.asarray(face.normed_embedding, dtype=np.float32)
        if embedding.shape != (ARCFACE_DIM,):
            raise WeightsError(f"the recognition model gave a {embedding.shape} embedding, expected ({ARCFACE_DIM},)")
        return embedding


class QFormerLayer(nn.Module):
    """Pre-norm transformer layer of the Q-Former: query self-attention, cross-attention
    to the face context, feed-forward (x4, GELU); [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.norm_cross(queries)
        queries = queries + self.cross_attn(h, context, context, need_weights=False)[0]
        return queries + self.ff(self.norm_ff(queries))


class IdentityQFormer(nn.Module):
    """ArcFace embedding [B, 512] -> identity tokens [B, num_tokens, out_dim].

    The embedding is expanded to ``context_tokens`` context vectors (a linear map), then
    ``num_tokens`` learned queries go through ``depth`` ``QFormerLayer``s attending to
    them; a final LayerNorm and a zero-initialised Linear(dim -> out_dim) give the tokens.
    """

    def __init__(
        self,
        out_dim: int,
        dim: int = 1024,
        num_tokens: int = 16,
        depth: int = 2,
        heads: int = 8,
        context_tokens: int = 4,
        embed_dim: int = ARCFACE_DIM,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.context = nn.Linear(embed_dim, context_tokens * dim)
        self.context_norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) * dim**-0.5)
        self.layers = nn.ModuleList(QFormerLayer(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)
        # Zero output: untrained identity tokens are 0, so the identity branch adds 0 (spec section 6).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def out_dim(self) -> int:
        """Size of one identity token."""
        return self.proj_out.out_features

    def forward(self, embedding: Tensor) -> Tensor:
        """``embedding`` [B, 512] -> identity tokens [B, num_tokens, out_dim] in the module's dtype.

        Raises ValueError for another shape.
        """
        if embedding.ndim != 2 or embedding.shape[1] != self.embed_dim:
            raise ValueError(f"identity embedding must have shape [B, {self.embed_dim}], got {tuple(embedding.shape)}")
        context = self.context(embedding.to(self.proj_out.weight.dtype)).unflatten(1, (-1, self.queries.shape[2]))
        context = self.context_norm(context)
        tokens = self.queries.expand(embedding.shape[0], -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, context)
        return self.proj_out(self.norm_out(tokens))
