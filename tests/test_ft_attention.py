"""The attn2 processor (spec section 4): masked per-frame audio attention, identity branch,
and bit-exact agreement with diffusers' stock Wan processor when audio is off."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.fantasytalking.attention import AudioCrossAttnProcessor, BranchInputs, FrameAudio

HEADS, HEAD_DIM, DIM = 2, 8, 16
BATCH, FRAMES, PER_FRAME = 2, 3, 4
WINDOW, AUDIO_DIM, ID_DIM = 5, 6, 7
K_LENS = torch.tensor([[2, 5, 5], [5, 3, 0]])

# flex runs eagerly here (tiny sizes); its advice to compile is not for tests.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# diffusers backends that run on CPU, and torch's CPU SDPA kernels under "native".
CPU_BACKENDS = ["native", "_native_math", "_native_flash", "flex"]
SDPA_KERNELS = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]


def make_attn(seed: int = 0) -> WanAttention:
    """A Wan block's attn2 (I2V: image key/value projections) with random weights."""
    torch.manual_seed(seed)
    attn = WanAttention(DIM, heads=HEADS, dim_head=HEAD_DIM, eps=1e-6, added_kv_proj_dim=DIM,
                        cross_attention_dim_head=HEAD_DIM, processor=WanAttnProcessor())
    with torch.no_grad():
        for module in (attn.norm_q, attn.norm_k, attn.norm_added_k):
            module.weight.uniform_(0.5, 1.5)
    return attn.eval()


def make_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, FRAMES * PER_FRAME, DIM, generator=g)
    context = torch.randn(BATCH, 5 + 512, DIM, generator=g)
    audio = torch.randn(BATCH, FRAMES, WINDOW, AUDIO_DIM, generator=g)
    identity = torch.randn(BATCH, 3, ID_DIM, generator=g)
    return x, context, audio, identity


def install(attn: WanAttention, identity_dim: int | None = ID_DIM, seed: int = 2) -> AudioCrossAttnProcessor:
    torch.manual_seed(seed)
    processor = AudioCrossAttnProcessor(BranchInputs(), DIM, AUDIO_DIM, identity_dim)
    attn.set_processor(processor)
    return processor


def plain_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v per head: q [Lq, H, D], k, v [Lk, H, D] -> [Lq, H*D]."""
    weights = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", weights.softmax(-1), v).reshape(q.shape[0], -1)


def reference(attn, processor, x, context, audio, k_lens, scale, identity=None, l2=0.5):
    """Spec section 4 written out per batch item and per latent frame, no SDPA, no masks."""
    outs = []
    for b in range(x.shape[0]):
        heads = lambda t: t.reshape(t.shape[0], HEADS, HEAD_DIM)  # noqa: E731
        q = heads(attn.norm_q(attn.to_q(x[b])))
        image, text = context[b, :-512], context[b, -512:]
        total = plain_attention(q, heads(attn.norm_k(attn.to_k(text))), heads(attn.to_v(text)))
        total = total + plain_attention(
            q, heads(attn.norm_added_k(attn.add_k_proj(image))), heads(attn.add_v_proj(image)))
        audio_out = torch.zeros_like(total)
        for f in range(audio.shape[1]):
            n = int(k_lens[b, f])
            if n:
                rows = slice(f * PER_FRAME, (f + 1) * PER_FRAME)
                window = audio[b, f, :n]
                audio_out[rows] = plain_attention(
                    q[rows], heads(processor.k_proj(window)), heads(processor.v_proj(window)))
        total = total + scale[b] * audio_out
        if identity is not None:
            total = total + l2 * plain_attention(
                q, heads(processor.identity_k_proj(identity[b])), heads(processor.identity_v_proj(identity[b])))
        outs.append(attn.to_out[0](total))
    return torch.stack(outs)


def run(attn, processor, x, context, audio, k_lens, scale, identity=None):
    processor.inputs.audio = FrameAudio(audio, k_lens, scale, PER_FRAME)
    processor.inputs.identity = identity
    try:
        return attn(x, context)
    finally:
        processor.inputs.clear()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@torch.no_grad()
def test_equals_the_spec_equations(backend):
    attn = make_attn()
    processor = install(attn)
    processor._attention_backend = backend
    x, context, audio, identity = make_inputs()
    scale = torch.tensor([1.0, 0.7])
    expected = reference(attn, processor, x, context, audio, K_LENS, scale)
    assert torch.allclose(run(attn, processor, x, context, audio, K_LENS, scale), expected, atol=1e-5)
    expected = reference(attn, processor, x, context, audio, K_LENS, scale, identity)
    assert torch.allclose(run(attn, processor, x, context, audio, K_LENS, scale, identity), expected, atol=1e-5)


@pytest.mark.parametrize("kernel", SDPA_KERNELS, ids=lambda k: k.name)
@torch.no_grad()
def test_equals_the_spec_equations_on_each_sdpa_kernel(kernel):
    attn = make_attn()
    processor = install(attn)
    x, context, audio, _ = make_inputs()
    scale = torch.tensor([1.0, 1.0])
    expected = reference(attn, processor, x, context, audio, K_LENS, scale)
    with sdpa_kernel([kernel]):
        assert torch.allclose(run(attn, processor, x, context, audio, K_LENS, scale), expected, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@torch.no_grad()
def test_padded_keys_change_nothing(backend):
    attn = make_attn()
    processor = install(attn)
    processor._attention_backend = backend
    x, context, audio, _ = make_inputs()
    scale = torch.tensor([1.0, 1.0])
    before = run(attn, processor, x, context, audio, K_LENS, scale)
    noisy = audio.clone()
    g = torch.Generator().manual_seed(9)
    for b in range(BATCH):
        for f in range(FRAMES):
            n = int(K_LENS[b, f])
            noisy[b, f, n:] = 1e3 * torch.randn(WINDOW - n, AUDIO_DIM, generator=g)
    assert not torch.equal(noisy, audio)
    assert torch.equal(run(attn, processor, x, context, noisy, K_LENS, scale), before)
    # ... while a valid key does matter.
    noisy[0, 0, 0] += 1.0
    assert not torch.equal(run(attn, processor, x, context, noisy, K_LENS, scale), before)


@pytest.mark.parametrize("backend", [None, "_native_math"])
@torch.no_grad()
def test_audio_off_is_bit_identical_to_the_stock_processor(backend):
    attn = make_attn()
    if backend:
        attn.processor._attention_backend = backend
    x, context, audio, _ = make_inputs()
    stock = attn(x, context)
    processor = install(attn)
    processor._attention_backend = backend
    assert torch.equal(run(attn, processor, x, context, audio, K_LENS, torch.zeros(BATCH)), stock)
    assert torch.equal(attn(x, context), stock)  # no per-call inputs at all
    # A batch mixing an audio pass and an audio-free pass: the audio-free item is unchanged.
    mixed = run(attn, processor, x, context, audio, K_LENS, torch.tensor([1.0, 0.0]))
    assert torch.equal(mixed[1], stock[1]) and not torch.equal(mixed[0], stock[0])


@torch.no_grad()
def test_fused_projections_give_the_same_output():
    attn = make_attn()
    processor = install(attn)
    x, context, audio, identity = make_inputs()
    scale = torch.tensor([1.0, 0.5])
    plain = run(attn, processor, x, context, audio, K_LENS, scale, identity)
    attn.fuse_projections()
    assert torch.allclose(run(attn, processor, x, context, audio, K_LENS, scale, identity), plain, atol=1e-6)


@torch.no_grad()
def test_zero_identity_tokens_add_nothing():
    attn = make_attn()
    processor = install(attn)
    x, context, audio, identity = make_inputs()
    scale = torch.tensor([1.0, 1.0])
    without = run(attn, processor, x, context, audio, K_LENS, scale)
    assert torch.equal(run(attn, processor, x, context, audio, K_LENS, scale, torch.zeros_like(identity)), without)
    assert not torch.allclose(run(attn, processor, x, context, audio, K_LENS, scale, identity), without)


@torch.no_grad()
def test_sharded_queries_off_frame_boundaries_equal_the_whole():
    """Context parallelism hands each rank a slice of the video tokens; the per-frame audio
    attention of each slice, placed by its token offset, equals the unsharded result."""
    attn = make_attn()
    processor = install(attn)
    x, _, audio, _ = make_inputs()
    frame_audio = FrameAudio(audio, K_LENS, torch.ones(BATCH), PER_FRAME)
    query = attn.norm_q(attn.to_q(x)).unflatten(2, (HEADS, -1))
    whole = processor.frame_attention(query, frame_audio)
    for cuts in ([0, 6, 12], [0, 5, 9, 12], [0, 3, 7, 10, 12]):
        parts = [processor.frame_attention(query[:, a:b], frame_audio, offset=a) for a, b in zip(cuts, cuts[1:])]
        assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-6)


def test_bad_inputs_are_refused():
    attn = make_attn()
    processor = install(attn, identity_dim=None)
    x, context, audio, identity = make_inputs()
    with pytest.raises(ValueError, match="identity branch"):
        run(attn, processor, x, context, audio, K_LENS, torch.ones(BATCH), identity)
    with pytest.raises(ValueError, match="latent frames"):
        run(attn, processor, x[:, :10], context, audio, K_LENS, torch.ones(BATCH))
    with pytest.raises(ValueError, match="k_lens must be in"):
        FrameAudio(audio, K_LENS + 3, torch.ones(BATCH), PER_FRAME)
    with pytest.raises(ValueError, match="k_lens must have shape"):
        FrameAudio(audio, K_LENS[0], torch.ones(BATCH), PER_FRAME)
    with pytest.raises(ValueError, match="attn2 only"):
        processor(attn, x, None)
