"""DeepSeekMoE (SPEC §4; DeepSeek-V3 §2.1.2, eqs. 12-16): shared experts plus fine-grained routed experts.

The router scores each token against every expert's centroid (sigmoid for V3, softmax for V2) in fp32,
selects the top-k among the groups it may use, with the balancing bias added for selection only, and
weights each selected expert by its normalized, scaled affinity. No token is ever dropped: the routed
experts run as one grouped matrix product over the tokens sorted by expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP, linear, low_precision_cpu


class Routing(NamedTuple):
    """What the losses and the balancing need from one MoE layer's router."""

    topk_idx: torch.Tensor  # (B, T, K) selected experts
    scores: torch.Tensor    # (B, T, E) affinities s_{i,t} (fp32, with gradient)
    counts: torch.Tensor    # (E,) tokens routed to each expert (no gradient)


class Router(nn.Module):
    """Top-k gate with group-limited (node-limited) selection and the auxiliary-loss-free bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # DeepSeek-V2's code scales the gates only when it does not normalize them; V3's scales them always
        self.scale_normalized = config.model_type == "deepseek_v3"
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # centroids e_i
        if self.topk_method == "noaux_tc":
            # b_i: used for selection only, updated outside backprop (SPEC §4)
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        """Keep the centroids and the bias in fp32 when the model is cast (``model.to(torch.bfloat16)``):
        a bias update of gamma = 0.001 would round away in bf16, and the router is computed in fp32. Their fp32
        values are kept as they were (moved to the new device), not rounded through the cast."""
        before = {"weight": self.weight.data, "e_score_correction_bias": self.e_score_correction_bias}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new is None or not new.is_floating_point() or new.dtype == torch.float32 or new.is_meta:
                continue
            kept = old.to(new.device) if old is not None and old.dtype == torch.float32 and not old.is_meta \
                else new.float()
            if name == "weight":
                self.weight.data = kept
            else:
                self.e_score_correction_bias = kept
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return gate weights g (T, K) fp32, expert indices (T, K) and affinities s (T, E) fp32."""
        with torch.autocast(x_TD.device.type, enabled=False):  # the router stays fp32 under autocast
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.scoring_func == "sigmoid":
            scores_TE = logits_TE.sigmoid()  # s_i = sigmoid(u^T e_i)  (V3 eq. 15)
        else:
            scores_TE = logits_TE.softmax(dim=-1)  # V2 eq. 22
        choice_TE = scores_TE.detach()
        if self.e_score_correction_bias is not None:
            choice_TE = choice_TE + self.e_score_correction_bias  # s_i + b_i, for top-k only (V3 eq. 16)
        if self.topk_method != "greedy" and self.n_group > 1:
            choice_TGe = choice_TE.unflatten(-1, (self.n_group, -1))  # (T, G, E/G)
            if self.topk_method == "noaux_tc":
                group_score_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)  # sum of each group's top-2
            else:
                group_score_TG = choice_TGe.amax(dim=-1)  # V2 group_limited_greedy: the group's best expert
            keep_TG = group_score_TG.topk(self.topk_group, dim=-1).indices
            mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
            choice_TE = choice_TGe.masked_fill(~mask_TG.unsqueeze(-1), float("-inf")).flatten(1)  # (T, E)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, topk_idx_TK)  # gate values use the unbiased s_i
        if self.norm_topk_prob:  # g = s / sum over the selected k (for k = 1 that is 1, as in transformers)
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)  # SPEC §4
            if not self.scale_normalized:
                return weights_TK, topk_idx_TK, scores_TE
        return weights_TK * self.routed_scaling_factor, topk_idx_TK, scores_TE  # routed_scaling_factor (SPEC §4)


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows; on CUDA it wants bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16):
            return False
        if x.dtype == torch.float32 and torch.compiler.is_compiling():
            return False  # torch 2.13's shape function (for tracing) accepts only bf16, though the CPU kernel runs fp32
    elif x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    else:
        return False
    size = x.element_size()
    return all((w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0 for w in weights) and all(
        w.dtype == x.dtype for w in weights)


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
    # very few rows (decoding with many experts): grouped_mm still visits every empty group, and a loop over the
    # used experts is faster below about E / 8 rows (measured on CPU from 16 to 256 experts, fp32 and bf16)
    if 8 * x_SD.shape[0] >= gate_up.shape[0] and _grouped_mm_ok(x_SD, gate_up, down):
        offsets = counts_E.cumsum(0).to(torch.int32)
        h_SF2 = torch._grouped_mm(x_SD, gate_up.transpose(-2, -1), offs=offsets)  # (S, 2F)
        gate, up = h_SF2.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offsets)  # (S, D)
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
    h_TEF2 = F.linear(x_TD, gate_up_EFD.reshape(E * F2, D)).view(-1, E, F2)  # (T, E, 2F)
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
    source_G = torch.zeros(int(counts_G.sum()), dtype=source_S.dtype, device=source_S.device)  # padding: row 0
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


# Up to this many tokens, the experts run as T x K separate products (see RoutedExperts.forward). On the
# demo model, 1 made plain decoding 1.06x faster than the sorted grouped path; 2 left speculative decoding's
# 2-token verification as fast as before (1.01x), so the sorted path keeps it.
FEW_TOKENS = 1
# A compiled step without gradients (decoding) whose T x K slots outnumber the experts computes every expert for
# every token while T x E stays within this many rows (see RoutedExperts.forward): the demo model (16 experts)
# up to 64 tokens, the bench preset (64) up to 16, DeepSeek-V3 (256, top-8) never, since its gathered path
# covers up to 32 tokens.
STATIC_EXPERT_ROWS = 1024


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors and run as grouped matrix products (no per-expert loop)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        d, f = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.n_experts, 2 * f, d))  # [gate; up] per expert, (E, 2F, D)
        self.down_proj = nn.Parameter(torch.empty(self.n_experts, d, f))  # (E, D, F)

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_k g_k FFN_{i_k}(x) per token (V3 eq. 12) and the token count per expert (E,)."""
        T, K = idx_TK.shape
        flat_idx = idx_TK.flatten()  # (T*K,) slot t*K + k: token t's k-th expert
        counts_E = expert_counts(flat_idx, self.n_experts)
        compiling = torch.compiler.is_compiling()
        if compiling and T * K <= self.n_experts:
            # a compiled decoding step (nanoseek.inference.compiled): no data-dependent shapes, so each
            # (token, expert) slot multiplies by its expert's weights gathered by index
            y_TKD = gathered_swiglu(x_TD, idx_TK, self.gate_up_proj, self.down_proj)
        elif compiling and not torch.is_grad_enabled() and T * self.n_experts <= STATIC_EXPERT_ROWS:
            # a compiled decoding step of a larger batch: still static shapes, now with every expert computed once
            # per token. The sorted path below splits a step into several graphs at its data-dependent sizes,
            # which compile again as the sizes change (plain decoding of 5 prompts on the demo model: 3-11
            # tokens/s after the first step, against 1,195-1,208 here)
            y_TKD = every_expert_swiglu(x_TD, idx_TK, self.gate_up_proj, self.down_proj)
        elif T <= FEW_TOKENS and x_TD.device.type == "cpu":
            # decoding at batch 1: each token's K experts in turn, on their weights as stored (under autocast
            # F.linear casts just the expert it uses), with no sort and no empty groups; CPU only, since reading
            # the expert ids syncs other devices
            y_TKD = torch.stack([swiglu(x_TD[t: t + 1], self.gate_up_proj[e], self.down_proj[e])[0]
                                 for t, experts in enumerate(idx_TK.tolist()) for e in experts]).view(T, K, -1)
        else:
            order = flat_idx.argsort(stable=True)  # slots sorted by expert
            token_G, pos_S, counts_G = expert_groups(order // K, flat_idx[order], counts_E,
                                                     pads_expert_rows(x_TD, order.numel(), self.n_experts))
            slot_pos = torch.empty_like(order).scatter_(0, order, pos_S)  # row of x_GD / y_GD for each slot t*K + k
            # under torch.compile the two permutations get backward passes that gather rather than scatter into
            # zeros: the routed experts' forward + backward of a bench step took ~17 ms less (eager: ~1 ms more)
            # (G, D) token rows sorted by expert (G = T*K, plus padding)
            x_GD = _DispatchRows.apply(x_TD, token_G, slot_pos, K) if compiling else x_TD.index_select(0, token_G)
            y_GD = expert_ffn(x_GD, counts_G, self.gate_up_proj, self.down_proj)  # (G, D)
            y_SD = _GatherRows.apply(y_GD, slot_pos) if compiling else y_GD.index_select(0, slot_pos)
            y_TKD = y_SD.view(T, K, y_GD.shape[-1])  # (T, K, D) in slot order
        # sum_k g_{t,k} FFN_{i_k}(u_t) as one batched (1 x K) @ (K x D) product per token; in a low-precision
        # compute dtype it accumulates in fp32 and rounds once. With the index_select gather (whose backward is an
        # index_add_, not x[idx]'s accumulating index_put_) a MoE layer's forward + backward on the bench preset
        # ran 1.08x (fp32) to 1.25x (bf16) faster than with x[idx] and a weighted index_add_ into zeros
        out_TD = torch.bmm(weights_TK.unsqueeze(1).to(y_TKD.dtype), y_TKD).squeeze(1)  # (T, D)
        return out_TD.to(x_TD.dtype), counts_E


class MoE(nn.Module):
    """h' = u + sum_shared FFN_s(u) + sum_routed g_i FFN_i(u)  (the residual is added by the block)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        width = config.n_shared_experts * config.moe_intermediate_size
        self.shared_experts = MLP(config.hidden_size, width) if width else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x.shape
        x_TD = x.reshape(B * T, D)  # (B*T, D)
        weights_TK, idx_TK, scores_TE = self.gate(x_TD)
        routed_TD, counts_E = self.experts(x_TD, weights_TK, idx_TK)
        out = routed_TD.view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        routing = Routing(idx_TK.view(B, T, idx_TK.shape[-1]), scores_TE.view(B, T, scores_TE.shape[-1]), counts_E.detach())
        return out, routing
