"""``torch._grouped_mm`` on fp32 CPU tensors inside torch.compile.

The CPU kernel of ``torch._grouped_mm`` runs fp32, but torch 2.13's shape function, which torch.compile traces
through, accepts only bf16. Without this op a compiled fp32 step fell back to a loop over the experts whose row
counts (``counts.tolist()``) break the graph and change every step: the demo preset's compiled fp32 training
recompiled until torch's recompile limit and ran no faster than eager. Here the same kernel is an opaque custom
op with its own shape function and backward, so the step stays one graph.

No ``from __future__ import annotations`` here: torch.library reads the op's schema from the annotations.
"""

import torch
from torch import Tensor


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows x (S, K) sorted by group, group e's rows ending at offs[e]; w (E, K, N): (S, N), rows of group e
    times w[e]."""
    return torch._grouped_mm(x, w, offs=offs)


@grouped_mm.register_fake
def _(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])  # (S, N)


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_KS: Tensor, dy_SN: Tensor, offs: Tensor) -> Tensor:
    """The weight gradient of :func:`grouped_mm`: x_e^T dy_e per group, (E, K, N), from x^T (K, S) and dy (S, N)."""
    return torch._grouped_mm(x_KS, dy_SN, offs=offs)


@grouped_mm_weight_grad.register_fake
def _(x_KS: Tensor, dy_SN: Tensor, offs: Tensor) -> Tensor:
    return x_KS.new_empty(offs.shape[0], x_KS.shape[0], dy_SN.shape[1])  # (E, K, N)


def _setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, dy_SN: Tensor):
    x_SK, w_EKN, offs = ctx.saved_tensors
    dy_SN = dy_SN.contiguous()  # the kernel rejects broadcast (stride 0) gradients
    dx_SK = grouped_mm(dy_SN, w_EKN.transpose(-2, -1), offs)  # dy_e w_e^T: (S, K)
    dw_EKN = grouped_mm_weight_grad(x_SK.transpose(0, 1), dy_SN, offs)  # x_e^T dy_e: (E, K, N)
    return dx_SK, dw_EKN, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
