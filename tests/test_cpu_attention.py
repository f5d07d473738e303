"""The fused bf16 CPU attention kernel (nanoseek.model.cpu_attention, csrc/causal_attention_bf16.cpp): values,
log-sum-exp and gradients against fp32 attention on the same bf16 inputs, MLA's use of it (eager and compiled),
and its fallbacks."""

import contextlib
import math
import os

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.model import cpu_attention
from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.rope import RotaryEmbedding

needs_kernel = pytest.mark.skipif(not cpu_attention.available(),
                                  reason="the kernel needs Linux on an x86 CPU with AVX-512 bf16 and a C++ compiler")


def _inputs(B, T, H, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    # scores of a few units, as trained attention has: some rows peaked, some flat
    return [(torch.randn(B, T, H, n, generator=g) * s).bfloat16() for n, s in ((dk, 1.5), (dk, 1.5), (dv, 1.0))]


def _reference(q, k, v, scale):
    """fp32 attention of the bf16 queries q (B, T, H, d) at the last T of the S positions of k, v (B, S, H, .): query
    t sees keys 0 .. S - T + t (S = T: causal self-attention); and each row's natural log-sum-exp (B, H, T)."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, ., d)
    T, S = q.shape[1], k.shape[1]
    scores = scale * qf @ kf.transpose(-1, -2)  # (B, H, T, S)
    scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2), scores.logsumexp(-1)


@needs_kernel
@pytest.mark.parametrize("B,T,H,dk,dv", [
    (1, 1, 1, 16, 16),     # one token
    (2, 7, 3, 48, 32),     # less than a tile; the bench / demo head widths
    (1, 64, 2, 48, 32),    # exactly one tile
    (2, 65, 2, 32, 16),    # one row into the second tile
    (1, 200, 2, 192, 128), # DeepSeek-V3's head widths, T not a multiple of 64
    (1, 130, 1, 16, 48),   # values wider than keys
])
def test_kernel_matches_fp32_attention(B, T, H, dk, dv):
    q, k, v = _inputs(B, T, H, dk, dv)
    scale = dk ** -0.5
    out, lse2 = cpu_attention.causal_attention_bf16(q, k, v, scale)
    expected, lse = _reference(q, k, v, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (B, T, H, dv) and lse2.shape == (B, H, T)
    # bf16 operands, fp32 accumulation: the output is off by its own rounding plus that of the probabilities
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.02)
    torch.testing.assert_close(lse2 * math.log(2), lse, atol=1e-4, rtol=1e-5)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    probe = torch.randn(B, T, H, dv, generator=torch.Generator().manual_seed(1))
    (cpu_attention.causal_attention(*leaves, scale).float() * probe).sum().backward()
    (_reference(*ref_leaves, scale)[0] * probe).sum().backward()
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert a.grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.grad.float(), b.grad, atol=0.02 * b.grad.abs().max().item() + 1e-6, rtol=0.03,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@needs_kernel
@pytest.mark.parametrize("T,S", [(1, 1), (1, 37), (5, 100), (64, 64), (70, 200), (130, 131), (3, 300)])
def test_kernel_queries_after_a_prefix(T, S):
    """Forward of a chunk of T queries after S - T cached positions (a prefill chunk), against fp32; its first
    T queries' causal self-attention (S = T) is the same code."""
    q = _inputs(2, T, 2, 48, 32)[0]
    _, k, v = _inputs(2, S, 2, 48, 32, seed=1)
    scale = 48 ** -0.5
    out, _ = cpu_attention.causal_attention_bf16(q, k, v, scale)
    assert out.shape == (2, T, 2, 32)
    torch.testing.assert_close(out.float(), _reference(q, k, v, scale)[0], atol=0.02, rtol=0.02)


@needs_kernel
def test_kernel_rows_are_independent_and_causal():
    """Changing a later token changes no earlier output; changing one (batch, head) changes no other."""
    q, k, v = _inputs(2, 100, 2, 48, 32)
    out, _ = cpu_attention.causal_attention_bf16(q, k, v, 0.2)
    k2, v2 = k.clone(), v.clone()
    k2[0, 70:, 1] += 3
    v2[0, 70:, 1] -= 3
    out2, _ = cpu_attention.causal_attention_bf16(q, k2, v2, 0.2)
    assert torch.equal(out2[:, :70], out[:, :70])
    assert torch.equal(out2[1], out[1]) and torch.equal(out2[0, :, 0], out[0, :, 0])
    assert not torch.equal(out2[0, 70:, 1], out[0, 70:, 1])


@needs_kernel
def test_kernel_threads_do_not_change_the_result():
    q, k, v = _inputs(3, 90, 3, 48, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = cpu_attention.causal_attention_bf16(q, k, v, 0.2)
        torch.set_num_threads(2)
        two, _ = cpu_attention.causal_attention_bf16(q, k, v, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def _mla(monkeypatch, dtype=torch.bfloat16):
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, first_k_dense_replace=1,
                      num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg).to(dtype)
    x = torch.randn(2, 70, cfg.hidden_size, dtype=dtype)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(70)[None])
    return attn, x, cos, sin


def _count_kernel_calls(monkeypatch):
    calls = []
    real = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernel
def test_mla_bf16_training_path_runs_the_kernel(monkeypatch):
    """bf16 MLA without a mask takes the kernel; inside cpu_attention.disabled() it takes the explicit products,
    and the two agree within bf16 rounding, values and gradients."""
    attn, x, cos, sin = _mla(monkeypatch)
    calls = _count_kernel_calls(monkeypatch)
    x1 = x.clone().requires_grad_()
    out = attn(x1, cos, sin)
    assert len(calls) == 1
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    x2 = x.clone().requires_grad_()
    with cpu_attention.disabled():
        assert not cpu_attention.available()
        explicit = attn(x2, cos, sin)
        explicit.float().square().sum().backward()
    assert len(calls) == 1 and cpu_attention.available()
    torch.testing.assert_close(out.float(), explicit.float(), atol=0.02 * explicit.abs().max().item(), rtol=0.02)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), atol=0.03 * x2.grad.abs().max().item(), rtol=0.03)
    for n, p in attn.named_parameters():
        torch.testing.assert_close(grads[n].float(), p.grad.float(), atol=0.03 * p.grad.abs().max().item(),
                                   rtol=0.03, msg=lambda m, n=n: f"{n}: {m}")


@needs_kernel
def test_mla_kernel_under_torch_compile(monkeypatch):
    """One graph with the kernel inside (fullgraph), equal to eager; a graph traced inside disabled() is not
    reused outside it."""
    attn, x, cos, sin = _mla(monkeypatch)
    eager = attn(x, cos, sin)
    calls = _count_kernel_calls(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True)
    with cpu_attention.disabled():
        compiled(x, cos, sin)
    assert calls == []
    out = compiled(x, cos, sin)
    assert len(calls) == 1  # retraced with the kernel
    torch.testing.assert_close(out.float(), eager.float(), atol=0.01 * eager.abs().max().item(), rtol=0.01)
    out.float().sum().backward()
    assert all(p.grad is not None for p in attn.parameters())


@needs_kernel
def test_other_precisions_and_masks_do_not_take_the_kernel(monkeypatch):
    attn, x, cos, sin = _mla(monkeypatch, dtype=torch.float32)
    calls = _count_kernel_calls(monkeypatch)
    attn(x, cos, sin)  # fp32
    attn.to(torch.bfloat16)
    mask = torch.ones(70, 70, dtype=torch.bool).tril()[None, None]
    attn(x.bfloat16(), cos, sin, attn_mask=mask)  # an explicit mask (packed documents)
    assert calls == []
    attn(x.bfloat16(), cos, sin)
    assert len(calls) == 1


def test_shapes_supported():
    assert cpu_attention.shapes_supported(192, 128) and cpu_attention.shapes_supported(48, 32)
    assert not cpu_attention.shapes_supported(24, 16) and not cpu_attention.shapes_supported(48, 8)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """_library() asked again under a test's environment, and asked again after it."""
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    cpu_attention._library.cache_clear()
    yield tmp_path
    cpu_attention._library.cache_clear()


def test_switched_off_by_the_environment(monkeypatch, fresh_library):
    monkeypatch.setenv("NANOSEEK_CPU_KERNELS", "0")
    assert cpu_attention._library() is None and not cpu_attention.available()
    assert not (fresh_library / "kernels").exists()


@needs_kernel
def test_a_failed_build_warns_once_and_falls_back(monkeypatch, fresh_library):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.warns(RuntimeWarning, match="fused CPU attention kernel was not built.*false failed"):
        assert cpu_attention._library() is None
    assert cpu_attention._library() is None  # asked once per process
    assert list((fresh_library / "kernels").iterdir()) == []  # no partial library left behind


@needs_kernel
def test_the_build_is_cached(monkeypatch, fresh_library):
    assert cpu_attention._library() is not None
    built = list((fresh_library / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    cpu_attention._library.cache_clear()
    assert cpu_attention._library() is not None
    assert list((fresh_library / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_kernel_builds_where_the_cpu_supports_it():
    """A capable machine (Linux, x86 with AVX-512 bf16, a C++ compiler) must get the kernel: a build that fails
    there would otherwise only skip the tests above."""
    import platform
    import shutil
    from pathlib import Path

    if platform.system() != "Linux" or platform.machine() != "x86_64" or os.environ.get("NANOSEEK_CPU_KERNELS") == "0":
        pytest.skip("not a Linux x86-64 machine, or the kernel is switched off")
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip("this CPU has no AVX-512 bf16 dot products")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler")
    assert cpu_attention.available()


@needs_kernel
def test_bad_inputs_are_one_line_errors():
    q, k, v = _inputs(1, 8, 2, 48, 32)
    with pytest.raises(TypeError, match="bf16 CPU tensors"):
        cpu_attention.causal_attention_bf16(q.float(), k, v, 0.1)
    with pytest.raises(ValueError, match=r"k \(B, S, H, d_k\) .* with S >= T"):
        cpu_attention.causal_attention_bf16(q, k[:, :4], v[:, :4], 0.1)  # fewer keys than queries
    with pytest.raises(ValueError, match=r"v \(B, S, H, d_v\)"):
        cpu_attention.causal_attention_bf16(q, k, v[:, :4], 0.1)
    with pytest.raises(ValueError, match="multiples of 16"):
        cpu_attention.causal_attention_bf16(q[..., :40], k[..., :40], v, 0.1)
    with pytest.raises(ValueError, match="positive softmax scale"):
        cpu_attention.causal_attention_bf16(q, k, v, -0.1)


@needs_kernel
def test_mla_prefill_chunk_over_the_cache_runs_the_kernel(monkeypatch):
    """forward_cached's up-projected path (a prefill chunk) in bf16 takes the kernel when its mask is plain
    causal, and agrees with the other path; not with gradients on, and not for a mask that is not causal."""
    from nanoseek.inference.cache import LatentCacheLayer
    from nanoseek.model.attention import causal_suffix

    attn, x, cos, sin = _mla(monkeypatch)
    calls = _count_kernel_calls(monkeypatch)

    def new_cache():
        return LatentCacheLayer(torch.zeros(2, 70, attn.kv_lora_rank + attn.qk_rope_head_dim, dtype=torch.bfloat16))

    def prefill(layer_cache, start, stop, mask=None):
        pos = torch.arange(start, stop)[None].expand(2, -1)  # (B, T)
        if mask is None:
            mask = (torch.arange(stop) <= pos[..., None]).unsqueeze(1)  # (B, 1, T, S): cache_mask's
        return attn.forward_cached(x[:, start:stop], cos[:, start:stop].expand(2, -1, -1),
                                   sin[:, start:stop].expand(2, -1, -1), layer_cache, pos, mask, absorb=False)

    outs = {}
    for fused in (True, False):
        layer_cache = new_cache()
        with torch.no_grad(), (contextlib.nullcontext() if fused else cpu_attention.disabled()):
            outs[fused] = torch.cat([prefill(layer_cache, 0, 30), prefill(layer_cache, 30, 70)], 1)
    assert len(calls) == 2
    torch.testing.assert_close(outs[True].float(), outs[False].float(), atol=0.02 * outs[False].abs().max().item(),
                               rtol=0.02)
    mask = (torch.arange(70) <= torch.arange(30, 70)[:, None])[None, None].expand(2, 1, -1, -1)
    assert causal_suffix(mask) and causal_suffix(mask[:, :, 1:]) and not causal_suffix(mask[..., :-1])
    assert not causal_suffix(~mask) and not causal_suffix(mask.float())
    layer_cache = new_cache()
    prefill(layer_cache, 0, 70)  # gradients on: the kernel's backward is self-attention's
    with torch.no_grad():
        odd = (torch.arange(70) <= torch.arange(30, 70)[:, None] - 1)[None, None].expand(2, 1, -1, -1).clone()
        odd[..., 0] = True
        prefill(layer_cache, 30, 70, mask=odd)  # sees one key fewer: not plain causal
    assert len(calls) == 2
