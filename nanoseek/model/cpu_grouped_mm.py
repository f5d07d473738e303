"""Grouped bf16 matrix products for the routed experts on CPUs with AVX-512 bf16: csrc/grouped_mm_bf16.cpp.

The experts' products over rows sorted by expert (experts.expert_ffn) in bf16 on such a CPU run here instead of
torch._grouped_mm, whose CPU kernel runs each group as its own oneDNN product and reorders the group's weight at
every call: single-threaded on a Zen 5 core, 64 experts of ~200 rows (the bench preset), the forward, data and
weight gradients of both projections took 75-79 ms here against 89-91 ms (dense products of the same size: 74-76).

The kernel is built and loaded by nanoseek.cpu_kernels (compiled at first use, cached, called through ctypes);
where it cannot run, or inside :func:`disabled`, :func:`available` is False and expert_ffn keeps
torch._grouped_mm.

No ``from __future__ import annotations`` here: torch.library reads the ops' schemas from the annotations.
"""

import contextlib
import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from .. import cpu_kernels

SOURCE = Path(__file__).parent / "csrc" / "grouped_mm_bf16.cpp"


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_kernels.library(SOURCE, "the grouped CPU matrix product kernel", "the experts take torch._grouped_mm")
    if lib is None:
        return None
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, n_sizes in (("forward", 4), ("data_grad", 4), ("weight_grad", 3)):
        fn = getattr(lib, f"nanoseek_grouped_mm_{name}")
        fn.argtypes = [ptr] * 4 + [i64] * n_sizes + [c_int]
        fn.restype = None
    return lib


def disabled() -> contextlib.AbstractContextManager:
    """The experts take torch._grouped_mm inside this block (compiled models: those traced inside it), e.g. to
    compare the two."""
    return cpu_kernels.disabled("grouped_mm")


def available() -> bool:
    """Whether the experts take the kernel: it runs on this machine (built on the first call) and is not
    :func:`disabled`. torch.compile guards on the latter, so a graph traced inside ``disabled()`` is not reused
    outside it."""
    return cpu_kernels.enabled("grouped_mm") and _loaded()


@torch.compiler.assume_constant_result  # a compiled model takes the same route as an eager one
def _loaded() -> bool:
    return _library() is not None


def supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether rows x (S, K) and weights (E, N, K) suit the kernel: bf16 on the CPU, each weight's N and K even
    (products run over pairs)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 2 and all(
        w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 3 and w.shape[1] % 2 == 0
        and w.shape[2] % 2 == 0 for w in weights)


def _check(name: str, x: Tensor, w_or_rows: Tensor, offs: Tensor) -> None:
    """What the kernel assumes, as one-line errors (it reads and writes raw memory): bf16 CPU tensors, int32
    offsets that never decrease and end within the rows."""
    if x.dtype != torch.bfloat16 or w_or_rows.dtype != torch.bfloat16 or x.device.type != "cpu" \
            or w_or_rows.device.type != "cpu":
        raise TypeError(f"{name} takes bf16 CPU tensors, got {x.dtype}/{w_or_rows.dtype} on {x.device}/"
                        f"{w_or_rows.device}")
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.device.type != "cpu":
        raise TypeError(f"{name} takes int32 CPU offsets (E,), got {offs.dtype} {tuple(offs.shape)} on {offs.device}")
    if offs.numel() and (int(offs[0]) < 0 or int(offs[-1]) > x.shape[0] or bool((offs.diff() < 0).any())):
        raise ValueError(f"{name} needs offsets that never decrease, from 0 to at most the {x.shape[0]} rows, got "
                         f"{offs.tolist()[:8]}{'...' if offs.numel() > 8 else ''} (last {int(offs[-1])})")
    if _library() is None:
        raise RuntimeError(f"{name}: the grouped CPU kernel does not run on this machine (cpu_grouped_mm.available())")



@torch.library.custom_op("nanoseek::grouped_mm_bf16", mutates_args=())
def grouped_mm_bf16(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows x (S, K) sorted by group, group e's rows ending at offs[e]; w (E, N, K): (S, N), the rows of group e
    times w[e]^T (rows past offs[-1]: zeros). torch._grouped_mm(x, w.transpose(-2, -1), offs) in bf16."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2] or w.shape[0] != offs.shape[0] or w.shape[2] % 2:
        raise ValueError(f"grouped_mm_bf16 wants x (S, K), w (E, N, K) with K even and offs (E,), got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(offs.shape)}")
    _check("grouped_mm_bf16", x, w, offs)
    x, w = x.contiguous(), w.contiguous()
    (S, K), (E, N, _) = x.shape, w.shape
    y = x.new_empty(S, N)
    _library().nanoseek_grouped_mm_forward(x.data_ptr(), w.data_ptr(), offs.data_ptr(), y.data_ptr(), S, E, N, K,
                                           cpu_kernels.threads())
    return y


@grouped_mm_bf16.register_fake
def _(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[1])  # (S, N)


@torch.library.custom_op("nanoseek::grouped_mm_bf16_data_grad", mutates_args=())
def grouped_mm_bf16_data_grad(dy: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """dy_e w_e per group: the input gradient (S, K) of :func:`grouped_mm_bf16` from dy (S, N), w (E, N, K)."""
    if dy.dim() != 2 or w.dim() != 3 or dy.shape[1] != w.shape[1] or w.shape[0] != offs.shape[0] or w.shape[1] % 2:
        raise ValueError(f"grouped_mm_bf16_data_grad wants dy (S, N), w (E, N, K) with N even and offs (E,), got "
                         f"{tuple(dy.shape)}, {tuple(w.shape)}, {tuple(offs.shape)}")
    _check("grouped_mm_bf16_data_grad", dy, w, offs)
    dy, w = dy.contiguous(), w.contiguous()
    (S, N), K = dy.shape, w.shape[2]
    dx = dy.new_empty(S, K)
    _library().nanoseek_grouped_mm_data_grad(dy.data_ptr(), w.data_ptr(), offs.data_ptr(), dx.data_ptr(), S,
                                             w.shape[0], N, K, cpu_kernels.threads())
    return dx


@grouped_mm_bf16_data_grad.register_fake
def _(dy: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return dy.new_empty(dy.shape[0], w.shape[2])  # (S, K)


@torch.library.custom_op("nanoseek::grouped_mm_bf16_weight_grad", mutates_args=())
def grouped_mm_bf16_weight_grad(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    """dy_e^T x_e per group: the weight gradient (E, N, K) of :func:`grouped_mm_bf16` from dy (S, N), x (S, K);
    a group without rows gets zeros."""
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_mm_bf16_weight_grad wants dy (S, N) and x (S, K), got {tuple(dy.shape)}, "
                         f"{tuple(x.shape)}")
    _check("grouped_mm_bf16_weight_grad", dy, x, offs)
    dy, x = dy.contiguous(), x.contiguous()
    E, N, K = offs.shape[0], dy.shape[1], x.shape[1]
    dw = dy.new_empty(E, N, K)
    _library().nanoseek_grouped_mm_weight_grad(dy.data_ptr(), x.data_ptr(), offs.data_ptr(), dw.data_ptr(), E, N, K,
                                               cpu_kernels.threads())
    return dw


@grouped_mm_bf16_weight_grad.register_fake
def _(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])  # (E, N, K)


def _setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, dy: Tensor):
    x, w, offs = ctx.saved_tensors
    dy = dy.to(torch.bfloat16)
    dx = grouped_mm_bf16_data_grad(dy, w, offs) if ctx.needs_input_grad[0] else None  # (S, K)
    dw = grouped_mm_bf16_weight_grad(dy, x, offs) if ctx.needs_input_grad[1] else None  # (E, N, K), w's layout
    return dx, dw, None


grouped_mm_bf16.register_autograd(_backward, setup_context=_setup_context)
