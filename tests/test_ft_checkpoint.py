"""Loading FantasyTalking weights (issue 4 section 2): the released adapter's exact key layout
and count, the Wan DiT in diffusers and original format, the whole --weights directory, and
the error messages for a missing file, a wrong shape, an unknown or missing key."""
from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.errors import WeightsError  # noqa: E402
from model.fantasytalking import checkpoint as ckpt  # noqa: E402
from model.fantasytalking.config import FantasyTalkingConfig  # noqa: E402
from model.fantasytalking.transformer import TINY_WAN_CONFIG, tiny_transformer  # noqa: E402

AUDIO_IN, AUDIO_DIM, DIM, BLOCKS = 32, 16, 16, 2


def released_adapter(seed: int = 0, blocks: int = BLOCKS) -> dict[str, dict[str, torch.Tensor]]:
    """A synthetic fantasytalking_model.ckpt: the released names exactly (spec section 2),
    dims scaled down (768 -> 32 features, 2048 -> 16 audio dim, 5120 -> 16 hidden)."""
    g = torch.Generator().manual_seed(seed)
    proj_model = {
        "proj.weight": torch.randn(AUDIO_DIM, AUDIO_IN, generator=g),
        "norm.weight": torch.randn(AUDIO_DIM, generator=g),
        "norm.bias": torch.randn(AUDIO_DIM, generator=g),
    }
    audio_processor = {
        f"blocks.{i}.cross_attn.processor.{p}_proj.weight": torch.randn(DIM, AUDIO_DIM, generator=g)
        for i in range(blocks) for p in ("k", "v")
    }
    return {"proj_model": proj_model, "audio_processor": audio_processor}


def save_released(path, saved) -> None:
    if path.suffix == ".safetensors":
        save_file({f"{part}.{k}": v for part, sd in saved.items() for k, v in sd.items()}, path)
    else:
        torch.save(saved, path)


def assert_adapter_in(model, saved) -> None:
    params = dict(model.named_parameters())
    for key, tensor in saved["proj_model"].items():
        assert torch.equal(params[f"audio_proj.{key}"], tensor)
    for key, tensor in saved["audio_processor"].items():
        i, proj = re.match(r"blocks\.(\d+)\.cross_attn\.processor\.(\w+)\.weight", key).groups()
        assert torch.equal(params[f"wan.blocks.{i}.attn2.processor.{proj}.weight"], tensor)


@pytest.mark.parametrize("name", [ckpt.ADAPTER_CKPT, ckpt.ADAPTER_SAFETENSORS])
def test_released_layout_loads_with_every_tensor_counted(tmp_path, name):
    saved = released_adapter()
    save_released(tmp_path / name, saved)
    assert ckpt.adapter_path(tmp_path) == tmp_path / name
    model = tiny_transformer(seed=0, identity=False, motion=False)
    count = ckpt.load_adapter(model, ckpt.read_adapter(tmp_path / name))
    assert count == 3 + 2 * BLOCKS == 7
    assert_adapter_in(model, saved)


def test_the_real_model_takes_exactly_83_adapter_tensors():
    """The 40-block 14B configuration (built on the meta device): 83 released keys, each
    naming a parameter of the spec's shape."""
    from diffusers import WanTransformer3DModel

    from model.fantasytalking.audio_adapter import AudioProjModel
    from model.fantasytalking.transformer import FantasyTalkingTransformer

    with torch.device("meta"):
        wan = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, eps=1e-6,
            image_dim=1280, added_kv_proj_dim=5120,
        )
        model = FantasyTalkingTransformer(wan, AudioProjModel())
    names = ckpt.adapter_key_map(model.num_blocks)
    assert len(names) == 83
    params = dict(model.named_parameters())
    assert params[names["proj_model.proj.weight"]].shape == (2048, 768)
    assert params[names["proj_model.norm.bias"]].shape == (2048,)
    for i in range(40):
        for p in ("k_proj", "v_proj"):
            assert params[names[f"audio_processor.blocks.{i}.cross_attn.processor.{p}.weight"]].shape == (5120, 2048)
    assert sum(p.numel() for n, p in params.items() if n in names.values()) == pytest.approx(0.84e9, rel=0.01)


def test_renamed_key_fails_with_its_name(tmp_path):
    saved = released_adapter()
    saved["audio_processor"]["blocks.1.cross_attn.processor.to_k.weight"] = saved["audio_processor"].pop(
        "blocks.1.cross_attn.processor.k_proj.weight")
    save_released(tmp_path / ckpt.ADAPTER_CKPT, saved)
    model = tiny_transformer(seed=0, identity=False, motion=False)
    before = model.state_dict()
    renamed = "unexpected key 'audio_processor.blocks.1.cross_attn.processor.to_k.weight'"
    with pytest.raises(WeightsError, match=re.escape(renamed)):
        ckpt.load_adapter(model, ckpt.read_adapter(tmp_path / ckpt.ADAPTER_CKPT))
    # Nothing was copied before the check failed.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_key_fails_with_its_name(tmp_path):
    saved = released_adapter()
    del saved["proj_model"]["norm.bias"]
    save_released(tmp_path / ckpt.ADAPTER_SAFETENSORS, saved)
    model = tiny_transformer(seed=0, identity=False, motion=False)
    with pytest.raises(WeightsError, match=re.escape("missing key in") + ".*proj_model.norm.bias"):
        ckpt.load_adapter(model, ckpt.read_adapter(tmp_path / ckpt.ADAPTER_SAFETENSORS))
    # A model with more blocks than the checkpoint: the missing blocks are named.
    model3 = tiny_transformer(seed=0, identity=False, motion=False, num_layers=3)
    with pytest.raises(WeightsError, match="audio_processor.blocks.2.cross_attn.processor.k_proj.weight"):
        ckpt.load_adapter(model3, ckpt.read_adapter(_write(tmp_path, released_adapter())))


def _write(tmp_path, saved):
    path = tmp_path / "other" / ckpt.ADAPTER_CKPT
    path.parent.mkdir(exist_ok=True)
    save_released(path, saved)
    return path


def test_wrong_shape_fails_with_key_and_both_shapes(tmp_path):
    saved = released_adapter()
    saved["audio_processor"]["blocks.0.cross_attn.processor.v_proj.weight"] = torch.zeros(DIM, AUDIO_DIM + 1)
    model = tiny_transformer(seed=0, identity=False, motion=False)
    key = re.escape("audio_processor.blocks.0.cross_attn.processor.v_proj.weight in")
    with pytest.raises(WeightsError, match=key + ".*shape \\[16, 17\\].*expects \\[16, 16\\]"):
        ckpt.load_adapter(model, ckpt.read_adapter(_write(tmp_path, saved)))


def test_bad_top_level_and_missing_file(tmp_path):
    torch.save({"proj_model": {}, "audio_processor": {}, "optimizer": {}}, tmp_path / ckpt.ADAPTER_CKPT)
    with pytest.raises(WeightsError, match="unexpected top-level key 'optimizer'"):
        ckpt.read_adapter(tmp_path / ckpt.ADAPTER_CKPT)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=re.escape(ckpt.ADAPTER_CKPT) + ".*" + re.escape(ckpt.WAN_DIFFUSERS_DIR)):
        ckpt.adapter_path(empty)
    with pytest.raises(WeightsError, match="does not exist"):
        ckpt.load_fantasytalking(tmp_path / "nowhere")


# -- the DiT in both formats ---------------------------------------------------------------

#: diffusers name -> original Wan name, the spec's table (section 1) plus the embedders.
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    (".norm2.", ".norm3."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
]


def original_state_dict(wan) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in wan.state_dict().items():
        if key == "scale_shift_table":
            key = "head.modulation"
        elif key.startswith("proj_out."):
            key = key.replace("proj_out.", "head.head.")
        elif key.endswith(".scale_shift_table"):
            key = key.replace(".scale_shift_table", ".modulation")
        for new, old in TO_ORIGINAL:
            key = key.replace(new, old)
        out[key] = tensor.clone().contiguous()
    return out


def tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**TINY_WAN_CONFIG)
    with torch.no_grad():  # make every tensor distinct, norms included
        for p in wan.parameters():
            p.normal_()
    return wan


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_diffusers_format_dit(tmp_path):
    wan = tiny_wan()
    wan.save_pretrained(tmp_path / ckpt.WAN_DIFFUSERS_DIR / "transformer")
    assert_same_weights(ckpt.load_wan(tmp_path, torch.float32), wan)


def test_original_format_dit_through_from_single_file(tmp_path):
    wan = tiny_wan()
    wan.save_config(tmp_path / ckpt.WAN_DIFFUSERS_DIR / "transformer")
    original = original_state_dict(wan)
    assert "blocks.1.cross_attn.k_img.weight" in original and "head.head.weight" in original
    shards = tmp_path / ckpt.WAN_ORIGINAL_DIR
    shards.mkdir()
    keys = sorted(original)
    half = len(keys) // 2
    save_file({k: original[k] for k in keys[:half]}, shards / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: original[k] for k in keys[half:]}, shards / "diffusion_pytorch_model-00002-of-00002.safetensors")
    assert_same_weights(ckpt.load_wan(tmp_path, torch.float32), wan)

    # A key the model does not have is named, not ignored.
    extra = dict(original, **{"blocks.0.cross_attn.processor.k_proj.weight": torch.zeros(16, 16)})
    save_file(extra, shards / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="unexpected key 'blocks.0.attn2.processor.k_proj.weight'"):
        ckpt.load_wan(tmp_path, torch.float32)
    (shards / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing key"):
        ckpt.load_wan(tmp_path, torch.float32)


def test_dit_weights_missing_names_both_places(tmp_path):
    tiny_wan().save_config(tmp_path / ckpt.WAN_DIFFUSERS_DIR / "transformer")
    with pytest.raises(WeightsError, match=re.escape(ckpt.WAN_ORIGINAL_DIR)):
        ckpt.load_wan(tmp_path, torch.float32)


# -- the whole directory -------------------------------------------------------------------


def build_weights_dir(root, *, prompt_file: bool = True, identity: bool = False, motion: bool = False):
    """A complete tiny --weights directory; returns the saved adapter."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    wan_dir = root / ckpt.WAN_DIFFUSERS_DIR
    tiny_wan().save_pretrained(wan_dir / "transformer")
    AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(wan_dir / "vae")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(wan_dir / "image_encoder")
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=AUDIO_IN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                 conv_dim=(4,) * 7, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
                  ).save_pretrained(root / ckpt.WAV2VEC_DIR)
    saved = released_adapter()
    save_released(root / ckpt.ADAPTER_CKPT, saved)
    if prompt_file:
        save_file({"prompt": torch.randn(1, 7, 16), "negative": torch.randn(1, 9, 16)}, root / ckpt.PROMPT_EMBEDS,
                  metadata={"prompt": ""})
    else:
        save_tiny_text_encoder(wan_dir)
    if identity:
        from model.fantasytalking.identity import IdentityQFormer

        qformer = IdentityQFormer(out_dim=10, dim=8, num_tokens=3, depth=1, heads=2, context_tokens=2)
        tensors = {f"qformer.{k}": torch.randn_like(v) for k, v in qformer.state_dict().items()}
        tensors.update({f"blocks.{i}.identity_{p}_proj.weight": torch.randn(DIM, 10)
                        for i in range(BLOCKS) for p in ("k", "v")})
        save_file(tensors, root / ckpt.IDENTITY_WEIGHTS,
                  metadata={"dim": "8", "num_tokens": "3", "depth": "1", "heads": "2", "context_tokens": "2"})
    if motion:
        from model.fantasytalking.motion import MotionIntensityEmbedding

        module = MotionIntensityEmbedding(DIM, hidden_dim=8, num_tokens=4)
        save_file({k: torch.randn_like(v) for k, v in module.state_dict().items()}, root / ckpt.MOTION_WEIGHTS,
                  metadata={"hidden_dim": "8", "num_tokens": "4"})
    return saved


def save_tiny_text_encoder(wan_dir) -> None:
    """A tiny UMT5 encoder and a word-level fast tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "a", "person", "talking"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(wan_dir / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(wan_dir / "text_encoder")


def test_whole_directory_loads(tmp_path):
    saved = build_weights_dir(tmp_path)
    loaded = ckpt.load_fantasytalking(tmp_path, FantasyTalkingConfig())
    assert loaded.counts == {"adapter": 7}
    assert_adapter_in(loaded.transformer, saved)
    assert loaded.transformer.identity_qformer is None and loaded.transformer.motion_embedding is None
    assert loaded.wav2vec.hidden_size == AUDIO_IN
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert set(loaded.prompt_embeds) == {"prompt", "negative"} and loaded.prompt_embeds_meta == {"prompt": ""}
    assert loaded.vae.dtype == torch.float32 and loaded.identity_encoder is None
    # The loaded DiT is the saved one, with the audio processors installed.
    assert_same_weights(loaded.transformer.wan.blocks[0].attn1, tiny_wan().blocks[0].attn1)
    assert type(loaded.transformer.wan.blocks[1].attn2.processor).__name__ == "AudioCrossAttnProcessor"


def test_text_encoder_is_loaded_without_a_prompt_file(tmp_path):
    build_weights_dir(tmp_path, prompt_file=False)
    loaded = ckpt.load_fantasytalking(tmp_path, FantasyTalkingConfig(dtype="float32"))
    assert loaded.prompt_embeds is None
    ids = loaded.tokenizer("a person talking", return_tensors="pt").input_ids
    assert loaded.text_encoder(ids).last_hidden_state.shape == (1, ids.shape[1], 16)


def test_identity_and_motion_weights_are_loaded_and_counted(tmp_path, monkeypatch):
    build_weights_dir(tmp_path, identity=True, motion=True)
    with pytest.raises(WeightsError, match="insightface"):
        ckpt.load_fantasytalking(tmp_path)
    (tmp_path / ckpt.INSIGHTFACE_DIR).mkdir()
    monkeypatch.setattr(ckpt.IdentityEncoder, "from_dir", classmethod(lambda cls, path: cls(analyser=None)))
    loaded = ckpt.load_fantasytalking(tmp_path, FantasyTalkingConfig(dtype="bfloat16"))
    model = loaded.transformer
    assert loaded.counts["adapter"] == 7
    # bf16 everywhere except diffusers' fp32 modules (timestep embedder), which stay fp32.
    assert model.wan.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.wan.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for m in model.added_modules() for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(
            latent_input=torch.randn(1, 36, 2, 4, 4, generator=g).bfloat16(), timestep=torch.tensor([500.0]),
            text_embeds=torch.randn(1, 512, 16, generator=g).bfloat16(),
            image_embeds=torch.randn(1, 257, 12, generator=g).bfloat16(),
            audio_tokens=torch.randn(1, 2, 5, AUDIO_DIM, generator=g), audio_k_lens=torch.tensor([[3, 5]]),
            audio_scale=torch.ones(1), motion=torch.tensor([[0.2, 0.9]]),
            identity_tokens=model.identity_qformer(torch.randn(1, 512, generator=g)),
        )
    assert out.shape == (1, 16, 2, 4, 4) and out.dtype == torch.bfloat16 and bool(out.isfinite().all())
    assert loaded.counts["identity"] == len(list(model.identity_qformer.parameters())) + 2 * BLOCKS
    assert loaded.counts["motion"] == len(list(model.motion_embedding.parameters()))
    assert model.identity_qformer.out_dim == 10 and model.motion_embedding.num_tokens == 4
    assert model.motion_embedding.proj.weight.any() and model.identity_qformer.proj_out.weight.any()
    assert loaded.identity_encoder is not None


def test_missing_parts_are_named(tmp_path):
    build_weights_dir(tmp_path)
    (tmp_path / ckpt.WAV2VEC_DIR / "config.json").rename(tmp_path / "moved.json")
    with pytest.raises(WeightsError, match="wav2vec2 directory .*config.json"):
        ckpt.load_fantasytalking(tmp_path)
    (tmp_path / ckpt.PROMPT_EMBEDS).unlink()
    with pytest.raises(WeightsError, match="text_encoder"):
        ckpt.load_fantasytalking(tmp_path)


def test_lora_is_fused_with_diffusers_loader(tmp_path, monkeypatch):
    """A LoRA goes through diffusers' Wan LoRA loader (peft backend) and is fused into the DiT."""
    import sys

    wan = tiny_wan()
    lora = {}
    g = torch.Generator().manual_seed(0)
    for i in range(BLOCKS):
        lora[f"transformer.blocks.{i}.attn1.to_q.lora_A.weight"] = torch.randn(2, DIM, generator=g)
        lora[f"transformer.blocks.{i}.attn1.to_q.lora_B.weight"] = torch.randn(DIM, 2, generator=g)
    save_file(lora, tmp_path / ckpt.LORA_WEIGHTS)
    before = [block.attn1.to_q.weight.detach().clone() for block in wan.blocks]
    assert ckpt.fuse_lora(wan, tmp_path / ckpt.LORA_WEIGHTS) == len(lora)
    for i, block in enumerate(wan.blocks):
        prefix = f"transformer.blocks.{i}.attn1.to_q"
        delta = lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
        assert torch.allclose(block.attn1.to_q.weight, before[i] + delta, atol=1e-5)
        assert type(block.attn1.to_q) is torch.nn.Linear  # adapter layers dropped after fusing
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(WeightsError, match="pip install peft"):
        ckpt.fuse_lora(tiny_wan(), tmp_path / ckpt.LORA_WEIGHTS)
