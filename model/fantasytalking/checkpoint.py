"""The ``--weights DIR`` layout of the FantasyTalking generator and its loaders (issue 4 section 2).

Everything is read from local files; nothing is ever downloaded::

    DIR/
      Wan2.1-I2V-14B-720P-Diffusers/     diffusers-format Wan2.1-I2V-14B-720P (required)
        transformer/                     config.json (+ diffusion_pytorch_model*.safetensors)
        vae/  image_encoder/             AutoencoderKLWan, CLIPVisionModel (ViT-H/14)
        text_encoder/  tokenizer/        UMT5-XXL; not needed with prompt_embeds.safetensors
      Wan2.1-I2V-14B-720P/               optional: original-format DiT
        diffusion_pytorch_model*.safetensors   used when transformer/ has no weights; read with
                                               from_single_file(config=the Diffusers dir)
      fantasytalking_model.ckpt          the released audio adapter (torch-saved dict
        (or fantasytalking_model.safetensors)   {proj_model, audio_processor}; safetensors: the
                                               same tensors prefixed proj_model. / audio_processor.)
      wav2vec2-base-960h/                facebook/wav2vec2-base-960h (config.json + weights)
      insightface/                       optional: insightface pack (detection + ArcFace .onnx)
      fantasytalking_identity.safetensors   optional: identity Q-Former + per-block projections
      fantasytalking_motion.safetensors     optional: motion-intensity embedding
      distill_lora.safetensors           optional: LoRA for step-distilled sampling (diffusers'
                                         Wan LoRA loader; fused into the DiT; needs peft)
      prompt_embeds.safetensors          optional: precomputed UMT5 prompt embeddings

The adapter must hold exactly 3 + 2 * blocks tensors (83 for the 40-block 14B model: spec
section 2); a missing or unexpected key, or a wrong shape, is a ``WeightsError`` naming it.

Identity file: tensors ``qformer.<IdentityQFormer parameter>`` and
``blocks.N.identity_k_proj.weight`` / ``blocks.N.identity_v_proj.weight`` for every block;
metadata ``dim``, ``num_tokens``, ``depth``, ``heads``, ``context_tokens`` (the Q-Former
sizes). Motion file: ``MotionIntensityEmbedding`` parameters; metadata ``hidden_dim``,
``num_tokens``. Both files are checked key by key like the adapter.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.errors import WeightsError
from model.fantasytalking.audio_adapter import AudioProjModel
from model.fantasytalking.audio_features import Wav2Vec2Features
from model.fantasytalking.config import FantasyTalkingConfig
from model.fantasytalking.identity import IdentityEncoder, IdentityQFormer
from model.fantasytalking.motion import MotionIntensityEmbedding
from model.fantasytalking.transformer import FantasyTalkingTransformer

logger = logging.getLogger(__name__)

WAN_DIFFUSERS_DIR = "Wan2.1-I2V-14B-720P-Diffusers"
WAN_ORIGINAL_DIR = "Wan2.1-I2V-14B-720P"
ADAPTER_CKPT = "fantasytalking_model.ckpt"
ADAPTER_SAFETENSORS = "fantasytalking_model.safetensors"
WAV2VEC_DIR = "wav2vec2-base-960h"
INSIGHTFACE_DIR = "insightface"
IDENTITY_WEIGHTS = "fantasytalking_identity.safetensors"
MOTION_WEIGHTS = "fantasytalking_motion.safetensors"
LORA_WEIGHTS = "distill_lora.safetensors"
PROMPT_EMBEDS = "prompt_embeds.safetensors"
DIT_WEIGHTS_GLOB = "diffusion_pytorch_model*.safetensors"

LAYOUT = (
    f"expected DIR/{WAN_DIFFUSERS_DIR}/ (transformer/, vae/, image_encoder/, and text_encoder/ + tokenizer/ "
    f"unless DIR/{PROMPT_EMBEDS} exists), optionally DIR/{WAN_ORIGINAL_DIR}/{DIT_WEIGHTS_GLOB} (original-format DiT), "
    f"DIR/{ADAPTER_CKPT} (or {ADAPTER_SAFETENSORS}), DIR/{WAV2VEC_DIR}/, and optionally DIR/{INSIGHTFACE_DIR}/, "
    f"DIR/{IDENTITY_WEIGHTS}, DIR/{MOTION_WEIGHTS}, DIR/{LORA_WEIGHTS}"
)

#: The two state dicts of the released adapter checkpoint.
ADAPTER_PARTS = ("proj_model", "audio_processor")


@dataclass
class LoadedWeights:
    """Everything ``load_fantasytalking`` read.

    ``transformer`` (FantasyTalkingTransformer, with the adapter and optional modules
    loaded), ``vae`` (AutoencoderKLWan, float32), ``image_encoder`` (CLIPVisionModel),
    ``wav2vec`` (Wav2Vec2Features, float32); ``text_encoder`` + ``tokenizer``
    (UMT5EncoderModel, tokenizer) or None when ``prompt_embeds`` (the tensors of
    prompt_embeds.safetensors, with ``prompt_embeds_meta`` its string metadata) was given;
    ``identity_encoder`` (IdentityEncoder) or None; ``counts``: tensors loaded per file
    (``adapter`` = 83 for the 14B model, ``identity``, ``motion``, ``lora``).
    """

    transformer: FantasyTalkingTransformer
    vae: Any
    image_encoder: Any
    wav2vec: Wav2Vec2Features
    text_encoder: Any = None
    tokenizer: Any = None
    prompt_embeds: dict[str, Tensor] | None = None
    prompt_embeds_meta: dict[str, str] = field(default_factory=dict)
    identity_encoder: IdentityEncoder | None = None
    counts: dict[str, int] = field(default_factory=dict)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsError(f"missing {what}: {path} does not exist; {LAYOUT}")
    return path


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# -- the released audio adapter --------------------------------------------------------


def adapter_path(weights_dir: str | Path) -> Path:
    """The adapter file in ``weights_dir``: fantasytalking_model.ckpt, else its .safetensors
    variant. Raises WeightsError naming both and the layout when neither exists."""
    weights_dir = Path(weights_dir)
    for name in (ADAPTER_CKPT, ADAPTER_SAFETENSORS):
        if (weights_dir / name).is_file():
            return weights_dir / name
    raise WeightsError(
        f"missing audio adapter: neither {weights_dir / ADAPTER_CKPT} nor {ADAPTER_SAFETENSORS}; {LAYOUT}"
    )


def read_adapter(path: str | Path) -> dict[str, Tensor]:
    """The adapter's tensors as one flat dict with keys ``proj_model.<key>`` and
    ``audio_processor.<key>``, from the torch-saved dict (read with ``weights_only=True``:
    no code runs) or the safetensors variant. Raises WeightsError for a missing file, an
    unreadable one, or a torch file whose top level is not {proj_model, audio_processor}.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"missing audio adapter file {path}; {LAYOUT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise WeightsError(f"cannot read audio adapter {path}: {exc}") from exc
    if not isinstance(saved, dict):
        raise WeightsError(f"{path} must hold a dict with keys {list(ADAPTER_PARTS)}, got {type(saved).__name__}")
    for key in saved:
        if key not in ADAPTER_PARTS:
            raise WeightsError(f"unexpected top-level key {key!r} in {path}; expected {list(ADAPTER_PARTS)}")
    flat = {}
    for part in ADAPTER_PARTS:
        if part not in saved:
            raise WeightsError(f"missing top-level key {part!r} in {path}; expected {list(ADAPTER_PARTS)}")
        for key, tensor in saved[part].items():
            flat[f"{part}.{key}"] = tensor
    return flat


def adapter_key_map(num_blocks: int) -> dict[str, str]:
    """Released adapter key -> FantasyTalkingTransformer parameter name (3 + 2 * num_blocks entries)."""
    names = {f"proj_model.{k}": f"audio_proj.{k}" for k in ("proj.weight", "norm.weight", "norm.bias")}
    for i in range(num_blocks):
        for proj in ("k_proj", "v_proj"):
            names[f"audio_processor.blocks.{i}.cross_attn.processor.{proj}.weight"] = (
                f"wan.blocks.{i}.attn2.processor.{proj}.weight"
            )
    return names


def check_keys(found: Collection[str], expected: Collection[str], source: str) -> None:
    """Raise WeightsError naming the first key of ``found`` not in ``expected``
    (with an expected key as an example), or the keys of ``expected`` missing from
    ``found`` (the first five, and how many more)."""
    for key in found:
        if key not in expected:
            raise WeightsError(f"unexpected key {key!r} in {source}; expected keys like {next(iter(expected))!r}")
    missing = [key for key in expected if key not in found]
    if missing:
        raise WeightsError(f"missing key{'s' if len(missing) > 1 else ''} in {source}: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def load_exact(module: nn.Module, tensors: dict[str, Tensor], names: dict[str, str], source: str) -> int:
    """Copy ``tensors`` into ``module``'s parameters, key by key: ``names`` maps every file
    key to a parameter name. All keys are checked before anything is copied.

    Returns the number of tensors loaded (= len(names)). Raises WeightsError naming the
    first unexpected key, the missing keys, or a key whose shape differs (both shapes).
    """
    check_keys(tensors, names, source)
    params = dict(module.named_parameters())
    for key, name in names.items():
        if tuple(tensors[key].shape) != tuple(params[name].shape):
            raise WeightsError(
                f"{key} in {source} has shape {list(tensors[key].shape)}, the model expects {list(params[name].shape)}"
            )
    with torch.no_grad():
        for key, name in names.items():
            params[name].copy_(tensors[key])
    return len(names)


def load_adapter(transformer: FantasyTalkingTransformer, tensors: dict[str, Tensor], source: str = "adapter") -> int:
    """Load the released adapter into ``transformer``: exactly 3 + 2 * blocks tensors
    (83 for Wan2.1-14B, spec section 2). Returns the count; raises WeightsError as ``load_exact``."""
    count = load_exact(transformer, tensors, adapter_key_map(transformer.num_blocks), source)
    logger.info("audio adapter: %d tensors loaded from %s", count, source)
    return count


# -- the paper's identity and motion modules ------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def _sizes(meta: dict[str, str], keys: tuple[str, ...], path: Path) -> dict[str, int]:
    missing = [key for key in keys if key not in meta]
    if missing:
        raise WeightsError(f"{path} lacks metadata {missing}: it must record the module sizes {list(keys)}")
    return {key: int(meta[key]) for key in keys}


def build_identity(path: Path, num_blocks: int) -> tuple[IdentityQFormer, dict[str, Tensor]]:
    """An IdentityQFormer sized by the identity file's metadata, and the file's tensors."""
    tensors, meta = _read_safetensors(path)
    sizes = _sizes(meta, ("dim", "num_tokens", "depth", "heads", "context_tokens"), path)
    key = f"blocks.{num_blocks - 1}.identity_k_proj.weight"
    if key not in tensors:
        raise WeightsError(f"missing key {key!r} in {path}")
    return IdentityQFormer(out_dim=tensors[key].shape[1], **sizes), tensors


def identity_key_map(transformer: FantasyTalkingTransformer) -> dict[str, str]:
    """Identity file key -> FantasyTalkingTransformer parameter name."""
    names = {f"qformer.{k}": f"identity_qformer.{k}" for k, _ in transformer.identity_qformer.named_parameters()}
    for i in range(transformer.num_blocks):
        for proj in ("identity_k_proj", "identity_v_proj"):
            names[f"blocks.{i}.{proj}.weight"] = f"wan.blocks.{i}.attn2.processor.{proj}.weight"
    return names


def build_motion(path: Path, dim: int) -> tuple[MotionIntensityEmbedding, dict[str, Tensor]]:
    """A MotionIntensityEmbedding sized by the motion file's metadata, and the file's tensors."""
    tensors, meta = _read_safetensors(path)
    return MotionIntensityEmbedding(dim, **_sizes(meta, ("hidden_dim", "num_tokens"), path)), tensors


# -- the DiT ----------------------------------------------------------------------------


def load_wan(weights_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The Wan2.1-I2V DiT: from the Diffusers dir's transformer/ weights if present, else from
    the original-format shards in Wan2.1-I2V-14B-720P/ through ``from_single_file`` with the
    Diffusers dir's config. Raises WeightsError naming what is missing, or the first
    missing/unexpected key of an original-format set."""
    from diffusers import WanTransformer3DModel

    diffusers_dir = _require(weights_dir / WAN_DIFFUSERS_DIR, "the diffusers-format Wan2.1-I2V-14B-720P directory")
    _require(diffusers_dir / "transformer" / "config.json", "the DiT config")
    if any((diffusers_dir / "transformer").glob(DIT_WEIGHTS_GLOB)):
        logger.info("DiT: diffusers format from %s", diffusers_dir / "transformer")
        return WanTransformer3DModel.from_pretrained(
            diffusers_dir, subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
    shards = sorted((weights_dir / WAN_ORIGINAL_DIR).glob(DIT_WEIGHTS_GLOB))
    if not shards:
        raise WeightsError(
            f"missing DiT weights: neither {diffusers_dir / 'transformer' / DIT_WEIGHTS_GLOB} nor "
            f"{weights_dir / WAN_ORIGINAL_DIR / DIT_WEIGHTS_GLOB}; {LAYOUT}"
        )
    return load_original_wan(shards, diffusers_dir, dtype)


def load_original_wan(shards: list[Path], config_dir: Path, dtype: torch.dtype) -> nn.Module:
    """An original-format Wan DiT (one or more safetensors shards, keys as in spec section 1's
    table) converted by diffusers' single-file loader with the local config
    ``config_dir/transformer/config.json``. Every converted key is checked against the model
    first, since the single-file loader itself ignores missing keys."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    checkpoint: dict[str, Tensor] = {}
    for shard in shards:
        checkpoint.update(load_file(shard))
    converted = convert_wan_transformer_to_diffusers(dict(checkpoint))
    config = WanTransformer3DModel.load_config(config_dir, subfolder="transformer", local_files_only=True)
    with torch.device("meta"):
        expected = WanTransformer3DModel.from_config(config).state_dict()
    check_keys(converted, expected, f"the original-format DiT {shards[0].parent} (keys by their diffusers names)")
    logger.info("DiT: original format from %d shard(s) in %s", len(shards), shards[0].parent)
    return WanTransformer3DModel.from_single_file(
        converted, config=str(config_dir), subfolder="transformer", torch_dtype=dtype, local_files_only=True
    )


def fuse_lora(wan: nn.Module, path: Path) -> int:
    """Load a Wan LoRA with diffusers' LoRA loader (original or diffusers naming), fuse it
    into the DiT's weights and drop the adapter layers. Returns the LoRA tensors read.
    Raises WeightsError when peft (diffusers' LoRA backend) is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise WeightsError(f"{path} needs peft for diffusers' LoRA loader: pip install peft") from exc
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    state = WanLoraLoaderMixin.lora_state_dict(str(path))
    wan.load_lora_adapter(state, prefix="transformer", adapter_name="distill")
    wan.fuse_lora(lora_scale=1.0)
    wan.unload_lora()
    logger.info("LoRA fused from %s (%d tensors)", path, len(state))
    return len(state)


# -- everything -------------------------------------------------------------------------


def load_fantasytalking(
    weights_dir: str | Path,
    config: FantasyTalkingConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedWeights:
    """Load the FantasyTalking model from ``weights_dir`` (layout: module docstring).

    ``dtype``: of the DiT, CLIP and UMT5 (default ``config.dtype``); the VAE and wav2vec2
    run in float32. Everything goes to ``device`` except the DiT when
    ``config.group_offload`` is set (it stays on the CPU for diffusers' group offloading).
    Raises WeightsError naming the missing file and the layout, or the offending key.
    """
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel

    config = config or FantasyTalkingConfig()
    dtype = dtype or _torch_dtype(config.dtype)
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise WeightsError(f"weights directory {weights_dir} does not exist; {LAYOUT}")
    adapter_file = adapter_path(weights_dir)
    wav2vec_dir = _require(weights_dir / WAV2VEC_DIR, "the wav2vec2-base-960h directory")
    diffusers_dir = _require(weights_dir / WAN_DIFFUSERS_DIR, "the diffusers-format Wan2.1-I2V-14B-720P directory")
    for sub in ("vae", "image_encoder"):
        _require(diffusers_dir / sub / "config.json", f"the Wan {sub}")
    if (weights_dir / IDENTITY_WEIGHTS).is_file():
        _require(weights_dir / INSIGHTFACE_DIR, f"the insightface model directory that {IDENTITY_WEIGHTS} needs")
    prompt_file = weights_dir / PROMPT_EMBEDS
    if not prompt_file.is_file():
        for sub in ("text_encoder", "tokenizer"):
            _require(diffusers_dir / sub, f"the UMT5 {sub} (or a precomputed {PROMPT_EMBEDS})")

    wav2vec = Wav2Vec2Features.from_dir(wav2vec_dir, device=device)
    wan = load_wan(weights_dir, dtype)
    dim = wan.config.num_attention_heads * wan.config.attention_head_dim
    counts = {}
    if (weights_dir / LORA_WEIGHTS).is_file():
        counts["lora"] = fuse_lora(wan, weights_dir / LORA_WEIGHTS)

    adapter = read_adapter(adapter_file)
    proj_key = "proj_model.proj.weight"
    if proj_key not in adapter:
        raise WeightsError(f"missing key {proj_key!r} in {adapter_file}")
    audio_dim, feature_dim = adapter[proj_key].shape
    if feature_dim != wav2vec.hidden_size:
        raise WeightsError(
            f"{proj_key} in {adapter_file} takes {feature_dim}-d features "
            f"but {wav2vec_dir} gives {wav2vec.hidden_size}-d"
        )
    identity = identity_tensors = motion = motion_tensors = None
    if (weights_dir / IDENTITY_WEIGHTS).is_file():
        identity, identity_tensors = build_identity(weights_dir / IDENTITY_WEIGHTS, len(wan.blocks))
    if (weights_dir / MOTION_WEIGHTS).is_file():
        motion, motion_tensors = build_motion(weights_dir / MOTION_WEIGHTS, dim)
    transformer = FantasyTalkingTransformer(wan, AudioProjModel(feature_dim, audio_dim), config, identity, motion)
    counts["adapter"] = load_adapter(transformer, adapter, str(adapter_file))
    if identity is not None:
        counts["identity"] = load_exact(transformer, identity_tensors, identity_key_map(transformer),
                                        str(weights_dir / IDENTITY_WEIGHTS))
    if motion is not None:
        names = {k: f"motion_embedding.{k}" for k, _ in motion.named_parameters()}
        counts["motion"] = load_exact(transformer, motion_tensors, names, str(weights_dir / MOTION_WEIGHTS))
    # Only the added modules are cast: the DiT came in ``dtype`` with diffusers' fp32 exceptions
    # (timestep embedder, modulation tables, norms) kept.
    for module in transformer.added_modules():
        module.to(dtype=dtype)
    transformer.eval()
    if not config.group_offload:
        transformer = transformer.to(device)

    vae = AutoencoderKLWan.from_pretrained(diffusers_dir, subfolder="vae", torch_dtype=torch.float32,
                                           local_files_only=True).to(device).eval()
    image_encoder = CLIPVisionModel.from_pretrained(diffusers_dir, subfolder="image_encoder", dtype=dtype,
                                                    local_files_only=True).to(device).eval()
    loaded = LoadedWeights(transformer=transformer, vae=vae, image_encoder=image_encoder, wav2vec=wav2vec,
                           counts=counts)
    if prompt_file.is_file():
        loaded.prompt_embeds, loaded.prompt_embeds_meta = _read_safetensors(prompt_file)
    else:
        from transformers import AutoTokenizer, UMT5EncoderModel

        loaded.text_encoder = UMT5EncoderModel.from_pretrained(diffusers_dir, subfolder="text_encoder", dtype=dtype,
                                                               local_files_only=True).to(device).eval()
        loaded.tokenizer = AutoTokenizer.from_pretrained(diffusers_dir, subfolder="tokenizer", local_files_only=True)
    if identity is not None:
        loaded.identity_encoder = IdentityEncoder.from_dir(weights_dir / INSIGHTFACE_DIR)
    elif (weights_dir / INSIGHTFACE_DIR).is_dir():
        logger.info("%s not loaded: without %s there is no identity module to use it",
                    INSIGHTFACE_DIR, IDENTITY_WEIGHTS)
    logger.info("FantasyTalking weights loaded from %s: %s", weights_dir, counts)
    return loaded
