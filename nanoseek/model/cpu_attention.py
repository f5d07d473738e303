"""Fused causal attention for bf16 on CPUs with AVX-512 bf16 dot products: csrc/causal_attention_bf16.cpp.

The training forward's attention (causal, no other mask) in bf16 on such a CPU runs here instead of as explicit
score products (attention.causal_attention_lowp): softmax(scale q k^T + causal mask) v and its backward in 64 x 64
tiles that stay in the cache, FlashAttention-2's algorithm. The (T x T) scores, probabilities and their gradients,
which the explicit form writes and reads about eleven times per layer, are never written to memory. Prefill chunks
over the latent cache whose mask is plain causal (queries after a cached prefix) run its forward too.

The kernel is compiled at first use and cached (nanoseek.cpu_kernels). Where it cannot run (another CPU, no
compiler, a failed build, ``NANOSEEK_CPU_KERNELS=0``) :func:`available` is False and the callers keep their other
paths; a failed build says why once.

No ``from __future__ import annotations`` here: torch.library reads the ops' schemas from the annotations.
"""

import contextlib
import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from .. import cpu_kernels

SOURCE = Path(__file__).parent / "csrc" / "causal_attention_bf16.cpp"


def shapes_supported(dk: int, dv: int) -> bool:
    """Head widths the kernel takes: products run over pairs and columns in vectors of 16."""
    return dk % 16 == 0 and dv % 16 == 0 and dk > 0 and dv > 0


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_kernels.library(SOURCE, "the fused CPU attention kernel", "attention takes PyTorch's paths")
    if lib is None:
        return None
    ptr, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.nanoseek_causal_attention_forward.argtypes = [ptr] * 5 + [i64] * 6 + [f32, c_int]
    lib.nanoseek_causal_attention_forward.restype = None
    lib.nanoseek_causal_attention_backward.argtypes = [ptr] * 9 + [i64] * 5 + [f32, c_int]
    lib.nanoseek_causal_attention_backward.restype = None
    return lib


def disabled() -> contextlib.AbstractContextManager:
    """Attention takes its other paths inside this block (compiled models: those traced inside it), e.g. to
    compare the two."""
    return cpu_kernels.disabled("attention")


def available() -> bool:
    """Whether attention takes the kernel: it runs on this machine (built on the first call) and is not
    :func:`disabled`. torch.compile guards on the latter, so a graph traced inside ``disabled()`` is not reused
    outside it."""
    return cpu_kernels.enabled("attention") and _loaded()


@torch.compiler.assume_constant_result  # a compiled model takes the same route as an eager one
def _loaded() -> bool:
    return _library() is not None



@torch.library.custom_op("nanoseek::causal_attention_bf16", mutates_args=())
def causal_attention_bf16(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(scale q k^T + causal mask) v for q (B, T, H, d), k (B, S, H, d), v (B, S, H, d_v) in bf16, the
    queries at the last T of the S positions (T = S: causal self-attention; T < S: a chunk after a cached prefix):
    the output (B, T, H, d_v) and the log2 of each row's softmax denominator (B, H, T, fp32), which the backward
    (T = S only) reads."""
    _check(q, k, v, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, H, dk = q.shape
    S, dv = k.shape[1], v.shape[-1]
    out = q.new_empty(B, T, H, dv)
    lse2 = q.new_empty(B, H, T, dtype=torch.float32)
    _library().nanoseek_causal_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                                  lse2.data_ptr(), B, T, S, H, dk, dv, scale, cpu_kernels.threads())
    return out, lse2


def _check(q: Tensor, k: Tensor, v: Tensor, scale: float) -> None:
    """What the kernel assumes, as one-line errors (it reads raw memory)."""
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in (q, k, v)):
        raise TypeError(f"causal_attention_bf16 takes bf16 CPU tensors, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}")
    if (q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[1] < q.shape[1] or v.shape[:3] != k.shape[:3]
            or (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3])):
        raise ValueError(f"causal_attention_bf16 wants q (B, T, H, d_k), k (B, S, H, d_k) and v (B, S, H, d_v) with "
                         f"S >= T, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not shapes_supported(q.shape[-1], v.shape[-1]):
        raise ValueError(f"causal_attention_bf16 needs head widths that are multiples of 16, got d_k = {q.shape[-1]}, "
                         f"d_v = {v.shape[-1]}")
    if not scale > 0:
        raise ValueError(f"causal_attention_bf16 needs a positive softmax scale, got {scale}")
    if _library() is None:
        raise RuntimeError("the fused CPU attention kernel does not run on this machine (cpu_attention.available())")


@causal_attention_bf16.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanoseek::causal_attention_bf16_backward", mutates_args=())
def causal_attention_bf16_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, d_out: Tensor, lse2: Tensor,
                                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of :func:`causal_attention_bf16` for the output gradient d_out (B, T, H, d_v)."""
    q, k, v, out, d_out = (t.contiguous() for t in (q, k, v, out, d_out))
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _library().nanoseek_causal_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                                   d_out.data_ptr(), lse2.contiguous().data_ptr(), dq.data_ptr(),
                                                   dk_.data_ptr(), dv_.data_ptr(), B, T, H, dk, dv, scale, cpu_kernels.threads())
    return dq, dk_, dv_


@causal_attention_bf16_backward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, out: Tensor, d_out: Tensor, lse2: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse2)


def _backward(ctx, d_out: Tensor, _d_lse2: Tensor):
    q, k, v, out, lse2 = ctx.saved_tensors
    if k.shape[1] != q.shape[1]:
        raise NotImplementedError("the fused CPU attention's backward takes causal self-attention only (as many "
                                  "queries as keys)")
    if d_out is None:
        return None, None, None, None
    dq, dk, dv = causal_attention_bf16_backward(q, k, v, out, d_out.to(out.dtype), lse2, ctx.scale)
    return dq, dk, dv, None


causal_attention_bf16.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(scale q k^T + causal mask) v for q (B, T, H, d), k (B, S, H, d), v (B, S, H, d_v) in bf16, the
    queries at the last T of the S positions: (B, T, H, d_v)."""
    return causal_attention_bf16(q, k, v, scale)[0]
