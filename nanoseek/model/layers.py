"""Building blocks shared across the model: RMSNorm, the SwiGLU feed-forward network, linear layers, and a dtype
check."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import devices

LOW_PRECISION = (torch.bfloat16, torch.float16)
EMULATED_ROWS = 16  # from this many rows on, an emulated 16-bit product is faster done in fp32 (see linear)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def low_precision_cpu(x: torch.Tensor) -> bool:
    """Whether x is on the CPU and its products run in bf16 / fp16 through oneDNN's native paths (see
    experts.PAD_ROWS), which some layers take other routes for. Not on a CPU that only emulates them: there a
    bf16 forward of 512 tokens (DeepSeek-V2-Lite's shapes, 3 layers) ran 2x faster on the fp32 routes."""
    dtype = compute_dtype(x)
    return dtype in LOW_PRECISION and x.device.type == "cpu" and devices.native_products(dtype, x.device)


def emulated_low_precision(x: torch.Tensor) -> bool:
    """Whether x is bf16 / fp16 on a CPU that has no native products in that dtype (an AVX2-only x86 CPU), where
    PyTorch runs them through a reference kernel, one row at a time (nanoseek.devices.native_products)."""
    return x.dtype in LOW_PRECISION and x.device.type == "cpu" and not devices.native_products(x.dtype, x.device)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x (..., K), weight (N, K) -> (..., N). A single row in bf16 on the CPU (decoding
    at batch 1) is a matrix-vector product: ``torch.mv`` reads the weight 1.5-1.9x faster there than F.linear's
    single-row product for weights of 2 MiB and more (2 threads: DeepSeek-V2-Lite's 2816 x 2048 experts 0.36
    against 0.64 ms, its 102400 x 2048 head 18 against 27 ms), 1.1-1.2x at 0.4-0.5 MiB and as fast below
    (benchmarks/results/decode.md).
    Not fp16, whose F.linear is 2-5x faster than its mv; not under autocast or torch.compile, whose paths are
    their own (see nanoseek.inference.compiled).
    On a CPU that only emulates 16-bit products, EMULATED_ROWS rows or more (a prompt chunk) are multiplied in
    fp32 and rounded back: the emulated kernel's time grows with every row, so converting the weight first was
    1.0-2.6x faster at 16 rows and 2.8-5.7x at 64 (2-core AVX2 EPYC, weights from 512 x 512 to 8192 x 512).
    The result is the same product rounded once, up to the order of the fp32 sums."""
    if (weight.dtype == x.dtype and x.numel() >= EMULATED_ROWS * x.shape[-1] and emulated_low_precision(x)
            and not torch.is_autocast_enabled("cpu")):
        return F.linear(x.float(), weight.float()).to(x.dtype)  # (..., N)
    if (x.dtype == torch.bfloat16 and not torch.compiler.is_compiling() and x.numel() == x.shape[-1]
            and weight.dtype == x.dtype and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])  # (..., N)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear without a bias whose product is :func:`linear` (same parameters, same checkpoint names)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) (SPEC §2): normalized in fp32 and rounded to the input dtype, then
    scaled by w, so the result has the promoted dtype of w and x (fp32 for an fp32 weight on bf16 x), as in
    transformers."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula as one fused op (fp32 throughout: results and gradients were bit-identical on the
            # CPU); a decoding step runs ~17 norms on single rows, where each op's dispatch is the cost
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (SPEC §4). Dense FFN of the first layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
