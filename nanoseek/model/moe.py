"""DeepSeekMoE (SPEC §4; DeepSeek-V3 §2.1.2, eqs. 12-16): shared experts plus fine-grained routed experts.

The router scores each token against every expert's centroid (sigmoid for V3, softmax for V2) in fp32,
selects the top-k among the groups it may use, with the balancing bias added for selection only, and
weights each selected expert by its normalized, scaled affinity. No token is ever dropped. The routed experts
run over the tokens sorted by expert, as one grouped matrix product per projection (or a loop over the experts
that received rows, where grouped_mm does not apply or the rows are few); some decoding steps take a
static-shape (compiled) or per-token (CPU, one token) path instead (see RoutedExperts.forward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .experts import (_DispatchRows, _GatherRows, every_expert_swiglu, expert_counts, expert_ffn,
                      expert_groups, gathered_swiglu, pads_expert_rows, swiglu)
from .layers import MLP


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
        if self.topk_method != "greedy" and self.n_group > 1:  # node-limited routing: SPEC §4; V3 §2.1.2
            choice_TGe = choice_TE.unflatten(-1, (self.n_group, -1))  # (T, G, E/G)
            if self.topk_method == "noaux_tc":
                group_score_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)  # sum of each group's top-2
            else:
                group_score_TG = choice_TGe.amax(dim=-1)  # V2 group_limited_greedy: the group's best expert
            keep_TG = group_score_TG.topk(self.topk_group, dim=-1).indices
            mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
            choice_TE = choice_TGe.masked_fill(~mask_TG.unsqueeze(-1), float("-inf")).flatten(1)  # (T, E)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, topk_idx_TK)  # gate values use the unbiased s_i (V3 eq. 16)
        if self.norm_topk_prob:  # g = s / sum over the selected k (for k = 1 that is 1, as in transformers)
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)  # V3 eq. 13; SPEC §4
            if not self.scale_normalized:
                return weights_TK, topk_idx_TK, scores_TE
        return weights_TK * self.routed_scaling_factor, topk_idx_TK, scores_TE  # routed_scaling_factor (SPEC §4)


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
    """E SwiGLU experts stored as 3-D tensors (E, 2F, D) and (E, D, F); :meth:`forward` picks one of four ways
    to run them (grouped matrix products over the tokens sorted by expert, or a static-shape or per-token path
    for decoding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        d, f = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.n_experts, 2 * f, d))  # [gate; up] per expert, (E, 2F, D)
        self.down_proj = nn.Parameter(torch.empty(self.n_experts, d, f))  # (E, D, F)

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor,
                idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            # the expert ids syncs other devices. T*K rows (D,) stacked: (T*K, D) -> (T, K, D)
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
    """h' = u + sum_shared FFN_s(u) + sum_routed g_i FFN_i(u)  (V3 eq. 12; the residual is added by the block)."""

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
        out = routed_TD.view(B, T, D)  # (B*T, D) -> (B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        topk_idx = idx_TK.view(B, T, idx_TK.shape[-1])  # (B*T, K) -> (B, T, K)
        scores = scores_TE.view(B, T, scores_TE.shape[-1])  # (B*T, E) -> (B, T, E)
        return out, Routing(topk_idx, scores, counts_E.detach())
