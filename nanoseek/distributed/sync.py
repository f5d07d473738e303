"""Gradient reduction, the global gradient norm and expert-count sums across the parallel layout.

With data split over the ``dp x ep`` data group, each rank's loss is the mean over its own share of the
batch, and the step's loss is the mean of those. Hence (see :mod:`nanoseek.distributed.mesh`):
- a non-expert gradient is averaged over the data group;
- a routed-expert gradient already sums every EP peer's contribution (the all-to-all backward brings them
  to the expert's rank), so it is summed over ``dp`` and divided by the data-group size.
Each class is reduced as one flat buffer (one collective instead of one per parameter).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .expert_parallel import is_expert_param
from .mesh import ParallelContext


def _all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def reduce_gradients(named_params: Iterable[tuple[str, nn.Parameter]], ctx: ParallelContext) -> None:
    """Make every rank's gradients those of the whole step's loss (in place)."""
    plain, expert = [], []
    for name, p in named_params:
        if p.grad is None:  # unused this step (the same on every replica): reduce zeros so buffers line up
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) else plain).append(p.grad)
    if ctx.data_size == 1:
        return
    for grads, group in ((plain, ctx.data_group), (expert, ctx.dp_group)):
        for dtype in sorted({g.dtype for g in grads}, key=str):  # one flat buffer per dtype, same order everywhere
            _all_reduce_flat([g for g in grads if g.dtype == dtype], group, 1.0 / ctx.data_size)


def clip_global_grad_norm(named_params: list[tuple[str, nn.Parameter]], ctx: ParallelContext, max_norm: float,
                          duplicates: Iterable[nn.Parameter] = ()) -> float:
    """The L2 norm of the whole model's gradient (every parameter counted once: experts summed over EP ranks,
    stages over PP ranks, pipeline copies skipped), and clip it to ``max_norm`` like
    ``torch.nn.utils.clip_grad_norm_``. Call after :func:`reduce_gradients`."""
    skip = {id(p) for p in duplicates}
    device = named_params[0][1].device if named_params else torch.device("cpu")
    sq = torch.zeros(2, dtype=torch.float64, device=device)  # [non-expert, expert]
    for name, p in named_params:
        if p.grad is None or id(p) in skip:
            continue
        sq[1 if is_expert_param(name) else 0] += p.grad.detach().double().pow(2).sum()
    if ctx.layout.ep > 1:
        expert = sq[1:].clone()
        dist.all_reduce(expert, group=ctx.ep_group)
        sq[1:] = expert
    total = sq.sum().reshape(1)  # (1,) for all_reduce
    if ctx.layout.pp > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    norm = math.sqrt(float(total))
    if math.isfinite(max_norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for _, p in named_params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


def sum_over(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``t`` summed over ``group`` (a copy)."""
    out = t.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out
