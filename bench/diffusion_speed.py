"""Speed of the FantasyTalking generator at full size (Wan2.1-I2V-14B) with random weights.

Builds the real networks with random weights (speed does not depend on their
values): the 14B DiT (40 blocks, 5120 wide, the released audio adapter's sizes)
in bfloat16, initialised on the meta device and materialised directly on the GPU
(no 60 GB of host memory), the Wan VAE, CLIP ViT-H/14 and wav2vec2-base. Then it
drives ``FantasyTalkingGenerator.generate`` as the session engine does, for every
scenario of the chosen sizes x window lengths x CFG passes x compile x
FirstBlockCache threshold:

* a warm-up window (compiles, autotunes), then a first window (state None) and
  the window after it, each with ``--timed-steps`` denoising steps;
* seconds per step = time inside the sampler / steps; the rest of a window's time
  (audio features, motion-frame re-encoding, streamed VAE decode) is fixed per
  window, so a window of S steps takes ``fixed + S * step`` (extrapolated to 4
  and 30 steps: running 30 steps of every scenario would take hours);
* real-time factor = window seconds / seconds of new video (< 1: faster than
  real time); first-frame latency = the audio the engine buffers before it
  starts the first window ((new frames + lookahead) / fps) + that window's time;
* peak GPU memory of the scenario (torch.cuda.max_memory_allocated).

Windows: 33 frames with 5 motion frames (28 new), 81 with 9 (72 new), spec section 8.
FirstBlockCache skips depend on the weights: with random weights its skip rate is
not that of the released model (the table shows the steps it skipped).

    python bench/diffusion_speed.py [--sizes 512x512,480x832] [--frames 33,81]
        [--passes 1,2,3] [--compile off,on] [--fbc 0,0.05] [--timed-steps 2]
        [--attention native|flash|sage] [--tiny]

``--tiny`` runs the same code end to end on the CPU with tiny random networks
(sizes scaled down). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.base import AUDIO_SAMPLE_RATE, MotionSettings, clip_windows  # noqa: E402
from model.fantasytalking import generator as generator_module  # noqa: E402
from model.fantasytalking.config import FantasyTalkingConfig  # noqa: E402
from model.fantasytalking.generator import FantasyTalkingGenerator, FantasyTalkingModels  # noqa: E402
from model.fantasytalking.speed import (  # noqa: E402
    apply_speed_levers,
    cast_keeping_fp32,
    compile_blocks,
    set_first_block_cache,
)

logger = logging.getLogger("diffusion_speed")

#: Wan2.1-I2V-14B-720P DiT (spec section 1).
WAN_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)
#: CLIP ViT-H/14 vision tower of the Wan I2V image encoder.
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
#: Motion frames per window length (spec section 8's published settings).
MOTION_FRAMES = {33: 5, 81: 9}
PROMPT_TOKENS = 24  # a short prompt; the padding to 512 is what the DiT sees anyway


@dataclasses.dataclass
class Result:
    size: tuple[int, int]
    frames: int
    new_frames: int
    passes: int
    compiled: bool
    fbc: float
    step_s: float
    fixed_first_s: float
    fixed_next_s: float
    skipped: str
    peak_gib: float | None
    prepare_s: float
    fps: float
    lookahead: int

    def window_s(self, steps: int) -> float:
        return self.fixed_next_s + steps * self.step_s

    def rtf(self, steps: int) -> float:
        return self.window_s(steps) / (self.new_frames / self.fps)

    def first_frame_s(self, steps: int) -> float:
        buffered = (self.new_frames + self.lookahead) / self.fps
        return buffered + self.fixed_first_s + steps * self.step_s


class SamplerClock:
    """Times the sampler inside ``generate`` (synchronising the device around it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._sample = generator_module.sample

    def __enter__(self) -> SamplerClock:
        def timed(*args, **kwargs):
            sync(self.device)
            started = time.perf_counter()
            out = self._sample(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - started
            return out

        generator_module.sample = timed
        return self

    def __exit__(self, *exc) -> None:
        generator_module.sample = self._sample


class SkipCounter:
    """Counts FirstBlockCache decisions (its head-block hook's test runs eagerly)."""

    def __init__(self) -> None:
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        self.decisions: list[bool] = []
        self._cls = FBCHeadBlockHook
        self._original = FBCHeadBlockHook._should_compute_remaining_blocks

    def __enter__(self) -> SkipCounter:
        original, decisions = self._original, self.decisions

        @torch.compiler.disable
        def counting(hook, residual):
            compute = original(hook, residual)
            decisions.append(compute)
            return compute

        self._cls._should_compute_remaining_blocks = counting
        return self

    def __exit__(self, *exc) -> None:
        self._cls._should_compute_remaining_blocks = self._original


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size_models(device: torch.device, attention: str) -> FantasyTalkingModels:
    """The real-size networks with random weights; the DiT in bfloat16, built on the meta
    device and materialised on ``device`` (fp32-kept modules as diffusers keeps them)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    from transformers import CLIPVisionConfig, CLIPVisionModel, Wav2Vec2Config, Wav2Vec2Model

    from model.fantasytalking.audio_adapter import AudioProjModel
    from model.fantasytalking.audio_features import Wav2Vec2Features
    from model.fantasytalking.conditioning import NEGATIVE_PROMPT
    from model.fantasytalking.transformer import FantasyTalkingTransformer
    from model.fantasytalking.vae_stream import StreamingVaeDecoder

    config = FantasyTalkingConfig(dtype="bfloat16", attention_backend=attention)
    started = time.perf_counter()
    with torch.device("meta"):
        wan = WanTransformer3DModel(**WAN_14B)
        transformer = FantasyTalkingTransformer(wan, AudioProjModel(768, 2048), config)
    cast_keeping_fp32(transformer, torch.bfloat16)  # on meta: sets dtypes, allocates nothing
    transformer.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)  # norm scales
        rope = WanRotaryPosEmbed(WAN_14B["attention_head_dim"], WAN_14B["patch_size"], WAN_14B["rope_max_seq_len"])
        for buffer_name, buffer in rope.named_buffers():
            getattr(wan.rope, buffer_name).copy_(buffer)
    transformer.eval()
    apply_speed_levers(transformer, config, device)
    params = sum(p.numel() for p in transformer.parameters())
    logger.info("DiT: %.2f B parameters, built in %.1f s", params / 1e9, time.perf_counter() - started)

    with torch.device(device):
        vae = AutoencoderKLWan().eval().requires_grad_(False)
        clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)).to(torch.bfloat16).eval().requires_grad_(False)
        wav2vec = Wav2Vec2Model(Wav2Vec2Config(layerdrop=0.0, mask_time_prob=0.0)).eval().requires_grad_(False)
    prompts = {text: torch.randn(PROMPT_TOKENS, 4096) for text in ("", NEGATIVE_PROMPT)}
    return FantasyTalkingModels(
        transformer=transformer, vae=StreamingVaeDecoder(vae), image_encoder=clip,
        wav2vec=Wav2Vec2Features(wav2vec), device=device, dtype=torch.bfloat16, tag="bench", prompts=prompts,
    )


def tiny_models_for_bench() -> FantasyTalkingModels:
    """Tiny random networks on the CPU (float32), as ``FantasyTalkingGenerator.tiny``."""
    from model.fantasytalking.generator import tiny_models

    return tiny_models(0, FantasyTalkingConfig())


def run_scenario(models, config: FantasyTalkingConfig, size: tuple[int, int], fps: float,
                 compiled: bool) -> Result:
    device = models.device
    generator = FantasyTalkingGenerator(models, config)
    height, width = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    prepared = generator.prepare(image)
    sync(device)
    prepare_s = time.perf_counter() - started
    if prepared.arrays["image"].shape[:2] != size:
        raise SystemExit(f"size {height}x{width} is not a 16-multiple reference size; got {prepared.arrays['image'].shape[:2]}")
    seconds = 3 * config.window_frames / fps + 2.0
    audio = (0.1 * rng.standard_normal(int(seconds * AUDIO_SAMPLE_RATE))).astype(np.float32)
    first, second = list(clip_windows(audio, generator, fps=fps))[:2]
    motion = MotionSettings()

    def timed(window, state):
        with SamplerClock(device) as clock:
            sync(device)
            started = time.perf_counter()
            _, new_state = generator.generate(prepared, window, motion, state)
            sync(device)
            total = time.perf_counter() - started
        return total, clock.seconds, new_state

    warm_s, _, _ = timed(first, None)  # compile, kernels' autotuning, allocator warm-up
    logger.info("warm-up window %.1f s", warm_s)
    with SkipCounter() as skips:
        total_first, sampling_first, state = timed(first, None)
        total_next, sampling_next, _ = timed(second, state)
    steps = config.steps
    step_s = (sampling_first + sampling_next) / (2 * steps)
    calls = skips.decisions
    skipped = f"{calls.count(False)}/{len(calls)}" if config.first_block_cache > 0 else "-"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Result(
        size=size, frames=config.window_frames, new_frames=config.new_frames, passes=config.cfg_passes,
        compiled=compiled, fbc=config.first_block_cache, step_s=step_s,
        fixed_first_s=total_first - sampling_first, fixed_next_s=total_next - sampling_next,
        skipped=skipped, peak_gib=peak, prepare_s=prepare_s, fps=fps, lookahead=generator.lookahead_frames,
    )


def markdown(results: list[Result], device_name: str, timed_steps: int) -> str:
    lines = [
        f"Device: {device_name}. Step time measured over {timed_steps} steps per window (two windows), "
        "window times extrapolated: fixed + steps x step.",
        "",
        "| size | window (new) | CFG passes | compile | FBC (skipped) | s/step | window s, 4 steps | RTF, 4 "
        "| window s, 30 steps | RTF, 30 | first frame s, 4 steps | first frame s, 30 steps | peak GiB | prepare s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fbc = "off" if r.fbc == 0 else f"{r.fbc:g} ({r.skipped})"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"
        lines.append(
            f"| {r.size[0]}x{r.size[1]} | {r.frames} ({r.new_frames}) | {r.passes} | {'on' if r.compiled else 'off'} "
            f"| {fbc} | {r.step_s:.3f} | {r.window_s(4):.2f} | {r.rtf(4):.2f} | {r.window_s(30):.1f} "
            f"| {r.rtf(30):.2f} | {r.first_frame_s(4):.2f} | {r.first_frame_s(30):.1f} | {peak} | {r.prepare_s:.2f} |"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        height, _, width = item.partition("x")
        sizes.append((int(height), int(width)))
    return sizes


def parse_list(kind):
    return lambda text: [kind(item) for item in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="HxW list (multiples of 16; default 512x512,480x832, --tiny: 64x64,48x80)")
    parser.add_argument("--frames", type=parse_list(int), default=[33, 81], help="window lengths: 33 and/or 81")
    parser.add_argument("--passes", type=parse_list(int), default=[1, 2, 3], help="CFG passes (batched)")
    parser.add_argument("--compile", type=parse_list(str), default=["off"], help="off,on (on runs last)")
    parser.add_argument("--fbc", type=parse_list(float), default=[0.0], help="FirstBlockCache thresholds, 0 = off")
    parser.add_argument("--timed-steps", type=int, default=2, help="denoising steps timed per window")
    parser.add_argument("--attention", choices=["native", "flash", "sage"], default="native")
    parser.add_argument("--fps", type=float, default=23.0)
    parser.add_argument("--tiny", action="store_true", help="tiny random networks on the CPU (a smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for frames in args.frames:
        if frames not in MOTION_FRAMES:
            parser.error(f"--frames takes 33 and/or 81, got {frames}")

    if args.tiny:
        device, device_name = torch.device("cpu"), "CPU (tiny random networks, not a speed figure)"
        models = tiny_models_for_bench()
        sizes = args.sizes or [(64, 64), (48, 80)]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke run")
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
        models = full_size_models(device, args.attention)
        sizes = args.sizes or [(512, 512), (480, 832)]
    dtype = "float32" if args.tiny else "bfloat16"

    results = []
    for compiled in sorted({c == "on" for c in args.compile}):  # compiling cannot be undone: last
        if compiled:
            compile_blocks(models.transformer.wan)
        for threshold in args.fbc:
            set_first_block_cache(models.transformer.wan, threshold)
            for size in sizes:
                for frames in args.frames:
                    for passes in args.passes:
                        config = FantasyTalkingConfig(
                            steps=args.timed_steps, cfg_passes=passes, window_frames=frames,
                            motion_frames=MOTION_FRAMES[frames], max_side=max(size), fps=args.fps, dtype=dtype,
                            first_block_cache=threshold, compile_blocks=compiled,
                            attention_backend=args.attention,
                        )
                        logger.info("scenario %s", config)
                        results.append(run_scenario(models, config, size, args.fps, compiled))
                        print(markdown(results[-1:], device_name, args.timed_steps).splitlines()[-1], flush=True)
    print()
    print(markdown(results, device_name, args.timed_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
