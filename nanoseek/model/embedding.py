"""The token embedding, whose gradient under torch.compile is ATen's own kernel rather than Inductor's.

Inductor compiles the embedding's backward (each token's gradient row added into a zero (V, d) table) as a
scatter with an atomic add per element, since two threads may add to the same row. On the CPU that is a
compare-and-swap loop per element: 29 ms of a 0.82 s compiled step of the bench preset (2048 tokens of d = 512,
2 cores), more than any other of Inductor's kernels in it. ATen's kernel adds the rows without atomics. Here the
backward is an opaque custom op that runs it, with the rows summed in fp32 and rounded once to the weight's dtype
(eager too, so that compiled and eager bf16 training sum the same way; ATen alone would sum bf16 rows in bf16).

No ``from __future__ import annotations`` here: torch.library reads the op's schema from the annotations.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("nanoseek::embedding_grad", mutates_args=())
def embedding_grad(grad_TD: Tensor, ids_T: Tensor, num_embeddings: int) -> Tensor:
    """d loss / d weight (V, D) of ``weight[ids]`` from the rows' gradient grad (T, D): each token's rows summed."""
    summed = torch.ops.aten.embedding_dense_backward(grad_TD.float(), ids_T, num_embeddings, -1, False)  # (V, D)
    return summed.to(grad_TD.dtype)


@embedding_grad.register_fake
def _(grad_TD: Tensor, ids_T: Tensor, num_embeddings: int) -> Tensor:
    return grad_TD.new_empty(num_embeddings, grad_TD.shape[-1])  # (V, D)


class _Lookup(torch.autograd.Function):
    """weight[ids] whose backward is :func:`embedding_grad`."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        return F.embedding(ids, weight)  # (*ids.shape, D)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        D = grad.shape[-1]
        # rows flat: (*ids.shape, D) -> (T, D), ids -> (T,)
        return embedding_grad(grad.reshape(-1, D), ids.reshape(-1), ctx.num_embeddings), None


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter, same checkpoint name) whose lookup with gradients takes the backward above
    (the plain lookup only: nn.Embedding's padding_idx, max_norm, scale_grad_by_freq and sparse keep its own)."""

    def forward(self, ids: Tensor) -> Tensor:
        plain = self.padding_idx is None and self.max_norm is None and not self.scale_grad_by_freq and not self.sparse
        if plain and torch.is_grad_enabled() and self.weight.requires_grad:
            return _Lookup.apply(self.weight, ids)
        return super().forward(ids)
