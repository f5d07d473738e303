"""Unit tests of the model against values computed by hand from the SPEC formulas (RMSNorm, RoPE, YaRN,
MLA, the router, the grouped experts, MTP alignment, causality, and the DeepSeek-V3 sizes of SPEC §1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek.model.experts as experts_mod
import nanoseek.model.moe as moe_mod
from nanoseek.config import ModelConfig
from nanoseek.model import DeepSeekV3, count_parameters, cpu_grouped_mm, kv_cache_elements_per_token
from nanoseek.model.attention import MultiHeadLatentAttention, causal_attention_lowp
from nanoseek.model.layers import Linear, RMSNorm, linear
from nanoseek.model.moe import MoE, RoutedExperts, Router
from nanoseek.model.rope import (
    RotaryEmbedding,
    apply_rope,
    rope_attention_factor,
    rope_frequencies,
    yarn_correction_range,
)


def small_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, rope_factor=4.0, original_max_position_embeddings=8,
        max_position_embeddings=32, num_nextn_predict_layers=2, initializer_range=0.1)
    base.update(changes)
    return ModelConfig(**base)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """SPEC §2: y = w * x / sqrt(mean(x^2) + eps)."""
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------ RMSNorm
def test_rmsnorm_by_hand():
    norm = RMSNorm(4, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
    y = norm(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # mean(x^2) = 30 / 4 = 7.5; + eps = 8; 1 / sqrt(8) = 0.35355339
    r = 1 / math.sqrt(8.0)
    expected = torch.tensor([1 * 1 * r, 0.5 * 2 * r, 2 * 3 * r, -1 * 4 * r])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_rmsnorm_fp32_gradients_are_the_formulas():
    """fp32 runs as one fused op: its gradients (input and weight) equal autograd through the formula."""
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = torch.randn(3, 16, requires_grad=True)
    g = torch.randn(3, 16)
    norm(x).backward(g)
    x2 = x.detach().clone().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    (w2 * x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(norm.weight.grad, w2.grad)


def test_rmsnorm_bf16_computes_in_fp32():
    """SPEC §2 in bf16: x / sqrt(mean(x^2) + eps) computed in fp32, rounded to bf16, then times the weight. Equal
    element for element to that formula by hand; the same norm computed in bf16 differs in ~46% of elements."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(2048, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(2048, generator=g))
    x = (torch.randn(4, 2048, generator=g) * 3).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    expected = norm.weight * (x32 / torch.sqrt((x32 ** 2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(y, expected)


# ------------------------------------------------------------------------------------------ RoPE
def test_a_single_bf16_row_on_the_cpu_is_a_matrix_vector_product(monkeypatch):
    """layers.linear: one bf16 row (decoding at batch 1) runs torch.mv, equal to the exact product of the bf16
    inputs up to the output's rounding; several rows, fp32, fp16 and autocast keep F.linear. The Linear layer
    has nn.Linear's parameters (weight only) and uses it."""
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *args: calls.append(args[0].shape) or real_mv(*args))
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 32, generator=g).bfloat16(), torch.randn(1, 1, 32, generator=g).bfloat16()
    out = linear(x, w)
    assert calls == [(48, 32)] and out.shape == (1, 1, 48) and out.dtype == torch.bfloat16
    exact = F.linear(x.double(), w.double())
    torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=8e-3)  # bf16 keeps 8 bits of mantissa
    calls.clear()
    torch.testing.assert_close(linear(x.expand(1, 3, 32), w), F.linear(x.expand(1, 3, 32), w), atol=0, rtol=0)
    torch.testing.assert_close(linear(x.float(), w.float()), F.linear(x.float(), w.float()), atol=0, rtol=0)
    linear(x.half(), w.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x.float(), w.float())
    assert calls == []
    layer = Linear(32, 48).bfloat16()
    assert list(layer.state_dict()) == ["weight"]
    layer(x)
    assert calls == [(48, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_16_bit_products_of_many_rows_run_in_fp32(monkeypatch, dtype):
    """On a CPU without native bf16 / fp16 products (AVX2 only), layers.linear and experts.expert_ffn multiply
    EMULATED_ROWS rows or more in fp32 and round the result once: the fp32 product of the same 16-bit values.
    Fewer rows, a CPU with native products, and autocast keep the 16-bit kernels; so do the routes that
    low_precision_cpu picks for oneDNN's native paths. torch.compile takes the eager route."""
    from nanoseek.model.layers import EMULATED_ROWS, low_precision_cpu

    native = {"bf16": True, "fp16": True}
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: native["bf16"])
    monkeypatch.setattr("nanoseek.devices.native_fp16", lambda device: native["fp16"])
    seen = []
    real_linear, real_grouped = F.linear, experts_mod._grouped_mm
    monkeypatch.setattr(F, "linear", lambda x, w, *a: seen.append(x.dtype) or real_linear(x, w, *a))
    monkeypatch.setattr(experts_mod, "_grouped_mm", lambda x, w, offs: seen.append(x.dtype) or real_grouped(x, w, offs))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 32, generator=g).to(dtype)
    x = torch.randn(2, EMULATED_ROWS // 2, 32, generator=g).to(dtype)  # (B, T, D): EMULATED_ROWS rows
    gate_up, down = torch.randn(4, 32, 16, generator=g).to(dtype), torch.randn(4, 16, 16, generator=g).to(dtype)
    x_SD, counts = torch.randn(32, 16, generator=g).to(dtype), torch.tensor([10, 0, 16, 6])
    fp32_ffn = experts_mod.expert_ffn(x_SD.float(), counts, gate_up.float(), down.float()).to(dtype)

    native["bf16" if dtype == torch.bfloat16 else "fp16"] = False
    seen.clear()
    out = linear(x, w)
    assert seen == [torch.float32] and out.dtype == dtype
    assert torch.equal(out, F.linear(x.float(), w.float()).to(dtype))
    seen.clear()
    assert torch.equal(experts_mod.expert_ffn(x_SD, counts, gate_up, down), fp32_ffn)
    assert seen and set(seen) == {torch.float32}
    assert not low_precision_cpu(x)
    seen.clear()
    linear(x[:, 1:], w)  # one row short
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x.float(), w.float())
    assert seen == [dtype, torch.float32]  # (autocast casts inside F.linear)

    native["bf16"] = native["fp16"] = True
    seen.clear()
    linear(x, w)
    experts_mod.expert_ffn(x_SD, counts, gate_up, down)
    assert seen and set(seen) == {dtype}
    assert low_precision_cpu(x)
    if dtype == torch.bfloat16:  # compiled: the same route, the device asked while tracing
        asked = []
        monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: asked.append(device.type) and False)
        compiled = torch.compile(linear, fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x, w), F.linear(x.float(), w.float()).to(dtype)) and asked == ["cpu"]


def test_rope_interleaved_pairs_by_hand():
    cfg = small_config(qk_rope_head_dim=4, rope_theta=100.0, rope_scaling_type=None, rope_factor=1.0)
    # theta_i = base^(-2i/d_R): theta_0 = 1, theta_1 = 100^(-1/2) = 0.1
    torch.testing.assert_close(rope_frequencies(cfg), torch.tensor([1.0, 0.1]))
    cos, sin = RotaryEmbedding(cfg)(torch.tensor([[3]]))  # position 3: angles 3 and 0.3
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    y = apply_rope(x, cos, sin).flatten()
    a, b = 3.0, 0.3
    expected = torch.tensor([
        1 * math.cos(a) - 2 * math.sin(a), 2 * math.cos(a) + 1 * math.sin(a),  # pair (x0, x1) by 3 * theta_0
        3 * math.cos(b) - 4 * math.sin(b), 4 * math.cos(b) + 3 * math.sin(b),  # pair (x2, x3) by 3 * theta_1
    ])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("compiling", [False, True])
def test_rope_on_views_at_odd_offsets_and_strides(compiling, monkeypatch):
    """The rope part of a query is a view into a wider head; with odd widths (e.g. 33 + 16) its pairs are not
    aligned for a complex view: the result is still the pairwise rotation, and bf16 comes back as bf16. The same
    for the real-arithmetic form that a traced forward takes (torch.compile generates no complex ops), run eagerly."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    g = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.randn(2, 3, 4, 33 + 16, generator=g).to(dtype)
        x = head[..., 33:]  # offset 33, head stride 49: both odd
        y = apply_rope(x, cos, sin)
        xf = x.float()
        c, s_ = cos[:, :, None], sin[:, :, None]  # (1, 3, 1, 8)
        even, odd = xf[..., 0::2], xf[..., 1::2]
        expected = torch.stack((even * c - odd * s_, odd * c + even * s_), dim=-1).flatten(-2)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), expected.to(dtype).float())


def test_rope_relative_position():
    cfg = small_config(qk_rope_head_dim=16)  # YaRN-scaled frequencies, attention factor 1
    rot = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g).unbind(0)

    def score(m: int, n: int) -> float:
        cos, sin = rot(torch.tensor([[m, n]]))  # (1, 2, 8)
        qk = apply_rope(torch.stack((q, k)).view(1, 2, 1, 16), cos, sin).view(2, 16)
        return float(qk[0] @ qk[1])

    ref = score(5, 2)
    for m, n in [(9, 6), (20, 17), (3, 0)]:
        assert score(m, n) == pytest.approx(ref, abs=1e-5)
    assert abs(score(5, 3) - ref) > 1e-3  # a different offset gives a different score


# ------------------------------------------------------------------------------------------ YaRN
def test_yarn_deepseek_v3_by_hand():
    cfg = ModelConfig.preset("deepseek-v3")
    d, base, L, s = 64, 10000.0, 4096, 40.0

    def corr(r):  # SPEC §2
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(base))

    assert (math.floor(corr(32)), math.ceil(corr(1))) == (10, 23)
    assert yarn_correction_range(32, 1, d, base, L) == (10, 23)
    m = 0.1 * math.log(40) + 1
    assert m == pytest.approx(1.3689, abs=1e-4)
    assert cfg.softmax_scale == pytest.approx((128 + 64) ** -0.5 * m * m, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=5e-6)
    assert rope_attention_factor(cfg) == 1.0

    theta = rope_frequencies(cfg)
    assert theta.shape == (32,) and theta.dtype == torch.float32
    for i, ramp in [(0, 0.0), (5, 0.0), (10, 0.0), (11, 1 / 13), (16, 6 / 13), (22, 12 / 13), (23, 1.0), (31, 1.0)]:
        assert min(max((i - 10) / 13, 0.0), 1.0) == pytest.approx(ramp)
        t = base ** (-2 * i / d)
        expected = t / s * ramp + t * (1 - ramp)
        assert float(theta[i]) == pytest.approx(expected, rel=1e-6), i
    # i = 16 by hand: theta_16 = 1e4^(-0.5) = 0.01; 0.01 / 40 * 6/13 + 0.01 * 7/13
    assert float(theta[16]) == pytest.approx(0.01 / 40 * 6 / 13 + 0.01 * 7 / 13, rel=1e-6)
    cos, sin = RotaryEmbedding(cfg)(torch.tensor([[1000]]))
    assert float(cos[0, 0, 16]) == pytest.approx(math.cos(1000 * float(theta[16])), abs=1e-4)


def test_yarn_mscale_factors():
    v2 = ModelConfig.preset("deepseek-v2")  # mscale = mscale_all_dim = 0.707
    m = 0.1 * 0.707 * math.log(40) + 1
    assert v2.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    assert rope_attention_factor(v2) == pytest.approx(1.0)
    cfg = small_config(rope_factor=40.0, mscale=1.0, mscale_all_dim=0.5)
    ratio = (0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1)
    assert rope_attention_factor(cfg) == pytest.approx(ratio, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(16 ** -0.5 * (0.05 * math.log(40) + 1) ** 2, rel=1e-12)
    cos, sin = RotaryEmbedding(cfg)(torch.tensor([[0]]))  # angle 0: cos = factor, sin = 0
    torch.testing.assert_close(cos, torch.full_like(cos, ratio))
    plain = small_config(rope_scaling_type=None, rope_factor=1.0)
    assert plain.softmax_scale == 16 ** -0.5 and rope_attention_factor(plain) == 1.0
    torch.testing.assert_close(rope_frequencies(plain), 10000.0 ** (-torch.arange(0, 8, 2) / 8))


@pytest.mark.parametrize("theta, dim, orig, fast, slow, factor, corr_range", [
    (100.0, 16, 64, 4.0, 0.25, 4.0, (1, 7)),  # other betas: corr(4) = 1.62, corr(0.25) = 6.44, the ramp over dims 1..7
    (10.0, 16, 64, 32.0, 0.1, 8.0, (0, 15)),  # corr(0.1) = 16.06 > d_R - 1: high clamped to 15, not 16 or 17
    (10000.0, 8, 4, 32.0, 1.0, 2.0, (0, 0)),  # corr(1) = -0.2: low = high = 0, a zero-width ramp (no 0/0)
])
def test_yarn_frequencies_match_transformers(theta, dim, orig, fast, slow, factor, corr_range):
    """YaRN's theta'_i and cos/sin factor (SPEC §2) equal transformers' yarn where the V3 settings never go: other
    beta_fast / beta_slow, a correction range clamped at d_R - 1, and an empty ramp."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    yarn = dict(rope_theta=theta, original_max_position_embeddings=orig, beta_fast=fast, beta_slow=slow,
                mscale=1.0, mscale_all_dim=0.5)
    cfg = small_config(qk_rope_head_dim=dim, rope_factor=factor, max_position_embeddings=int(orig * factor), **yarn)
    assert yarn_correction_range(fast, slow, dim, theta, orig) == corr_range
    hf = DeepseekV3Config(hidden_size=32, num_attention_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=dim, v_head_dim=8,
                          max_position_embeddings=int(orig * factor),
                          rope_parameters=dict(rope_type="yarn", factor=factor, **yarn))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg), inv_freq, atol=0, rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(attention_factor, rel=1e-12)


# ------------------------------------------------------------------------------------------ MLA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_matches_absorbed_latent_attention(dtype):
    """SPEC §3 written out per head over the cached latent (absorbed W_UK / W_UV) equals the module: causal in
    fp32; in bf16 on the CPU with an explicit mask of two packed documents (tokens 0-2, 3-6), which the module
    must follow rather than the causal mask of its maskless low-precision path (the formulas below then run in
    fp32 on the same bf16-rounded weights and inputs)."""
    cfg = small_config(num_attention_heads=3, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5,
                       kv_lora_rank=12, q_lora_rank=10, rope_factor=2.0, mscale=1.0, mscale_all_dim=0.8)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, H, dh, dR, dv, dc = 2, 7, 3, 4, 6, 5, 12
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(T)[None])
    keep = torch.ones(T, T, dtype=torch.bool).tril()  # causal
    if dtype == torch.float32:
        out = attn(x, cos, sin)
    else:
        doc = (torch.arange(T) >= 3).long()
        keep = keep & (doc[:, None] == doc[None, :])  # each token sees the earlier tokens of its own document
        attn.to(dtype)
        x = x.to(dtype)
        out = attn(x, cos, sin, keep.expand(B, 1, T, T)).float()
        attn.float()
        x = x.float()

    rot = torch.complex(cos, sin)  # (1, T, dR/2), includes the attention factor

    def rope(v):  # DeepSeek's reference: complex view of consecutive pairs
        vc = torch.view_as_complex(v.reshape(*v.shape[:-1], -1, 2).contiguous())
        r = rot if v.dim() == 3 else rot.unsqueeze(2)
        return torch.view_as_real(vc * r).flatten(-2)

    c_q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, 1e-6)
    q = (c_q @ attn.q_b_proj.weight.T).view(B, T, H, dh + dR)
    q_c, q_r = q[..., :dh], rope(q[..., dh:])
    kv_a = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = rms(kv_a[..., :dc], attn.kv_a_layernorm.weight, 1e-6)  # (B, T, dc): what the cache holds
    k_r = rope(kv_a[..., dc:])  # (B, T, dR), shared by all heads
    w = attn.kv_b_proj.weight.view(H, dh + dv, dc)  # per head: first d_h rows k^C, then d_v rows v
    w_uk, w_uv = w[:, :dh], w[:, dh:]
    q_lat = torch.einsum("bthd,hdc->bthc", q_c, w_uk)  # W_UK^T q^C
    scale = (dh + dR) ** -0.5 * (0.1 * 0.8 * math.log(2.0) + 1) ** 2
    scores = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv) + torch.einsum("bthr,bsr->bhts", q_r, k_r)) * scale
    p = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    o_c = torch.einsum("bhts,bsc->bthc", p, c_kv)
    o = torch.einsum("bthc,hvc->bthv", o_c, w_uv).reshape(B, T, H * dv)
    expected = o @ attn.o_proj.weight.T
    tol = 1e-5 if dtype == torch.float32 else 0.02 * expected.abs().max().item()  # bf16: 8 bits of mantissa
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ router
def _router(hidden: int, **changes) -> Router:
    cfg = small_config(hidden_size=hidden, n_routed_experts=hidden, **changes)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(hidden))  # logits = x
    router.weight.requires_grad_(False)
    return router


def _logit(p):
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def _sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in idx]


def _gate_of(weights, idx, expert):
    row = (idx == expert).nonzero()
    return float(weights.detach()[row[0, 0], row[0, 1]])


# 16 experts in 4 groups of 4. sigmoid scores:
#   g0 [0.95 .05 .05 .05]: top-2 sum 1.00, max .95, sum 1.10
#   g1 [0.60 .58 .10 .10]: top-2 sum 1.18, max .60
#   g2 [0.70 .55 .50 .50]: top-2 sum 1.25, max .70, sum 2.25
#   g3 [0.45 .45 .45 .45]: top-2 sum 0.90,           sum 1.80
S16 = [0.95, 0.05, 0.05, 0.05, 0.60, 0.58, 0.10, 0.10, 0.70, 0.55, 0.50, 0.50, 0.45, 0.45, 0.45, 0.45]


@pytest.mark.parametrize("T", [1, 7, 64])
def test_low_precision_causal_attention_matches_fp32(T):
    """The two-block bf16 attention equals fp32 causal attention within bf16 rounding, values and gradients."""
    torch.manual_seed(0)
    B, H, d, dv = 2, 3, 24, 16
    q, k, v = (torch.randn(B, H, T, n) for n in (d, d, dv))
    scale = 0.3
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention_lowp(*low, scale)
    expected = F.scaled_dot_product_attention(*ref, is_causal=True, scale=scale)
    assert out.dtype == torch.bfloat16 and out.shape == (B, H, T, dv)
    torch.testing.assert_close(out.float(), expected, atol=0.03, rtol=0.03)
    probe = torch.randn(B, H, T, dv)
    (out.float() * probe).sum().backward()
    (expected * probe).sum().backward()
    for a, b in zip(low, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=0.05 * b.grad.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
def test_mla_low_precision_training_path_matches_fused_kernel(mode, monkeypatch):
    """bf16 on a CPU with native bf16 products, without a mask: MLA runs causal_attention_lowp, close to the fused
    SDPA kernel's result. (Where bf16 is emulated, the fused kernel runs: test_emulated_16_bit_products...)"""
    import nanoseek.model.attention as attn_mod

    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)

    cfg = small_config(num_attention_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg)
    if mode == "bf16_weights":
        attn.to(torch.bfloat16)
    x = torch.randn(2, 12, cfg.hidden_size, dtype=attn.o_proj.weight.dtype)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(12)[None])
    calls = []
    real = attn_mod.causal_attention_lowp
    monkeypatch.setattr(attn_mod, "causal_attention_lowp", lambda *a: calls.append(1) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = attn(x, cos, sin)
        assert len(calls) == 1
        monkeypatch.setattr(attn_mod, "LOWP_SCORES_BUDGET", 0)  # the fused kernel instead
        fused = attn(x, cos, sin)
    assert len(calls) == 1 and out.dtype == fused.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fused.float(), atol=0.02 * fused.abs().max().item(), rtol=0.02)


def test_router_sigmoid_noaux_tc_by_hand():
    router = _router(16, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    x = _logit(S16)[None]
    w, idx, scores = router(x)
    torch.testing.assert_close(scores[0], torch.tensor(S16), atol=1e-6, rtol=0)
    # groups by top-2 sum: g2 (1.25) and g1 (1.18); expert 0 (0.95, the best) sits in a dropped group
    assert _sets(idx) == [{8, 4, 5}]
    for e, s in [(8, 0.70), (4, 0.60), (5, 0.58)]:
        assert _gate_of(w, idx, e) == pytest.approx(s / 1.88 * 2.5, rel=1e-5)
    assert float(w.sum()) == pytest.approx(2.5, rel=1e-6)  # normalized over k, times the scale


def test_router_bias_changes_selection_not_gates():
    router = _router(16, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    x = _logit(S16)[None]
    # bias lifts expert 9 (0.55 -> 0.75) inside a kept group: selected, but its gate uses the unbiased 0.55
    router.e_score_correction_bias[9] = 0.2
    w, idx, _ = router(x)
    assert _sets(idx) == [{9, 8, 4}]
    for e, s in [(9, 0.55), (8, 0.70), (4, 0.60)]:
        assert _gate_of(w, idx, e) == pytest.approx(s / 1.85 * 2.5, rel=1e-5)
    # bias on g3 [0.5, 0.4, 0, 0] -> biased g3 [.95 .85 .45 .45] (top-2 sum 1.8): groups g3 and g2 are kept
    router.e_score_correction_bias.zero_()
    router.e_score_correction_bias[12:16] = torch.tensor([0.5, 0.4, 0.0, 0.0])
    w, idx, _ = router(x)
    assert _sets(idx) == [{12, 13, 8}]
    for e, s in [(12, 0.45), (13, 0.45), (8, 0.70)]:
        assert _gate_of(w, idx, e) == pytest.approx(s / 1.60 * 2.5, rel=1e-5)


def test_router_masks_dropped_groups_with_minus_inf():
    """SPEC §11: with every biased score negative, a 0.0 fill (transformers) would select experts of dropped
    groups; DeepSeek's -inf keeps the selection inside the kept groups."""
    router = _router(16, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    router.e_score_correction_bias.fill_(-1.0)  # biased g0..g3 top-2 sums: -1.0, -0.82, -0.75, -1.1
    w, idx, _ = router(_logit(S16)[None])
    assert _sets(idx) == [{8, 4, 5}]  # g2 and g1 kept
    for e, s in [(8, 0.70), (4, 0.60), (5, 0.58)]:
        assert _gate_of(w, idx, e) == pytest.approx(s / 1.88 * 2.5, rel=1e-5)


def test_router_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    router = Router(small_config(hidden_size=32, n_routed_experts=16))
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(20, 32)
    expected = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got[0].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_router_without_group_limit_and_without_norm():
    router = _router(16, n_group=4, topk_group=4, num_experts_per_tok=3, routed_scaling_factor=1.5,
                     norm_topk_prob=False)
    w, idx, _ = router(_logit(S16)[None])
    assert _sets(idx) == [{0, 8, 4}]  # plain top-3 when every group is allowed
    for e, s in [(0, 0.95), (8, 0.70), (4, 0.60)]:
        assert _gate_of(w, idx, e) == pytest.approx(s * 1.5, rel=1e-5)  # not normalized, only scaled


# softmax experts: 8 experts in 4 groups of 2, weights u (softmax of log u = u / 21.7)
#   g0 [6, 1] max 6 sum 7 | g1 [5, .5] max 5 sum 5.5 | g2 [4.5, 4.4] max 4.5 sum 8.9 | g3 [.2, .1]
U8 = [6.0, 1.0, 5.0, 0.5, 4.5, 4.4, 0.2, 0.1]


@pytest.mark.parametrize("method, norm, model_type, expected", [
    ("greedy", False, "deepseek_v2", {0, 2, 4}),               # the global top-3
    ("group_limited_greedy", False, "deepseek_v2", {0, 2, 1}),  # groups by max: g0 (6), g1 (5)
    ("group_limited_greedy", True, "deepseek_v2", {0, 2, 1}),   # normalized, then not scaled (DeepSeek-V2's code)
    ("group_limited_greedy", True, "deepseek_v3", {0, 2, 1}),   # normalized, then scaled (DeepSeek-V3's code)
])
def test_router_softmax_by_hand(method, norm, model_type, expected):
    router = _router(8, scoring_func="softmax", topk_method=method, n_group=4, topk_group=2, num_experts_per_tok=3,
                     routed_scaling_factor=16.0, norm_topk_prob=norm, model_type=model_type)
    assert router.e_score_correction_bias is None
    x = torch.log(torch.tensor(U8))[None]
    w, idx, scores = router(x)
    total = sum(U8)
    torch.testing.assert_close(scores[0], torch.tensor(U8) / total)
    assert _sets(idx) == [expected]
    chosen = sum(U8[e] for e in expected)
    for e in expected:
        g = U8[e] / chosen if norm else 16.0 * U8[e] / total
        scale = 16.0 if norm and model_type == "deepseek_v3" else 1.0
        assert _gate_of(w, idx, e) == pytest.approx(scale * g, rel=1e-5)


def test_router_gates_carry_the_gradient_to_the_centroids():
    """The gates g_i = s_i / sum_k s_k * scale (V3 eqs. 13-15) are how the language loss trains the centroids e_i:
    the gradient of sum_k g_k c_{i_k} (c a weight per expert, so the slot order does not matter) equals autograd
    through the formula written out in float64 (no group limit, zero bias: the selection is the plain top-3)."""
    torch.manual_seed(0)
    router = Router(small_config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1,
                                 routed_scaling_factor=2.5))
    torch.nn.init.normal_(router.weight, std=0.5)
    x, c = torch.randn(5, 16), torch.randn(8)
    w, idx, _ = router(x)
    (w * c[idx]).sum().backward()

    e = router.weight.detach().double().requires_grad_()
    s = torch.sigmoid(x.double() @ e.T)  # (T, E)
    top = s.detach().topk(3, dim=-1).indices
    assert _sets(idx) == _sets(top)
    g = s.gather(1, top) / s.gather(1, top).sum(-1, keepdim=True) * 2.5
    (g * c.double()[top]).sum().backward()
    assert router.weight.grad is not None
    torch.testing.assert_close(router.weight.grad.double(), e.grad, atol=1e-6, rtol=1e-5)


def test_router_top1_normalized_gate_is_the_scale():
    router = _router(16, n_group=4, topk_group=2, num_experts_per_tok=1, routed_scaling_factor=2.5)
    w, idx, _ = router(_logit(S16)[None])
    assert idx.tolist() == [[8]] and float(w) == pytest.approx(2.5)  # s / sum(s) = 1


# ------------------------------------------------------------------------------------------ experts
def naive_experts(x, weights, idx, gate_up, down):
    """sum_k g_k down_e(silu(gate_e x) * up_e x), one token and one slot at a time."""
    F_ = down.shape[-1]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = F.silu(gate_up[e, :F_] @ x[t]) * (gate_up[e, F_:] @ x[t])
            acc = acc + weights[t, k] * (down[e] @ h)
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["grouped_mm", "forced_fallback", "unaligned_fallback"])
def test_routed_experts_match_naive_loop(path, monkeypatch):
    hidden, width = (10, 6) if path == "unaligned_fallback" else (16, 8)  # 40-byte rows are not 16-byte aligned
    cfg = small_config(hidden_size=hidden, moe_intermediate_size=width, n_routed_experts=8, num_experts_per_tok=3)
    torch.manual_seed(0)
    experts = RoutedExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    T, K, E = 11, 3, 8
    x = torch.randn(T, hidden, requires_grad=True)
    weights = torch.rand(T, K, requires_grad=True)
    idx = torch.stack([torch.randperm(6)[:K] for _ in range(T)])  # experts 6 and 7 get no token
    aligned = experts_mod._grouped_mm_ok(x, experts.gate_up_proj, experts.down_proj)
    assert aligned == (path != "unaligned_fallback")
    if path == "forced_fallback":
        monkeypatch.setattr(experts_mod, "_grouped_mm_ok", lambda *a: False)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))

    out, counts = experts(x, weights, idx)
    assert len(calls) == (2 if path == "grouped_mm" else 0)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    assert int(counts.sum()) == T * K and counts[6] == 0 and counts[7] == 0

    ref_params = [p.detach().clone().requires_grad_() for p in (x, weights, experts.gate_up_proj, experts.down_proj)]
    expected = naive_experts(ref_params[0], ref_params[1], idx, ref_params[2], ref_params[3])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    for got, ref in zip((x, weights, experts.gate_up_proj, experts.down_proj), ref_params):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_few_rows_loop_over_the_used_experts(monkeypatch):
    """Below E / 8 rows (decoding with many experts) the used experts run one by one, with the same result."""
    E, D, F = 64, 16, 8
    torch.manual_seed(0)
    gate_up, down = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    experts_of_rows = [3, 3, 10, 40, 40, 40, 63]  # 7 rows sorted by expert: 8 x 7 < 64
    x = torch.randn(len(experts_of_rows), D)
    counts = torch.bincount(torch.tensor(experts_of_rows), minlength=E)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = experts_mod.expert_ffn(x, counts, gate_up, down)
    assert not calls
    for row, e in enumerate(experts_of_rows):
        gate, up = (gate_up[e] @ x[row]).chunk(2)
        torch.testing.assert_close(out[row], down[e] @ (torch.nn.functional.silu(gate) * up))
    experts_mod.expert_ffn(torch.cat([x, x]), counts * 2, gate_up, down)  # 14 rows: 8 x 14 >= 64
    assert len(calls) == 2


def test_compiled_fp32_experts_are_one_graph_with_eager_results():
    """fp32 routed experts under torch.compile: grouped_mm as nanoseek's custom op (torch 2.13 traces the native
    one in bf16 only), one graph (fullgraph: the per-expert loop's counts.tolist() would break it), with eager
    mode's output and gradients, an empty expert included."""
    E, D, F = 8, 32, 16
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 7, 3, 9, 1, 0, 7])
    leaves = [torch.randn(int(counts.sum()), D), torch.randn(E, 2 * F, D), torch.randn(E, D, F)]
    dy = torch.randn(int(counts.sum()), D)
    results = []
    for ffn in (experts_mod.expert_ffn, torch.compile(experts_mod.expert_ffn, fullgraph=True)):
        x, gate_up, down = (t.clone().requires_grad_() for t in leaves)
        out = ffn(x, counts, gate_up, down)
        (out * dy).sum().backward()
        results.append([out.detach(), x.grad, gate_up.grad, down.grad])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert results[0][2][1].abs().sum() == 0 and results[0][3][6].abs().sum() == 0  # experts 1, 6 got no rows


def test_one_token_runs_its_experts_in_turn_with_the_same_result():
    """A single token (decoding at batch 1) takes the T x K-products path: output, gradients and counts equal the
    sorted path's for the same token (taken from a batch of two copies of it)."""
    cfg = small_config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                       n_group=1, topk_group=1, topk_method="greedy")
    torch.manual_seed(1)
    experts = RoutedExperts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 32)
    idx = torch.tensor([[5, 0, 2]])
    w = torch.rand(1, 3)
    out, counts = experts(x, w, idx)
    out.sum().backward()
    grads = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    out2, counts2 = experts(torch.cat([x, x]), torch.cat([w, w]), torch.cat([idx, idx]))  # the sorted path
    (out2[:1].sum()).backward()
    torch.testing.assert_close(out, out2[:1])
    assert torch.equal(counts * 2, counts2) and counts.tolist() == [1, 0, 1, 0, 0, 1, 0, 0]
    for g, p in zip(grads, experts.parameters()):
        torch.testing.assert_close(g, p.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = experts(x, w, idx)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, out, atol=0.05 * out.abs().max().item(), rtol=0.05)


def observe_grouped_products(monkeypatch, record) -> None:
    """record(rows, offs) at each grouped product of expert_ffn's forward, whichever runs it: torch._grouped_mm,
    or nanoseek's bf16 CPU kernel (cpu_grouped_mm) where it runs."""
    real, real_kernel = torch._grouped_mm, cpu_grouped_mm.grouped_mm_bf16
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, *r, **k: record(a, k["offs"]) or real(a, *r, **k))
    monkeypatch.setattr(cpu_grouped_mm, "grouped_mm_bf16",
                        lambda x, w, offs: record(x, offs) or real_kernel(x, w, offs))


def four_routed_experts() -> RoutedExperts:
    """Routed experts of the padding tests: 4 experts (d 32, width 16, top-2, one group), weights N(0, 0.3^2)."""
    cfg = small_config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                       n_group=1, topk_group=1)
    experts = RoutedExperts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def test_padded_counts_by_hand():
    """Multiples of 32 up to 1024 rows, then of 1/32 of the count's power of two; empty experts stay empty."""
    counts = torch.tensor([0, 1, 31, 32, 33, 1000, 1024, 1025, 2048, 3000, 5000])
    assert experts_mod.padded_counts(counts).tolist() == [0, 32, 32, 32, 64, 1024, 1024, 1088, 2048, 3072, 5120]


def test_compiled_embedding_gradient_sums_rows_in_fp32():
    """The embedding with gradients takes the custom-op backward (under torch.compile ATen's kernel, not Inductor's
    atomic scatter): compiled and eager give the same gradient in fp32, and in bf16 each token's rows summed in
    fp32 and rounded once: 1 + 2^-8 + 2^-8 is 1 + 2^-7, where adding in bf16 would lose both halves."""
    from nanoseek.model.embedding import Embedding, embedding_grad

    torch.manual_seed(0)
    emb = Embedding(10, 16)
    ids = torch.tensor([[3, 1, 3], [0, 3, 9]])
    grad = torch.randn(2, 3, 16)
    grads = []
    for fn in (emb, torch.compile(emb, fullgraph=True, backend="aot_eager")):
        emb.weight.grad = None
        out = fn(ids)
        torch.testing.assert_close(out, emb.weight.detach()[ids], rtol=0, atol=0)
        out.backward(grad)
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[1][3], grad[0, 0] + grad[0, 2] + grad[1, 1])
    assert grads[1][[2, 4, 5, 6, 7, 8]].abs().sum() == 0

    rows = torch.tensor([[1.0], [2.0 ** -8], [2.0 ** -8]], dtype=torch.bfloat16).expand(3, 16)
    summed = embedding_grad(rows, torch.tensor([4, 4, 4]), 6)
    assert summed.dtype == torch.bfloat16 and summed.shape == (6, 16)
    assert summed[4].eq(1 + 2.0 ** -7).all() and summed[[0, 1, 2, 3, 5]].eq(0).all()
    torch.library.opcheck(embedding_grad, (rows.contiguous(), torch.tensor([4, 0, 4]), 6))

    emb.to(torch.bfloat16)
    for fn in (emb, torch.compile(emb, fullgraph=True, backend="aot_eager")):
        emb.weight.grad = None
        fn(torch.tensor([4, 4, 4])).backward(rows)
        assert emb.weight.grad[4].eq(1 + 2.0 ** -7).all()

    padded = Embedding(10, 16, padding_idx=3)  # nn.Embedding's own options keep its own lookup: no gradient at 3
    padded(ids).backward(grad)
    assert padded.weight.grad[3].abs().sum() == 0 and padded.weight.grad[1].abs().sum() > 0


def test_padded_rows_bound_holds_for_the_worst_counts():
    """padded_rows_bound (the static row count of compiled padded groups) is at least padded_counts(c).sum() for
    every count vector: the tight cases (each expert 1 row past a multiple of 32, or just past a power of two above
    1024 rows) and random ones."""
    cases = [([1] * 64, 64), ([33] * 64, 33 * 64), ([1025], 1025), ([1025, 1025, 2049], 4099), ([4097] * 3, 12291)]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        E = int(torch.randint(1, 80, (1,), generator=g))
        counts = torch.randint(0, 3000, (E,), generator=g) * (torch.rand(E, generator=g) < 0.8)
        cases.append((counts.tolist(), int(counts.sum())))
    for counts, slots in cases:
        padded = int(experts_mod.padded_counts(torch.tensor(counts)).sum())
        assert padded <= experts_mod.padded_rows_bound(slots, len(counts)), counts
    # close to the worst case: 64 experts of 1 row each pad to 32 x 64 rows
    assert 32 * 64 <= experts_mod.padded_rows_bound(64, 64) <= 32 * 64 + 64 // 16


def test_compiled_padded_experts_are_one_graph_with_eager_results(monkeypatch):
    """bf16 routed experts with padded groups under torch.compile: one graph (the padded row count is the static
    padded_rows_bound, where reading the sum would break it), rows past the last group left out of every product,
    and eager mode's output and gradients."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)  # padded groups, bf16 products
    torch.manual_seed(0)
    experts = four_routed_experts()
    experts.to(torch.bfloat16)
    x = torch.randn(70, 32, dtype=torch.bfloat16, requires_grad=True)  # 140 rows >= 32 x 4 experts: padded
    w, idx = torch.rand(70, 2), torch.stack([torch.randperm(4)[:2] for _ in range(70)])
    idx[:20] = torch.tensor([0, 1])  # uneven loads
    offsets, rows = [], []
    observe_grouped_products(monkeypatch, lambda a, offs: offsets.append(offs.tolist()) or rows.append(a.shape[0]))
    results = []
    for fn in (experts, torch.compile(experts, fullgraph=True, backend="aot_eager")):
        x.grad = None
        experts.zero_grad()
        out, counts = fn(x, w, idx)
        out.float().square().sum().backward()
        results.append([out.detach(), counts, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    loads = torch.bincount(idx.flatten(), minlength=4)
    padded = experts_mod.padded_counts(loads).cumsum(0).tolist()
    assert offsets[0] == offsets[-1] == padded and rows[0] == padded[-1]
    assert rows[-1] == experts_mod.padded_rows_bound(140, 4) > padded[-1]  # compiled: rows past the last group
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-2 * eager.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
def test_padded_expert_groups_give_the_unpadded_result(mode, monkeypatch):
    """bf16 on a CPU with native bf16 products and >= 32 rows per expert: each expert's group is padded to a
    multiple of 32 rows for the grouped products; output, gradients and counts equal those of the unpadded groups."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)
    torch.manual_seed(0)
    experts = four_routed_experts()
    if mode == "bf16_weights":
        experts.to(torch.bfloat16)
    T, K = 70, 2  # 140 rows >= 32 x 4 experts
    x = torch.randn(T, 32, dtype=experts.down_proj.dtype, requires_grad=True)
    w = torch.rand(T, K)
    idx = torch.stack([torch.randperm(4)[:K] for _ in range(T)])
    idx[:5] = torch.tensor([0, 1])  # uneven loads
    offsets = []
    observe_grouped_products(monkeypatch, lambda a, offs: offsets.append(offs.tolist()))

    def run():
        x.grad = None
        experts.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out, counts = experts(x, w, idx)
        out.float().square().sum().backward()
        return out, counts, [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]

    out, counts, grads = run()
    loads = torch.bincount(idx.flatten(), minlength=4)
    assert counts.tolist() == loads.tolist()
    assert offsets[0] == experts_mod.padded_counts(loads).cumsum(0).tolist() and all(o % 32 == 0 for o in offsets[0])
    assert offsets[0][-1] > T * K
    monkeypatch.setattr(moe_mod, "pads_expert_rows", lambda *a: False)
    offsets.clear()
    out2, counts2, grads2 = run()
    assert offsets[0] == loads.cumsum(0).tolist()
    assert torch.equal(counts, counts2)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, atol=1e-2 * g2.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("T, path", [(2, "gathered"), (3, "every_expert"), (128, "every_expert"), (129, "sorted")])
def test_compiled_decoding_experts_have_static_shapes(T, path, monkeypatch):
    """The paths a compiled step without gradients takes (moe.RoutedExperts.forward), run eagerly: T x K <= E slots
    gathered by index; more slots than experts, every expert on every token while T x E <= STATIC_EXPERT_ROWS; past
    that, the sorted path. Each gives the naive loop's result."""
    cfg = small_config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=3)
    torch.manual_seed(2)
    experts = RoutedExperts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, w = torch.randn(T, 16), torch.rand(T, 3)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(T)])
    regime = {"gathered": (True, True), "every_expert": (False, True), "sorted": (False, False)}[path]
    assert (T * 3 <= 8, T * 8 <= moe_mod.STATIC_EXPERT_ROWS) == regime
    calls = []
    for name in ("gathered_swiglu", "every_expert_swiglu", "expert_ffn"):
        real = getattr(moe_mod, name)
        monkeypatch.setattr(moe_mod, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the traced paths, run eagerly
    with torch.no_grad():
        out, counts = experts(x, w, idx)
    assert calls == [{"gathered": "gathered_swiglu", "every_expert": "every_expert_swiglu",
                      "sorted": "expert_ffn"}[path]]
    expected = naive_experts(x, w, idx, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()


def test_compiled_permutations_gather_in_backward(monkeypatch):
    """Under torch.compile the rows go to and come back from the experts through autograd functions whose backward
    gathers (experts._DispatchRows, experts._GatherRows). Against index_select (whose backward scatters), directly
    and in the routed experts with padded groups: same outputs, same gradients (up to the order of bf16 sums)."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)  # padded groups, bf16 products
    torch.manual_seed(0)
    T, K, G, D = 5, 2, 14, 3
    rows_S = torch.randperm(G)[: T * K]  # distinct rows; the other 4 are padding
    token_G = torch.zeros(G, dtype=torch.long).index_copy_(0, rows_S, torch.arange(T * K) // K)
    x = torch.randn(T, D, requires_grad=True)
    y = torch.randn(G, D, requires_grad=True)
    g_G, g_S = torch.randn(G, D), torch.randn(T * K, D)
    g_G[torch.isin(torch.arange(G), rows_S, invert=True)] = 0  # padding rows' outputs are never read
    for fn, ref, inp, grad in ((lambda: experts_mod._DispatchRows.apply(x, token_G, rows_S, K),
                                lambda: x.index_select(0, token_G), x, g_G),
                               (lambda: experts_mod._GatherRows.apply(y, rows_S), lambda: y.index_select(0, rows_S),
                                y, g_S)):
        out = fn()
        (got,) = torch.autograd.grad(out, inp, grad)
        (want,) = torch.autograd.grad(ref(), inp, grad)
        assert torch.equal(out, ref())
        torch.testing.assert_close(got, want)

    experts = four_routed_experts()
    experts.to(torch.bfloat16)
    x = torch.randn(70, 32, dtype=torch.bfloat16, requires_grad=True)  # 140 rows: padded groups
    w, idx = torch.rand(70, 2), torch.stack([torch.randperm(4)[:2] for _ in range(70)])
    calls = []
    for name in ("_DispatchRows", "_GatherRows"):
        real = getattr(experts_mod, name).apply
        monkeypatch.setattr(getattr(experts_mod, name), "apply",
                            lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))

    def run(compiling: bool):
        x.grad = None
        experts.zero_grad()
        real = torch.compiler.is_compiling
        torch.compiler.is_compiling = lambda: compiling  # the model's paths for a traced forward, run eagerly
        try:
            out, _ = experts(x, w, idx)
        finally:
            torch.compiler.is_compiling = real
        out.float().square().sum().backward()
        return out, [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]

    out, grads = run(False)
    assert not calls
    out2, grads2 = run(True)
    assert calls == ["_DispatchRows", "_GatherRows"]
    assert torch.equal(out, out2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, atol=1e-2 * g.abs().max().item(), rtol=1e-2)


def test_fp32_and_decoding_rows_are_not_padded(monkeypatch):
    experts = four_routed_experts()
    offsets = []
    observe_grouped_products(monkeypatch, lambda a, offs: offsets.append(offs[-1].item()))
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(70)])
    experts(torch.randn(70, 32), torch.rand(70, 2), idx)  # fp32: no padding
    experts.to(torch.bfloat16)
    experts(torch.randn(10, 32, dtype=torch.bfloat16), torch.rand(10, 2), idx[:10])  # 20 rows < 32 x 4
    assert offsets == [140, 140, 20, 20]


def test_moe_drops_no_token_even_when_all_pick_the_same_experts():
    cfg = small_config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=4, topk_group=2, n_shared_experts=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.e_score_correction_bias[[2, 3]] = 10.0  # every token's selection: experts 2 and 3 (group 1)
    B, T = 3, 5
    x = torch.randn(B, T, 16)
    out, routing = moe(x)
    assert routing.topk_idx.shape == (B, T, 2)
    assert all(s == {2, 3} for s in _sets(routing.topk_idx.reshape(-1, 2)))
    assert routing.counts.tolist() == [0, 0, B * T, B * T, 0, 0, 0, 0]  # no capacity limit: nobody dropped
    x_TD = x.reshape(-1, 16)
    s = torch.sigmoid(x_TD @ moe.gate.weight.T)
    gates = s[:, [2, 3]] / s[:, [2, 3]].sum(-1, keepdim=True) * cfg.routed_scaling_factor
    expected = naive_experts(x_TD, gates, torch.tensor([[2, 3]]).expand(B * T, 2),
                             moe.experts.gate_up_proj, moe.experts.down_proj) + moe.shared_experts(x_TD)
    torch.testing.assert_close(out.reshape(-1, 16), expected, atol=1e-5, rtol=1e-5)


def test_every_token_gets_k_distinct_experts():
    cfg = small_config(n_routed_experts=16, num_experts_per_tok=5, n_group=4, topk_group=3)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    out, routing = moe(torch.randn(2, 9, cfg.hidden_size))
    idx = routing.topk_idx.reshape(-1, 5)
    assert all(len(set(row.tolist())) == 5 for row in idx)
    # never more than topk_group = 3 of the 4 groups
    assert all(len({e // 4 for e in row.tolist()}) <= 3 for row in idx)
    assert int(routing.counts.sum()) == 2 * 9 * 5


# ------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    m = DeepSeekV3(small_config()).eval()
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):  # away from their initial ones: a norm used in the wrong place shows
                p.normal_(1.0, 0.3)
    return m


def _ids(B=2, T=10, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_mtp_alignment_by_hand(model):
    cfg = model.config
    ids = _ids()
    B, T = ids.shape
    out = model.forward_train(ids)
    assert [tuple(x.shape) for x in out.mtp_logits] == [(B, T - 1, 64), (B, T - 2, 64)]

    cos, sin = model.rotary(torch.arange(T)[None])
    x = model.embed_tokens.weight[ids]
    for layer in model.layers:
        x = layer(x, cos, sin)[0]
    h0 = rms(x, model.norm.weight, cfg.rms_norm_eps)  # h^0: after the final norm
    torch.testing.assert_close(out.hidden, h0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, h0 @ model.lm_head.weight.T, atol=1e-5, rtol=1e-5)

    d, h = cfg.hidden_size, h0
    for k in (1, 2):
        mod = model.mtp[k - 1]
        n = T - k
        emb = model.embed_tokens.weight[ids[:, k:]]  # position i: Emb(t_{i+k})
        M = mod.eh_proj.weight  # d x 2d, embedding half first
        h_in = (rms(emb, mod.enorm.weight, cfg.rms_norm_eps) @ M[:, :d].T
                + rms(h[:, :n], mod.hnorm.weight, cfg.rms_norm_eps) @ M[:, d:].T)  # position i: h^{k-1}_i
        hk = mod.block(h_in, cos[:, :n], sin[:, :n])[0]
        h = rms(hk, mod.norm.weight, cfg.rms_norm_eps)  # shared_head.norm; feeds depth k + 1
        torch.testing.assert_close(out.mtp_logits[k - 1], h @ model.lm_head.weight.T, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("j", [3, 7])
def test_causality_main_and_mtp(model, j):
    ids = _ids()
    changed = ids.clone()
    changed[:, j] = (changed[:, j] + 17) % 64
    a, b = model.forward_train(ids), model.forward_train(changed)

    def diff(x, y):
        return (x - y).abs().amax(dim=(0, 2))  # per position

    main = diff(a.logits, b.logits)
    assert main[:j].max() < 1e-5 and main[j] > 1e-3  # logits at i < j never see t_j
    for k in (1, 2):
        dk = diff(a.mtp_logits[k - 1], b.mtp_logits[k - 1])
        # depth k at position i reads t_0..t_{i+k}: unchanged for i < j - k, changed at i = j - k (Emb(t_{i+k}))
        assert dk[: j - k].max() < 1e-5 and dk[j - k] > 1e-3, (k, dk)


@torch.no_grad()
def test_attn_mask_must_be_bool(model):
    """A bool mask replaces the causal mask; a float 0/1 mask (which SDPA would add to the scores, masking
    nothing) is refused instead of silently attending to the future."""
    ids = _ids(B=1, T=6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(model(ids, attn_mask=causal), model(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        model(ids, attn_mask=causal.float())


@torch.no_grad()
def test_bad_input_ids_and_positions_are_named(model):
    """Ids outside the vocabulary failed in the embedding ('index out of range in self'; a device-side assert on
    a GPU), bool / uint8 ids there too, and positions of the wrong length in the RoPE broadcast."""
    ids = _ids(B=2, T=5)
    V = model.config.vocab_size
    for bad in (V, -1):
        wrong = ids.clone()
        wrong[1, 3] = bad
        with pytest.raises(ValueError, match=rf"input_ids must be in \[0, vocab_size={V}\)"):
            model(wrong)
        with pytest.raises(ValueError, match="input_ids must be in"):
            model.forward_train(wrong)
    for dtype in (torch.bool, torch.uint8):
        with pytest.raises(ValueError, match="input_ids must be integer token ids"):
            model(ids.to(dtype))
    torch.testing.assert_close(model(ids.int()), model(ids))
    for positions in (torch.arange(5), torch.arange(5)[None], torch.arange(5).expand(2, 5)):
        torch.testing.assert_close(model(ids, positions=positions), model(ids))
    for positions in (torch.arange(4)[None], torch.arange(5).expand(3, 5), torch.arange(5)[None, None]):
        with pytest.raises(ValueError, match="positions must be of shape"):
            model(ids, positions=positions)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_model_keeps_fp32_rope_frequencies(dtype):
    """model.to(bf16) rounded the RoPE frequencies to bf16 (angles off by up to position / 512 radians), unlike a
    model loaded in bf16; they stay the fp32 frequencies, and so do the angles at long positions."""
    cfg = ModelConfig.preset("tiny")
    model = DeepSeekV3(cfg).to(dtype)
    assert model.rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary.inv_freq, rope_frequencies(cfg), atol=0, rtol=0)
    assert model.embed_tokens.weight.dtype == dtype
    model.to(torch.float32).half().bfloat16()
    torch.testing.assert_close(model.rotary.inv_freq, rope_frequencies(cfg), atol=0, rtol=0)


@torch.no_grad()
def test_expert_counts_shape(model):
    cfg = model.config
    ids = _ids(B=3, T=6)
    out = model.forward_train(ids)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert n_moe == 2
    counts = out.expert_counts
    assert counts.shape == (n_moe + cfg.num_nextn_predict_layers, cfg.n_routed_experts)
    K = cfg.num_experts_per_tok
    assert counts.sum(1).tolist() == [3 * 6 * K] * n_moe + [3 * (6 - k) * K for k in (1, 2)]


def test_deepseek_v3_sizes_on_meta():
    cfg = ModelConfig.preset("deepseek-v3")
    with torch.device("meta"):
        m = DeepSeekV3(cfg)
    counts = count_parameters(m)
    assert counts["total_params"] == 671_026_404_352
    assert counts["mtp_params"] == 11_610_067_968
    assert round(counts["activated_params"] / 1e9, 2) == 37.55
    assert round(counts["activated_params_without_embedding"] / 1e9, 2) == 36.63
    assert counts["activated_params"] - counts["activated_params_without_embedding"] == 129280 * 7168
    kv = kv_cache_elements_per_token(cfg)
    assert kv["kv_cache_elements_per_token"] == (512 + 64) * 61 == 35_136
    assert kv["mha_cache_elements_per_token"] == 1_998_848
    assert kv["transformers_cache_elements_per_token"] == 2_498_560
