"""The device a command runs on, from its ``--device`` option (one check for train, generate, chat, eval-long), and
which 16-bit matrix products it runs natively."""

from __future__ import annotations

import functools

import torch


def pick_device(name: str | torch.device | None, what: str = "--device") -> torch.device:
    """``name`` as a torch.device (None: cuda if available, else cpu); a ValueError (one line, naming ``what``)
    for a name torch does not know, the data-less meta device, or cuda on a machine without it."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid {what} {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "meta":
        raise ValueError(f"{what} meta holds no data: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: CUDA is not available on this machine")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products in hardware: a CUDA GPU that supports bf16, or a CPU with
    AVX-512 (BF16 or AMX included) or Arm's BF16 extension, as oneDNN reports. Elsewhere (an AVX2-only x86 CPU)
    PyTorch falls back to a reference kernel: on a 2-core AVX2 AMD EPYC a 512^3 bf16 product ran at 1.3 GFLOP/s
    against 90 in fp32, so a bf16 training step there would be ~50x slower than in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _onednn_supports("bf16")
    return True  # other accelerators: trust the user's choice


def native_fp16(device: torch.device) -> bool:
    """Whether ``device`` runs fp16 matrix products in hardware: any CUDA GPU, or a CPU for which oneDNN reports
    fp16 support (AVX-512 FP16 or AMX-FP16). An AVX2-only CPU emulates them as it does bf16, row by row."""
    if device.type == "cpu":
        return _onednn_supports("fp16")
    return True


@torch.compiler.assume_constant_result  # so that a compiled model takes the same routes as an eager one
def _onednn_supports(dtype: str) -> bool:
    """oneDNN's report on this CPU's ``dtype`` ("bf16" / "fp16") products."""
    return _ask_onednn(dtype)


@functools.cache
def _ask_onednn(dtype: str) -> bool:
    """Asked once per process: the query costs ~8 us and the model asks in every attention layer. A build
    without oneDNN has no fast path either."""
    try:
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{dtype}_supported")())
    except (AttributeError, RuntimeError):
        return False


def native_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` runs matrix products in ``dtype`` at hardware speed (fp32 and fp64 always do)."""
    if dtype == torch.bfloat16:
        return native_bf16(device)
    if dtype == torch.float16:
        return native_fp16(device)
    return True


def training_dtype(dtype: str, device: torch.device) -> str:
    """The precision a run of ``nanoseek train --dtype dtype`` computes in on ``device``: ``bf16`` (autocast)
    only where bf16 products are native, fp32 elsewhere; every other choice as given."""
    return "fp32" if dtype == "bf16" and not native_bf16(device) else dtype
