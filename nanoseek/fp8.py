"""FP8 checkpoints (SPEC §7): the public DeepSeek-V3/R1 weights store most Linear weights as float8_e4m3fn, each
with ``<name>.weight_scale_inv``, one fp32 scale per 128 x 128 weight block; the dequantized weight is each block
times its scale. config.json's quantization_config gives the block size.
"""

from __future__ import annotations

import math

import torch

from .errors import CheckpointError

FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"


def _block_dims(block: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(block, int):
        return block, block
    b_out, b_in = block
    return int(b_out), int(b_in)


def fp8_scale_shape(shape: tuple[int, ...], block: int | tuple[int, int] = FP8_BLOCK) -> tuple[int, int]:
    """(ceil(out / 128), ceil(in / 128)): one scale per weight block."""
    b_out, b_in = _block_dims(block)
    return math.ceil(shape[0] / b_out), math.ceil(shape[1] / b_in)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int | tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """weight (out, in) float8_e4m3fn times its per-(128 x 128)-block scale (ceil(out/128), ceil(in/128))."""
    if weight.dim() != 2:
        raise CheckpointError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    out_dim, in_dim = weight.shape
    b_out, b_in = _block_dims(block)
    expected = fp8_scale_shape((out_dim, in_dim), (b_out, b_in))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"FP8 scale of shape {tuple(scale_inv.shape)} does not match weight "
                              f"{tuple(weight.shape)} (expected {expected})")
    # each block's scale over its rows and columns: (ceil(out/b_out), ceil(in/b_in)) -> (out, in)
    scale = scale_inv.float().repeat_interleave(b_out, 0)[:out_dim].repeat_interleave(b_in, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: int | tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization as in the public checkpoints: (float8_e4m3fn weight, fp32 scale_inv) with
    ``dequantize_fp8(*quantize_fp8(w)) ~= w``."""
    out_dim, in_dim = weight.shape
    b_out, b_in = _block_dims(block)
    rows, cols = fp8_scale_shape((out_dim, in_dim), (b_out, b_in))
    padded = weight.new_zeros(rows * b_out, cols * b_in, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, b_out, cols, b_in)  # block (r, c) = blocks[r, :, c, :]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (rows, cols)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max  # (rows, cols)
    # scale (rows, 1, cols, 1) over each block; q (rows*b_out, cols*b_in)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * b_out, cols * b_in)
    return q[:out_dim, :in_dim].contiguous(), scale


def fp8_block_size(raw: dict) -> tuple[int, int]:
    """The (out, in) block of a config.json's FP8 quantization_config (128 x 128 when absent)."""
    q = raw.get("quantization_config")
    if not q:
        return FP8_BLOCK, FP8_BLOCK
    if not isinstance(q, dict) or q.get("quant_method", "fp8") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"config.json quantization_config quant_method {method!r} is not supported (fp8)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"config.json quantization_config fmt {q.get('fmt')!r} is not supported (e4m3)")
    block = q.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    try:
        b_out, b_in = _block_dims(block)
        if b_out <= 0 or b_in <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json quantization_config weight_block_size {block!r} must be two "
                              "positive integers") from None
    return b_out, b_in
