"""FP8 mixed-precision training (DeepSeek-V3 §3.3, SPEC §6), emulated: ``nanoseek train --dtype fp8``.

V3 runs the matrix products (GEMMs) of its linear layers in FP8 (e4m3) with fine-grained scaling: one scale per
1 x 128 tile of an activation or a gradient (128 consecutive elements along the product's reduction), one per
128 x 128 block of a weight, each the tile's absolute maximum over e4m3's largest value (448), with partial sums
promoted to fp32 every 128 elements. Each linear layer has three such products (V3 Figure 6):
- Fprop  y = x W^T:       x in 1 x 128 tiles along its features, W in 128 x 128 blocks;
- Dgrad  dx = dy W:       dy in 1 x 128 tiles along its features, W in the same blocks;
- Wgrad  dW = dy^T x:     dy and x in 128 x 1 tiles, along the tokens (the reduction of this product); x is the
                          FP8 activation the forward cached (1 x 128), quantized again (V3 §3.3.3).
The embedding, the output head, the MoE gate, the norms and attention itself stay in higher precision.

Here every operand is rounded to e4m3 with V3's tile and block scales and the product runs in fp32 on the
rounded values, on any device (no FP8 speed, a slower step: it shows what FP8 rounding of the products does to
training, not what FP8 saves). Not emulated: the accumulation in 14-bit partial sums (here exact fp32), the
special cases of V3 §3.3.3 (the input of the attention output projection in E5M6, power-of-2 scales around the
MoE up- and down-projections), bf16 elsewhere (here fp32: activations, AdamW moments). The routed experts' gate
and up weights are one (E, 2F, D) tensor here, so with F not a multiple of 128 a block spans both.

:func:`fp8_gemms` returns a context (a TorchFunctionMode, used like autocast) in which the model's ``F.linear``
and ``torch._grouped_mm`` (the routed experts) calls on the chosen weights run as FP8 products; the model
itself is unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

TILE = 128  # elements per scale: 1 x 128 activation tiles, 128 x 128 weight blocks
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


# ---------------------------------------------------------------------------------------------- rounding
def _to_e4m3(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale rounded to float8_e4m3fn, times scale again (fp32)."""
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def quantize_tiles(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x rounded to e4m3 with one scale (amax / 448) per TILE consecutive elements along ``dim``; fp32."""
    x = x.float().movedim(dim, -1)
    n = x.shape[-1]
    tiles = F.pad(x, (0, -n % TILE)).unflatten(-1, (-1, TILE))  # (..., ceil(n / 128), 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX  # (..., ceil(n / 128), 1)
    return _to_e4m3(tiles, scale).flatten(-2)[..., :n].movedim(-1, dim)


def quantize_blocks(w: torch.Tensor) -> torch.Tensor:
    """w (..., R, C) rounded to e4m3 with one scale per TILE x TILE block of its last two dimensions; fp32.
    The same numbers as the public checkpoints' block quantization (nanoseek.fp8.quantize_fp8)."""
    r, c = w.shape[-2:]
    padded = F.pad(w.float(), (0, -c % TILE, 0, -r % TILE))  # (..., R', C'), multiples of 128
    blocks = padded.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # (..., R'/128, 128, C'/128, 128)
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-12) / E4M3_MAX  # one per block
    return _to_e4m3(blocks, scale).flatten(-2).flatten(-3, -2)[..., :r, :c]  # (..., R, C)


# ---------------------------------------------------------------------------------------------- products
def _wanted(ctx, i: int) -> bool:
    """Whether this backward pass wants the gradient of the node's input ``i``. A pipeline schedule that splits
    the backward (DualPipeV: the input gradients first, the weight gradients later) runs the node once per part;
    each part then computes only its own products. The inputs are passed as views (:func:`fp8_linear`), so that
    the engine can answer for each: it cannot for a leaf tensor under ``torch.autograd.grad``."""
    node = ctx.next_functions[i][0]
    return ctx.needs_input_grad[i] and node is not None and torch._C._will_engine_execute_node(node)


def fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` as FP8 products (:class:`FP8Linear`)."""
    return FP8Linear.apply(x.view_as(x), w.view_as(w))


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(x, w, offs=offs)`` as FP8 products (:class:`FP8GroupedMM`)."""
    return FP8GroupedMM.apply(x.view_as(x), w.view_as(w), offs)


class FP8Linear(torch.autograd.Function):
    """y = x W^T (x (..., K), W (N, K)) with its Fprop, Dgrad and Wgrad as FP8 products (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x_q = quantize_tiles(x)  # the FP8 activation (1 x 128 tiles) the backward reads again
        ctx.save_for_backward(x_q, w)  # the weight itself, rounded again in the backward: no second copy kept
        ctx.dtype = x.dtype
        return F.linear(x_q, quantize_blocks(w)).to(x.dtype)  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, w = ctx.saved_tensors
        dx = dw = None
        if _wanted(ctx, 0):
            dx = (quantize_tiles(dy) @ quantize_blocks(w)).to(ctx.dtype)  # Dgrad (..., K)
        if _wanted(ctx, 1):
            x_MK, dy_MN = x_q.reshape(-1, x_q.shape[-1]), dy.reshape(-1, dy.shape[-1])  # tokens flattened
            dw = (quantize_tiles(dy_MN, 0).T @ quantize_tiles(x_MK, 0)).to(w.dtype)  # Wgrad (N, K): along tokens
        return dx, dw


class FP8GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm(x, w, offs)`` of the routed experts as FP8 products: rows x (S, K) sorted by expert,
    expert e's rows ending at offs[e], w (E, K, N); each expert's Wgrad tiles its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        x_q = quantize_tiles(x)  # the FP8 activation the backward reads again
        ctx.save_for_backward(x_q, w, offs)
        ctx.dtype = x.dtype
        # square blocks: the same numbers as blocks of each W_e (N, K)
        return torch._grouped_mm(x_q, quantize_blocks(w), offs=offs).to(x.dtype)  # Fprop (S, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, w, offs = ctx.saved_tensors
        want_dx, want_dw = _wanted(ctx, 0), _wanted(ctx, 1)
        w_q = quantize_blocks(w) if want_dx else None
        dy_q = quantize_tiles(dy) if want_dx else None  # 1 x 128 tiles along the features: any grouping of rows
        dx = torch.zeros(x_q.shape, dtype=torch.float32, device=x_q.device) if want_dx else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_dw else None
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                if want_dx:
                    dx[start:end] = dy_q[start:end] @ w_q[e].T  # Dgrad (rows_e, K)
                if want_dw:
                    dw[e] = quantize_tiles(x_q[start:end], 0).T @ quantize_tiles(dy[start:end], 0)  # Wgrad (K, N)
            start = end
        return (dx.to(ctx.dtype) if want_dx else None), (dw.to(w.dtype) if want_dw else None), None


# ---------------------------------------------------------------------------------------------- the context
def fp8_weight_names(model: nn.Module) -> list[str]:
    """The weights whose products run in FP8: every linear layer's and expert's, but not the embedding, the
    output head or the MoE gate (V3 §3.3.1 keeps them in higher precision)."""
    return [name for name, p in model.named_parameters()
            if p.dim() >= 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight"))]


class _FP8GEMMs(TorchFunctionMode):
    def __init__(self, weights: dict[int, torch.Tensor]):
        super().__init__()
        self.weights = weights  # the FP8 weights by id (held, so that no other tensor can take an id)

    def _chosen(self, w) -> bool:
        return isinstance(w, torch.Tensor) and (id(w) in self.weights or id(w._base) in self.weights)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.linear and len(args) in (2, 3) and (len(args) == 2 or args[2] is None)
                and kwargs.get("bias") is None and self._chosen(args[1])):
            return fp8_linear(args[0], args[1])
        if func is torch._grouped_mm and len(args) == 2 and set(kwargs) == {"offs"} and self._chosen(args[1]):
            return fp8_grouped_mm(args[0], args[1], kwargs["offs"])
        return func(*args, **kwargs)


def fp8_gemms(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of contexts (as autocast) that run the products of ``model``'s FP8 weights as FP8 products.
    Call it after the model's parameters are final (expert parallelism replaces the experts')."""
    names = set(fp8_weight_names(model))
    weights = {id(p): p for name, p in model.named_parameters() if name in names}
    return lambda: _FP8GEMMs(weights)
