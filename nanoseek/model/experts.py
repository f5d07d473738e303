"""The routed experts' computation (SPEC §4): each expert's SwiGLU on the rows routed to it, as grouped matrix
products over the rows sorted by expert (each expert's rows padded for low-precision products on the CPU, see
PAD_ROWS) or a loop over the experts that received rows; the static-shape kernels of compiled decoding (weights
gathered per slot, or every expert on every token); and the autograd functions that move the rows to the experts
and back. RoutedExperts.forward (moe.py) picks among them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_grouped_mm
from .grouped_mm import grouped_mm
from .layers import EMULATED_ROWS, emulated_low_precision, linear, low_precision_cpu


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows; on CUDA it wants bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    else:
        return False
    size = x.element_size()
    return all((w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0 for w in weights) and all(
        w.dtype == x.dtype for w in weights)


def _cpu_kernel_ok(x_SD: torch.Tensor, gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> bool:
    """Whether both projections take nanoseek's grouped bf16 CPU kernel (cpu_grouped_mm) instead of
    torch._grouped_mm: bf16 on a CPU where it runs, and not inside cpu_grouped_mm.disabled()."""
    return cpu_grouped_mm.supported(x_SD, gate_up_EFD, down_EDF) and cpu_grouped_mm.available()


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


def expert_counts(flat_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots routed to each expert (E,). Under torch.compile as a scatter-add into E counters: bincount's
    output size depends on the data, which would break the graph."""
    if torch.compiler.is_compiling():
        return torch.zeros(n_experts, dtype=torch.long, device=flat_idx.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx))
    return torch.bincount(flat_idx, minlength=n_experts)


def swiglu(x: torch.Tensor, gate_up_FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    """One expert's FFN on its rows x (N, D): down(silu(gate x) * up x), gate_up_FD = [gate; up] (2F, D)."""
    gate, up = linear(x, gate_up_FD).chunk(2, dim=-1)  # (N, F) each
    return linear(F.silu(gate) * up, down_DF)  # (N, D)


def expert_ffn(x_SD: torch.Tensor, counts_E: torch.Tensor, gate_up_EFD: torch.Tensor,
               down_EDF: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert on its rows: x_SD holds the rows sorted by expert, ``counts_E[e]`` of them for
    expert e; returns FFN_e(x) per row (S, D), as one grouped matrix product per projection when it can."""
    gate_up, down = gate_up_EFD, down_EDF
    if torch.is_autocast_enabled(x_SD.device.type):  # grouped_mm is not on autocast's list: cast here
        dtype = torch.get_autocast_dtype(x_SD.device.type)
        x_SD, gate_up, down = x_SD.to(dtype), gate_up.to(dtype), down.to(dtype)
    if x_SD.shape[0] >= EMULATED_ROWS and emulated_low_precision(x_SD) and not torch.is_autocast_enabled("cpu"):
        # a prompt chunk on a CPU that emulates 16-bit products: in fp32 (see layers.linear), rounded back
        return expert_ffn(x_SD.float(), counts_E, gate_up.float(), down.float()).to(x_SD.dtype)  # (S, D)
    # very few rows (decoding with many experts): grouped_mm still visits every empty group, and a loop over the
    # used experts is faster below about E / 8 rows (measured on CPU from 16 to 256 experts, fp32 and bf16)
    if 8 * x_SD.shape[0] >= gate_up.shape[0] and _grouped_mm_ok(x_SD, gate_up, down):
        offsets = counts_E.cumsum(0).to(torch.int32)
        if _cpu_kernel_ok(x_SD, gate_up, down):  # bf16 on a CPU with AVX-512 bf16: nanoseek's grouped kernel
            h_SF2 = cpu_grouped_mm.grouped_mm_bf16(x_SD, gate_up, offsets)  # (S, 2F)
            gate, up = h_SF2.chunk(2, dim=-1)
            return cpu_grouped_mm.grouped_mm_bf16(F.silu(gate) * up, down, offsets)  # (S, D)
        mm = _grouped_mm
        if x_SD.dtype == torch.float32 and torch.compiler.is_compiling():
            mm = grouped_mm  # torch 2.13 traces grouped_mm in bf16 only: the same kernel as a custom op
        h_SF2 = mm(x_SD, gate_up.transpose(-2, -1), offsets)  # (S, 2F)
        gate, up = h_SF2.chunk(2, dim=-1)
        return mm(F.silu(gate) * up, down.transpose(-2, -1), offsets)  # (S, D)
    chunks = []  # fallback: one matmul per expert that received rows
    for e, x_e in enumerate(x_SD.split(counts_E.tolist())):
        if x_e.shape[0]:
            chunks.append(swiglu(x_e, gate_up[e], down[e]))
    # no row at all: an empty result that still depends on x_SD, so that whatever produced x_SD runs its
    # backward too (expert parallelism: every rank must join the dispatch all-to-all's backward)
    return torch.cat(chunks) if chunks else x_SD[:, : down.shape[1]] * 0


def gathered_swiglu(x_TD: torch.Tensor, idx_TK: torch.Tensor, gate_up_EFD: torch.Tensor,
                    down_EDF: torch.Tensor) -> torch.Tensor:
    """FFN_{i_k}(x_t) for every (token, expert) slot as batched products over each slot's expert weights,
    gathered by index: (T, K, D). Static shapes whatever the routing; it reads (copies) T x K expert weights,
    so it suits a few tokens (decoding), not a batch."""
    T, K = idx_TK.shape
    flat_idx = idx_TK.flatten()  # (T*K,)
    gate_up, down = gate_up_EFD[flat_idx], down_EDF[flat_idx]  # (T*K, 2F, D), (T*K, D, F)
    # (bmm is on autocast's list: under autocast it casts these itself, unlike grouped_mm in expert_ffn)
    x_SD1 = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[-1]).reshape(T * K, -1, 1)  # (T*K, D, 1): slot t*K + k
    gate, up = torch.bmm(gate_up, x_SD1).squeeze(-1).chunk(2, dim=-1)  # (T*K, F) each
    y_SD = torch.bmm(down, (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # (T*K, D)
    return y_SD.view(T, K, -1)  # (T, K, D)


def every_expert_swiglu(x_TD: torch.Tensor, idx_TK: torch.Tensor, gate_up_EFD: torch.Tensor,
                        down_EDF: torch.Tensor) -> torch.Tensor:
    """FFN_e(x_t) for every expert e and token t, then each token's K routed ones: (T, K, D). Static shapes
    whatever the routing; it reads each expert's weights once and computes E / K times the routed work, so it
    suits a compiled decoding step of a few tokens that route to more slots (T x K) than there are experts."""
    E, F2, D = gate_up_EFD.shape
    # every expert's [gate; up] rows as one weight (E*2F, D): x (T, D) -> (T, E*2F) -> (T, E, 2F)
    h_TEF2 = F.linear(x_TD, gate_up_EFD.reshape(E * F2, D)).view(-1, E, F2)
    gate, up = h_TEF2.chunk(2, dim=-1)  # (T, E, F) each
    y_ETD = torch.bmm((F.silu(gate) * up).transpose(0, 1), down_EDF.transpose(1, 2))  # (E, T, D)
    return y_ETD.transpose(0, 1).gather(1, idx_TK[..., None].expand(-1, -1, D))  # (T, K, D)


# bf16 / fp16 matrix products on the CPU go through oneDNN, which compiles a kernel for each new shape and caches
# it. An expert's row count changes from step to step, so a training step met new shapes in nearly every
# per-expert product and compiled them anew: the routed experts of the bench preset (64 experts, 12,288 rows)
# took 124 ms per layer for forward + backward in bf16, against 60 ms with each expert's rows padded to a
# multiple of 32 (16: 64 ms, 64: 61 ms, 128: 69 ms; fp32 products do not compile per shape and gain nothing).
# Padding rows read token 0; their outputs are never read back, so they get no gradient and change nothing.
PAD_ROWS = 32


def padded_counts(counts_E: torch.Tensor) -> torch.Tensor:
    """Each count rounded up to a multiple of PAD_ROWS, or of 1/32 of its power of two above 1024 rows (so
    a few shapes per octave whatever the load; at most ~3% more rows for such an expert); 0 stays 0."""
    octave = torch.ceil(torch.log2(counts_E.clamp(min=1).to(torch.float32)))  # c <= 2^octave
    step = torch.exp2(octave - 5).clamp(min=PAD_ROWS).to(counts_E.dtype)
    return (counts_E + step - 1) // step * step


def padded_rows_bound(slots: int, n_experts: int) -> int:
    """An upper bound on padded_counts(counts).sum() for any counts of ``slots`` slots over ``n_experts``: an
    expert of c rows gains at most PAD_ROWS - 1 rows, or less than c / 16 above 1024 rows (its step, 1/32 of a
    power of two below 2c)."""
    return slots + n_experts * (PAD_ROWS - 1) + slots // 16


def pads_expert_rows(x_TD: torch.Tensor, rows: int, n_experts: int) -> bool:
    """Whether to pad the expert groups: low-precision products on the CPU, with enough rows per expert on
    average that padding costs little (not for decoding, whose few rows would grow many-fold)."""
    return rows >= PAD_ROWS * n_experts and low_precision_cpu(x_TD)


def expert_groups(source_S: torch.Tensor, expert_S: torch.Tensor, counts_E: torch.Tensor,
                  pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out the rows that the experts receive: ``source_S`` (S,) the input row of each routed slot and
    ``expert_S`` its expert, both sorted by expert; ``counts_E`` slots per expert. Returns ``source_G`` (G,) the
    input row of each row of the experts' input, ``pos_S`` (S,) the row of that input holding each slot, and
    ``counts_G`` (E,) rows per expert there: the slots themselves, or with ``pad`` each expert's rows padded
    (see PAD_ROWS) by rows that read input row 0."""
    pos_S = torch.arange(source_S.numel(), device=source_S.device)
    if not pad:
        return source_S, pos_S, counts_E
    counts_G = padded_counts(counts_E)
    shift_E = (counts_G.cumsum(0) - counts_G) - (counts_E.cumsum(0) - counts_E)  # padding rows before expert e
    pos_S = pos_S + shift_E[expert_S]
    # under torch.compile the rows are a static bound on counts_G.sum() (reading the sum would break the graph,
    # twice per MoE layer); the rows past the last group belong to no expert: grouped_mm neither computes nor
    # reads them, and no slot takes their output
    rows = padded_rows_bound(source_S.numel(), counts_E.numel()) if torch.compiler.is_compiling() \
        else int(counts_G.sum())
    source_G = torch.zeros(rows, dtype=source_S.dtype, device=source_S.device)  # padding: row 0
    source_G.index_copy_(0, pos_S, source_S)
    return source_G, pos_S, counts_G


class _DispatchRows(torch.autograd.Function):
    """x_GD = x_TD[token_G] whose backward sums each token's K rows by a gather (``rows_S``: the row of x_GD of each
    slot t*K + k) instead of index_add's scatter into zeros. Padding rows are left out: their outputs are never
    read, so their gradient is zero."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_G: torch.Tensor, rows_S: torch.Tensor, K: int) -> torch.Tensor:
        ctx.save_for_backward(rows_S)
        ctx.K = K
        return x_TD.index_select(0, token_G)  # (G, D)

    @staticmethod
    def backward(ctx, grad_GD: torch.Tensor):
        (rows_S,) = ctx.saved_tensors
        grad_TKD = grad_GD.index_select(0, rows_S).view(-1, ctx.K, grad_GD.shape[-1])  # (T, K, D)
        return grad_TKD.sum(1), None, None, None


class _GatherRows(torch.autograd.Function):
    """y_SD = y_GD[rows_S] for distinct rows, whose backward gathers (a zero row for the rows not taken) instead
    of index_add's scatter into zeros."""

    @staticmethod
    def forward(ctx, y_GD: torch.Tensor, rows_S: torch.Tensor) -> torch.Tensor:
        S = rows_S.numel()
        slot_G = torch.full((y_GD.shape[0],), S, dtype=rows_S.dtype, device=rows_S.device).scatter_(
            0, rows_S, torch.arange(S, device=rows_S.device))  # (G,) the slot each row went to, S: none
        ctx.save_for_backward(slot_G)
        return y_GD.index_select(0, rows_S)  # (S, D)

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):
        (slot_G,) = ctx.saved_tensors
        padded = torch.cat([grad_SD, grad_SD.new_zeros(1, grad_SD.shape[-1])])  # (S + 1, D), row S = 0
        return padded.index_select(0, slot_G), None
