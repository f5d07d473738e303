"""Training objectives of DeepSeek-V3 (SPEC §4-§5; DeepSeek-V3 §2.1.2-§2.2, eqs. 17-20 and 24-25).

- next-token cross-entropy of the main head;
- the multi-token-prediction loss L_MTP = lambda / D * sum_k L_k (eqs. 24-25);
- the complementary sequence-wise balance loss L_Bal = alpha * sum_i f_i P_i (eqs. 17-20);
- the auxiliary-loss-free bias update b_i += gamma * sign(mean(c) - c_i), applied after each optimizer step
  (auxiliary-loss-free balancing paper, arXiv 2408.15664, Algorithm 1);
- MaxVio, the load-imbalance metric of the same paper.

Label convention (everything below): ``labels[b, i]`` is the target of main-head position i, i.e. t_{i+1}.
Positions whose label equals ``ignore_index`` (padding, the last position of a packed window, ...) count
neither in the numerator nor in the denominator of the cross-entropy means.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .model.moe import Router, Routing
from .model.transformer import DeepSeekV3, ModelOutput

__all__ = [
    "ExpertLoadTracker",
    "LossTerms",
    "cross_entropy_sums",
    "max_violation",
    "mean_max_violation",
    "moe_routers",
    "mtp_loss",
    "next_token_loss",
    "sequence_balance_loss",
    "training_loss",
    "update_balance_bias",
]


# ---------------------------------------------------------------------------------------------- language loss
def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy -(1/N) sum_i log P(labels_i | position i), in fp32.

    Args:
        logits: (B, T, V) (or (N, V)) scores of any float dtype; upcast to fp32 before the softmax.
        labels: (B, T) (or (N,)) integer targets (any integer dtype, e.g. int32 as the ids); ``labels[b, i]`` is
            t_{i+1} for main-head position i.
        ignore_index: label value of positions that carry no loss.

    Returns:
        A scalar fp32 tensor: the mean over the N valid positions (0 when there are none, instead of NaN).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    flat_NV = logits.reshape(-1, logits.shape[-1]).float()  # (N, V) fp32
    flat_N = labels.reshape(-1).long()  # (N,): cross_entropy takes int64 targets only
    # CE = -log softmax(z)[y] summed over valid positions, divided by their number (SPEC §5: -(1/T) sum log P)
    valid_N = flat_N != ignore_index
    if torch.compiler.is_compiling():
        # the same CE as logsumexp(z) - z_y. Its gradient softmax(z) - onehot(y) needs no sum over the vocabulary,
        # which Inductor ran as a scalar loop for log_softmax + nll_loss; z_y as a masked row sum fuses into the
        # logsumexp's pass, and its gradient into the softmax's (the loss backward of a bench step: 12.3 -> 6.2 ms)
        vocab_V = torch.arange(flat_NV.shape[-1], device=flat_N.device)  # (V,)
        onehot_NV = vocab_V == flat_N.unsqueeze(1)  # (V,) == (N, 1) -> (N, V) bool one-hot of the labels
        target_N = torch.where(onehot_NV, flat_NV, 0.0).sum(-1)
        total = ((torch.logsumexp(flat_NV, dim=-1) - target_N) * valid_N).sum()
    else:
        total = F.cross_entropy(flat_NV, flat_N, ignore_index=ignore_index, reduction="sum")
    return total / valid_N.sum().clamp_min(1)


def cross_entropy_sums(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                       ignore_index: int = -100) -> list[tuple[float, int]]:
    """(sum of cross-entropies, number of positions) of the main head and of each MTP depth, for validation.

    ``logits[0]`` is the main head's (B, T, V), ``logits[k]`` depth k's (B, T - k, V), whose position i predicts
    t_{i+k+1} = ``labels[:, i + k]`` (SPEC §5). Sums, not means, so that batches and ranks add up exactly.
    Positions labelled ``ignore_index`` count in neither.
    """
    out = []
    for k, logits_k in enumerate(logits):
        target = labels[:, k:].long()  # (B, T - k)
        # (B*(T-k), V) against (B*(T-k),), in fp32
        ce = F.cross_entropy(logits_k.float().flatten(0, 1), target.flatten(), ignore_index=ignore_index,
                             reduction="sum")
        out.append((ce.item(), int((target != ignore_index).sum())))
    return out


def mtp_loss(mtp_logits: Sequence[torch.Tensor], labels: torch.Tensor,
             ignore_index: int = -100) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-depth MTP cross-entropies L_k (V3 eq. 24) and their unscaled mean (1/D) sum_k L_k.

    Depth k's logits are (B, T - k, V); its position i predicts t_{i+k+1} = ``labels[:, i + k]`` (SPEC §5),
    so its targets are ``labels[:, k:]``. The MTP objective of V3 eq. 25 is lambda times the returned mean:
    lambda / D * sum_k L_k (applied by :func:`training_loss`).

    Returns:
        (mean_k L_k, [L_1, ..., L_D]); (0, []) when the model has no MTP module (or T was too short).
    """
    per_depth: list[torch.Tensor] = []
    for k, logits_k in enumerate(mtp_logits, start=1):
        targets_k = labels[:, k:]  # (B, T - k): position i -> t_{i+k+1}
        if logits_k.shape[:-1] != targets_k.shape:
            raise ValueError(f"depth-{k} MTP logits {tuple(logits_k.shape)} do not match labels[:, {k}:] "
                             f"{tuple(targets_k.shape)}")
        per_depth.append(next_token_loss(logits_k, targets_k, ignore_index))  # L_k, eq. 24
    if not per_depth:
        return labels.new_zeros((), dtype=torch.float32), per_depth
    return torch.stack(per_depth).mean(), per_depth  # (1/D) sum_k L_k


# ---------------------------------------------------------------------------------------------- balance loss
def sequence_balance_loss(routing_list: Sequence[Routing], n_experts: int, top_k: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i P_i (SPEC §4; V3 eqs. 17-20), without alpha.

    For each MoE layer and each sequence of T tokens:
        f_i   = E / (K * T) * sum_t 1[i in TopK(t)]              (eq. 18; no gradient, it is a count)
        s'_it = s_it / sum_j s_jt                                 (eq. 19; sigmoid affinities renormalized)
        P_i   = (1/T) sum_t s'_it                                 (eq. 20; carries the gradient)
        L     = sum_i f_i P_i                                     (eq. 17, without alpha)
    L is averaged over the sequences of the batch (SPEC §4) and **summed over the MoE layers** (MTP modules'
    blocks included). The paper defines L_Bal per MoE layer and applies the same alpha to each; summing the
    per-layer losses is what that means for a single objective, and what DeepSeek's released MoE code does
    (each gate adds its own auxiliary loss to the backward pass). Perfectly balanced routing gives exactly
    1.0 per layer (f_i = 1 and sum_i P_i = 1), so the value is about the number of MoE layers.

    Every token of the batch counts (there is no padding mask): routing is computed for padding too.

    Args:
        routing_list: one :class:`Routing` per MoE layer (``ModelOutput.routing``); ``topk_idx`` (B, T, K)
            and ``scores`` (B, T, E) with gradient.
        n_experts: E, the number of routed experts.
        top_k: K, the number of experts each token selects.

    Returns:
        A scalar fp32 tensor (0 when there is no MoE layer).
    """
    total: torch.Tensor | None = None
    for layer, routing in enumerate(routing_list):
        scores_BTE, idx_BTK = routing.scores, routing.topk_idx
        B, T, E = scores_BTE.shape
        if E != n_experts or idx_BTK.shape[-1] != top_k:
            raise ValueError(f"MoE layer {layer}: routing has E={E}, K={idx_BTK.shape[-1]}, expected "
                             f"E={n_experts}, K={top_k}")
        s_BTE = scores_BTE.to(torch.promote_types(scores_BTE.dtype, torch.float32))
        # eq. 18: f_i = E/(KT) * number of tokens of the sequence that selected expert i
        hits_BE = torch.zeros(B, E, dtype=s_BTE.dtype, device=s_BTE.device)
        hits_BE.scatter_add_(1, idx_BTK.reshape(B, T * top_k), hits_BE.new_ones(B, T * top_k))  # idx (B, T*K)
        f_BE = hits_BE * (n_experts / (top_k * T))
        # eqs. 19-20: P_i = mean over the sequence of the normalized affinity
        p_BE = (s_BTE / s_BTE.sum(-1, keepdim=True)).mean(dim=1)
        loss = (f_BE * p_BE).sum(-1).mean()  # eq. 17 per sequence, averaged over the B sequences
        total = loss if total is None else total + loss
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total


# ---------------------------------------------------------------------------------------------- combined
class LossTerms(NamedTuple):
    """The training objective and its parts (all scalars; ``mtp`` is the unscaled mean of the L_k)."""

    total: torch.Tensor                  # main + mtp_lambda * mtp + balance_alpha * balance
    main: torch.Tensor                   # next-token cross-entropy of the main head
    mtp: torch.Tensor                    # (1/D) sum_k L_k, before lambda
    mtp_per_depth: list[torch.Tensor]    # [L_1, ..., L_D]
    balance: torch.Tensor                # sum over MoE layers of sum_i f_i P_i, before alpha


def training_loss(output: ModelOutput, labels: torch.Tensor, mtp_lambda: float | torch.Tensor = 0.3,
                  balance_alpha: float | torch.Tensor = 0.0001, ignore_index: int = -100) -> LossTerms:
    """The V3 pre-training objective: L_Main + lambda / D * sum_k L_k + alpha * L_Bal (eqs. 17, 25).
    lambda and alpha: numbers, or 0-d tensors (inputs of a compiled step rather than constants).

    V3 values: lambda = 0.3 for the first 10T tokens, then 0.1; alpha = 0.0001 (SPEC §4-§5). E and K are
    read from the routing tensors themselves.
    """
    main = next_token_loss(output.logits, labels, ignore_index)
    mtp, per_depth = mtp_loss(output.mtp_logits, labels, ignore_index)
    mtp = mtp.to(main.device)
    if output.routing:
        n_experts, top_k = output.routing[0].scores.shape[-1], output.routing[0].topk_idx.shape[-1]
        balance = sequence_balance_loss(output.routing, n_experts, top_k)
    else:
        balance = main.new_zeros(())
    total = main + mtp_lambda * mtp + balance_alpha * balance  # lambda/D sum_k L_k == lambda * mean_k L_k
    return LossTerms(total, main, mtp, per_depth, balance)


# ---------------------------------------------------------------------------------------------- loss-free bias
def moe_routers(model: DeepSeekV3) -> list[Router]:
    """The model's routers in the order of ``ModelOutput.routing``: main MoE layers, then MTP blocks."""
    routers = [layer.mlp.gate for layer in model.layers if layer.is_moe]
    routers += [module.block.mlp.gate for module in model.mtp if module.block.is_moe]
    return routers


@torch.no_grad()
def update_balance_bias(model: DeepSeekV3, counts: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing (SPEC §4; V3 §2.1.2; arXiv 2408.15664 Algorithm 1):
    b_i += gamma * sign(mean(c) - c_i) for every ``noaux_tc`` router, after the optimizer step.

    Overloaded experts (c_i above the mean) get a lower bias, underloaded ones a higher bias; an expert at
    exactly the mean is left as it is (sign 0). The bias only changes which experts are selected; the gate
    values keep using the unbiased affinities.

    Args:
        model: the model whose ``e_score_correction_bias`` buffers are updated in place.
        counts: (n_moe_layers, E) tokens routed to each expert over the whole step: ``expert_counts`` summed
            over every micro-batch (see :class:`ExpertLoadTracker`) and, with data parallelism, all-reduced
            (summed) over the ranks first so that every replica applies the same update.
        gamma: the bias update speed (V3: 0.001 for the first 14.3T tokens, then 0).

    Routers without the bias (V2-style ``greedy`` / ``group_limited_greedy``) are skipped.
    Keep the bias buffers in fp32 (SPEC §4) when casting the model to bf16: near |b| = 1 bf16 values are
    2^-7 = 0.0078 apart, more than gamma = 0.001, so the updates would round away.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")  # a NaN would make every bias NaN
    routers = moe_routers(model)
    if counts.dim() != 2 or counts.shape[0] != len(routers):
        raise ValueError(f"counts must be (n_moe_layers={len(routers)}, E), got {tuple(counts.shape)}")
    for router, c_E in zip(routers, counts):
        bias = router.e_score_correction_bias
        if bias is None:
            continue
        c_E = c_E.to(device=bias.device, dtype=torch.float32)
        bias.add_(gamma * torch.sign(c_E.mean() - c_E))  # b_i += gamma * sign(mean(c) - c_i)


class ExpertLoadTracker:
    """Sums ``ModelOutput.expert_counts`` over the micro-batches of one optimizer step.

    Usage::

        tracker = ExpertLoadTracker()
        for micro_batch in step:
            out = model.forward_train(x)
            tracker.add(out.expert_counts)
            ...
        optimizer.step()
        counts = tracker.take()          # (n_moe_layers, E); all_reduce it across data-parallel ranks
        update_balance_bias(model, counts, gamma)
    """

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        """Nothing added since the last ``take``."""
        return self._counts is None

    def add(self, counts: torch.Tensor) -> None:
        """Accumulate one micro-batch's (n_moe_layers, E) counts (detached, int64)."""
        counts = counts.detach().to(torch.int64)
        if self._counts is None:
            self._counts = counts.clone()
        elif self._counts.shape != counts.shape:
            raise ValueError(f"counts shape {tuple(counts.shape)} differs from the step's "
                             f"{tuple(self._counts.shape)}")
        else:
            self._counts += counts

    def take(self) -> torch.Tensor:
        """Return the step's summed counts and reset the tracker."""
        if self._counts is None:
            raise RuntimeError("ExpertLoadTracker.take() called before any add()")
        counts, self._counts = self._counts, None
        return counts


# ---------------------------------------------------------------------------------------------- metrics
def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i c_i - mean c) / mean c per MoE layer (SPEC §4; loss-free balancing paper, arXiv 2408.15664).

    Args:
        counts: (L, E) tokens per expert, one row per MoE layer (or a single (E,) row).

    Returns:
        (L,) fp32 (a scalar for an (E,) input); 0 for a layer that received no token. MaxVio_batch uses one
        training batch's counts, MaxVio_global the counts summed over a validation set.
    """
    c = counts.float()
    mean = c.mean(-1)
    return (c.amax(-1) - mean) / mean.clamp_min(torch.finfo(torch.float32).tiny)


def mean_max_violation(counts: torch.Tensor) -> float:
    """The number to report: MaxVio averaged over the MoE layers (SPEC §4)."""
    return max_violation(counts).mean().item() if counts.numel() else 0.0
