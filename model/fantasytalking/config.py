"""Settings of the FantasyTalking diffusion generator (spec: ../shared/specs/fantasytalking.md).

One frozen dataclass holds every switch: sampling (steps, shift, CFG mode and
scales), streaming windows (frames per window, motion frames), and the speed
levers of issue 4 section 4. Defaults follow the spec and the released weights;
speed levers are off unless harmless.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: CFG modes: 3 passes (prompt + audio guidance, spec section 5), 2 passes
#: (audio guidance only: pos vs. noaudio), 1 pass (no CFG, for step-distilled weights).
CfgMode = Literal[3, 2, 1]
AttentionBackend = Literal["native", "flash", "sage"]


@dataclass(frozen=True)
class FantasyTalkingConfig:
    """Generator settings. Raises ValueError for values outside the ranges below.

    Sampling (spec section 5): ``steps`` >= 1 Euler steps of flow matching with
    sigma ``shift`` (5.0); ``cfg_passes`` 3, 2 or 1; ``prompt_cfg`` g_p and
    ``audio_cfg`` g_a (>= 0; the paper's audio CFG 4.5, the reference code 5.0);
    ``seed`` for the initial noise (window noise is seeded by seed and the
    window's first frame, so the same window and state give the same frames).

    Streaming windows (spec section 8): ``window_frames`` pixel frames per
    diffusion window, 4k+1 (33 default, 81 at most for the released weights);
    ``motion_frames`` of them (5 default, 1..window_frames-1, 4j+1 so they fill
    whole latent frames) are the previous window's last decoded frames, held
    clean; each window emits ``window_frames - motion_frames`` new frames.
    ``fps`` 23 for the released weights. ``max_side`` longest edge of the
    reference image (512; both sides rounded up to a multiple of 16).

    Conditioning: ``prompt`` text ('' = the paper's empty prompt);
    ``audio_weight`` l1 (1.0) and ``identity_weight`` l2 (0.5) of paper Sec. 3.3.

    Speed levers (issue 4 section 4): ``dtype`` "bfloat16" | "float32";
    ``attention_backend`` "native" (SDPA), "flash", "sage" (when installed);
    ``compile_blocks`` torch.compile of the repeated transformer blocks;
    ``first_block_cache`` residual-difference threshold of diffusers'
    FirstBlockCache (0 = off); ``group_offload`` diffusers group offloading to
    CPU for small GPUs; ``batch_cfg`` run the CFG passes as one batch;
    ``context_parallel`` ("" = off, "ulysses" or "ring") over all visible GPUs.
    """

    steps: int = 30
    shift: float = 5.0
    cfg_passes: CfgMode = 3
    prompt_cfg: float = 5.0
    audio_cfg: float = 4.5
    seed: int = 0
    window_frames: int = 33
    motion_frames: int = 5
    fps: float = 23.0
    max_side: int = 512
    prompt: str = ""
    audio_weight: float = 1.0
    identity_weight: float = 0.5
    dtype: Literal["bfloat16", "float32"] = "float32"
    attention_backend: AttentionBackend = "native"
    compile_blocks: bool = False
    first_block_cache: float = 0.0
    group_offload: bool = False
    batch_cfg: bool = True
    context_parallel: Literal["", "ulysses", "ring"] = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.cfg_passes not in (1, 2, 3):
            raise ValueError(f"cfg_passes must be 1, 2 or 3, got {self.cfg_passes}")
        if self.prompt_cfg < 0 or self.audio_cfg < 0:
            raise ValueError(f"CFG scales must be >= 0, got prompt {self.prompt_cfg}, audio {self.audio_cfg}")
        if self.window_frames < 5 or (self.window_frames - 1) % 4:
            raise ValueError(f"window_frames must be 4k+1 and >= 5, got {self.window_frames}")
        if not 1 <= self.motion_frames < self.window_frames or (self.motion_frames - 1) % 4:
            raise ValueError(
                f"motion_frames must be 4j+1 and in [1, window_frames), got {self.motion_frames}"
            )
        if not 0 < self.fps <= 60:
            raise ValueError(f"fps must be in (0, 60], got {self.fps}")
        if self.max_side < 16 or self.max_side % 16:
            raise ValueError(f"max_side must be a positive multiple of 16, got {self.max_side}")
        if self.first_block_cache < 0:
            raise ValueError(f"first_block_cache must be >= 0, got {self.first_block_cache}")

    @property
    def new_frames(self) -> int:
        """Frames each window emits: ``window_frames - motion_frames``."""
        return self.window_frames - self.motion_frames

    @property
    def latent_frames(self) -> int:
        """Latent frames of a window: ``(window_frames - 1) / 4 + 1``."""
        return (self.window_frames - 1) // 4 + 1

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames the motion frames fill: ``(motion_frames - 1) / 4 + 1``."""
        return (self.motion_frames - 1) // 4 + 1
