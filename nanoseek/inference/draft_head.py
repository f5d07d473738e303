"""The output head as the draft uses it: int8 weights, read at a quarter of the fp32 bytes.

Speculative sampling is exact for any draft distribution q, as long as the acceptance rule uses the q the draft
was drawn from (Leviathan et al. 2023), so the draft may use a cheaper head than the main model's verification.
On a CPU, decoding a small model is bound by reading weights, and the V x d output head is the largest matrix
read per step (8 MiB in fp32 for the demo model); the MTP draft reads it once more each step. Here it is
quantized per row to int8 (w = scale_v * q, |q| <= 127) once per weight version and multiplied by
``torch._weight_int8pack_mm`` with bf16 activations: 4x fewer bytes than fp32, 2x fewer than bf16. The
verification keeps the model's own head, so the output distribution is still exactly the main model's; only
the draft's agreement with it can change (logits move by about 0.3% of their range).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# quantized copies per head weight: id -> (weak reference, version, q, scale), rebuilt when the weight changes
# (its version counter moves); tensors compare elementwise, so they cannot be dictionary keys themselves
_QUANTIZED: dict[int, tuple] = {}


def int8_head_supported(weight: torch.Tensor) -> bool:
    """The int8 kernel is used on the CPU for fp32/bf16 heads whose width is a multiple of 16 (narrower
    multiples of 8 give wrong results in torch 2.13's kernel, so anything else keeps the plain head)."""
    return (weight.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm") and weight.dim() == 2
            and weight.shape[1] % 16 == 0 and weight.dtype in (torch.float32, torch.bfloat16))


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q (V, d) int8, scale (V,) fp32) with weight ~= scale[:, None] * q."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (V,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (V, d)
    return q, scale


def _version(weight: torch.Tensor) -> int | None:
    """The weight's version counter (it moves on every in-place change); None for an inference-mode tensor,
    which has none: its quantized copy is then rebuilt every time rather than trusted."""
    try:
        return weight._version
    except RuntimeError:
        return None


class DraftHead:
    """``head(h)``: draft logits (..., V) in fp32 for hidden states h (..., d), from an int8 copy of ``weight``
    where :func:`int8_head_supported`, else the weight itself."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.int8 = int8_head_supported(weight)
        if self.int8:
            version = _version(weight)
            cached = _QUANTIZED.get(id(weight))
            if cached is None or cached[0]() is not weight or version is None or cached[1] != version:
                for key in [k for k, v in _QUANTIZED.items() if v[0]() is None]:  # heads freed since
                    del _QUANTIZED[key]
                q, scale = quantize_rows(weight)
                cached = (weakref.ref(weight), version, q, scale.to(torch.bfloat16))
                _QUANTIZED[id(weight)] = cached
            self.q, self.scale = cached[2], cached[3]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            return F.linear(h, self.weight).float()
        flat = h.reshape(-1, h.shape[-1]).to(torch.bfloat16)  # (N, d)
        logits = torch._weight_int8pack_mm(flat, self.q, self.scale)  # (N, V) bf16
        return logits.float().view(*h.shape[:-1], -1)  # (..., V)
