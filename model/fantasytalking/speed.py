"""The speed levers of issue 4 section 4, applied to a loaded DiT from the config's switches.

Each lever uses diffusers' own mechanism:

* dtype / device: ``cast_keeping_fp32`` then ``module.to``; with ``group_offload`` the Wan blocks stay on the
  CPU and diffusers' block-level group offloading moves one block at a time to
  the GPU (on a CUDA stream, so the copy overlaps the previous block's compute);
* ``attention_backend``: ``ModelMixin.set_attention_backend`` (native SDPA, flash-attn,
  SageAttention from installed packages; never the hub-kernel backends, which download);
  it also reaches the audio processors, which dispatch through diffusers;
* ``context_parallel``: ``ModelMixin.enable_parallelism`` with a Ulysses or ring
  ``ContextParallelConfig`` over every rank of an initialised ``torch.distributed``;
* ``first_block_cache``: ``CacheMixin.enable_cache(FirstBlockCacheConfig(threshold))``;
  callers reset it per window and give each CFG pass its own ``cache_context``;
* ``compile_blocks``: ``ModelMixin.compile_repeated_blocks`` (regional torch.compile of
  the 40 identical Wan blocks: one compiled graph reused, short compile time).
"""
from __future__ import annotations

import logging

import torch

from model.fantasytalking.config import FantasyTalkingConfig

logger = logging.getLogger(__name__)

#: config.attention_backend -> diffusers AttentionBackendName value.
ATTENTION_BACKENDS = {"native": "native", "flash": "flash", "sage": "sage"}


def torch_dtype(config: FantasyTalkingConfig) -> torch.dtype:
    """``config.dtype`` as a torch dtype (bfloat16 or float32)."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]


def apply_speed_levers(transformer: torch.nn.Module, config: FantasyTalkingConfig, device: torch.device) -> None:
    """Configure ``transformer`` (a ``FantasyTalkingTransformer``; its diffusers model is
    ``transformer.wan``) in place for ``device`` from ``config``'s switches.

    Raises RuntimeError when ``context_parallel`` is set without an initialised
    ``torch.distributed`` (launch with ``torchrun --nproc-per-node N``), and (from
    diffusers) for an attention backend whose package is not installed, naming it.
    """
    wan = transformer.wan
    cast_keeping_fp32(transformer, torch_dtype(config))
    if config.group_offload:
        for child in transformer.children():
            if child is not wan:
                child.to(device)  # the small FantasyTalking modules live on the GPU
        wan.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=device.type == "cuda",
        )
        logger.info("group offload: Wan blocks stream from CPU memory to %s", device)
    else:
        transformer.to(device=device)
    if config.attention_backend != "native":
        wan.set_attention_backend(ATTENTION_BACKENDS[config.attention_backend])
    if config.context_parallel:
        _enable_context_parallel(wan, config.context_parallel)
    set_first_block_cache(wan, config.first_block_cache)
    if config.compile_blocks:
        compile_blocks(wan)


def cast_keeping_fp32(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to ``dtype``, except in the Wan modules diffusers
    keeps in float32 (``_keep_in_fp32_modules``: RoPE tables, time embedder, modulation
    tables, norms), which are made float32: a bfloat16 RoPE table loses the angle
    precision of long token sequences."""
    keep = set(getattr(transformer.wan, "_keep_in_fp32_modules", None) or ())
    for name, module in transformer.named_modules():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        for key, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != target:
                module._buffers[key] = buffer.to(target)


def set_first_block_cache(wan: torch.nn.Module, threshold: float) -> None:
    """Turn diffusers' FirstBlockCache on ``wan`` on with ``threshold`` (the relative
    change of the first block's residual below which the other blocks are skipped), or
    off for 0."""
    from diffusers.hooks import FirstBlockCacheConfig

    if wan.is_cache_enabled:
        wan.disable_cache()
    if threshold > 0:
        wan.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        logger.info("FirstBlockCache on, threshold %g", threshold)


def compile_blocks(wan: torch.nn.Module) -> None:
    """torch.compile each repeated Wan block (regional compile; irreversible)."""
    wan.compile_repeated_blocks(fullgraph=False)
    logger.info("Wan blocks compiled with torch.compile (regional)")


def _enable_context_parallel(wan: torch.nn.Module, kind: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"context_parallel={kind!r} needs torch.distributed initialised on every GPU: launch with "
            "torchrun --nproc-per-node N, with every rank making the same generate calls"
        )
    world = dist.get_world_size()
    parallel = ContextParallelConfig(ulysses_degree=world) if kind == "ulysses" else ContextParallelConfig(ring_degree=world)
    wan.enable_parallelism(config=parallel)
    logger.info("context parallel (%s) over %d ranks", kind, world)


def reset_step_cache(transformer: torch.nn.Module) -> None:
    """Forget FirstBlockCache's residuals: every window starts from a full forward, so
    the same window and state give the same frames whatever ran before."""
    wan = transformer.wan
    if getattr(wan, "is_cache_enabled", False):
        wan._reset_stateful_cache()
