"""Expert parallelism (SPEC §8; DeepSeek-V3 §3.2.2): the routed experts of every MoE layer are split across
the ranks of an EP group, and tokens travel to their experts' ranks and back by all-to-all.

Dispatch sends each token **once per destination rank**, not once per selected expert, together with the
local indices and gate values of the experts it selected there. With group-limited routing whose groups
map onto ranks (``n_group`` a multiple of the EP size), a token reaches at most ``topk_group`` ranks: this
is V3's node-limited routing (at most 4 nodes per token), and it is what bounds the all-to-all volume.

The receiving rank runs its experts as one grouped matrix product over the rows sorted by local expert,
weights each output by its gate value and sums the outputs per received row; the combine all-to-all sends
one row back per (token, rank) pair, and the source sums them. Both all-to-alls are autograd-aware
(``torch.distributed._functional_collectives.all_to_all_single_autograd``), so the backward pass sends
the gradients the same way back. No token is dropped.

Each rank keeps experts ``[r * E_local, (r + 1) * E_local)``; the module's parameters are those slices,
stored under the same names as :class:`nanoseek.model.moe.RoutedExperts` (``gate_up_proj``, ``down_proj``).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..model.experts import expert_ffn, expert_groups, pads_expert_rows
from ..model.moe import MoE, RoutedExperts


# The pipeline micro-batch whose forward runs in this thread (None outside a pipeline). With DualPipeV's F&B
# overlap, one micro-batch's forward runs while another's backward does; each micro-batch's all-to-alls then
# use their own copy of the EP group, so the two streams of collectives can never interleave differently on
# different ranks (a collective's order only has to agree within its group).
CURRENT_MICROBATCH: ContextVar[int | None] = ContextVar("nanoseek_microbatch", default=None)


@contextlib.contextmanager
def microbatch(index: int | None):
    """Run the enclosed forward as pipeline micro-batch ``index`` (see CURRENT_MICROBATCH)."""
    token = CURRENT_MICROBATCH.set(index)
    try:
        yield
    finally:
        CURRENT_MICROBATCH.reset(token)


@dataclass
class DispatchStats:
    """All-to-all traffic of the MoE layers of one rank since the last :meth:`reset` (forward dispatch only;
    the combine sends the same number of rows back, and the backward pass repeats both)."""

    tokens: int = 0           # tokens routed
    slots: int = 0            # (token, selected expert) pairs: what a per-expert dispatch would send
    rows: int = 0             # (token, destination rank) pairs sent, own rank included
    remote_rows: int = 0      # ... to other ranks
    remote_bytes: int = 0     # bytes of the dispatched hidden states sent to other ranks
    max_ranks_per_token: int = 0

    def reset(self) -> None:
        self.tokens = self.slots = self.rows = self.remote_rows = self.remote_bytes = self.max_ranks_per_token = 0

    def as_dict(self) -> dict[str, float]:
        return {"a2a_tokens": self.tokens, "a2a_rows": self.rows, "a2a_remote_rows": self.remote_rows,
                "a2a_remote_bytes": self.remote_bytes, "a2a_slots": self.slots,
                "a2a_ranks_per_token": self.rows / max(self.tokens, 1),
                "a2a_max_ranks_per_token": self.max_ranks_per_token}


def _exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


class ExpertParallelExperts(nn.Module):
    """This rank's slice of a MoE layer's routed experts; same call as :class:`RoutedExperts`."""

    def __init__(self, experts: RoutedExperts, group: dist.ProcessGroup, stats: DispatchStats | None = None):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.n_experts = experts.n_experts
        if self.n_experts % self.ep_size:
            raise ValueError(f"{self.n_experts} routed experts cannot be split evenly over {self.ep_size} EP ranks")
        self.n_local = self.n_experts // self.ep_size
        lo = self.ep_rank * self.n_local
        with torch.no_grad():  # copy the slice so the full tensors can be freed
            self.gate_up_proj = nn.Parameter(experts.gate_up_proj[lo: lo + self.n_local].clone())  # (E_local, 2F, D)
            self.down_proj = nn.Parameter(experts.down_proj[lo: lo + self.n_local].clone())  # (E_local, D, F)
        self.stats = stats if stats is not None else DispatchStats()
        self.microbatch_groups: list[dist.ProcessGroup] = []  # copies of ``group``, one per micro-batch slot

    def _group(self) -> dist.ProcessGroup:
        mb = CURRENT_MICROBATCH.get()
        if mb is None or not self.microbatch_groups:
            return self.group
        return self.microbatch_groups[mb % len(self.microbatch_groups)]

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_k g_k FFN_{i_k}(x) per token (V3 eq. 12) with the experts spread over the EP group, and the
        token count per expert (E,) of this rank's tokens."""
        T, K = idx_TK.shape
        R, E_local = self.ep_size, self.n_local
        counts_E = torch.bincount(idx_TK.flatten(), minlength=self.n_experts)  # (T*K,) ids -> (E,) counts

        # ---- which ranks each token goes to: one row per (token, rank) pair, sorted by rank
        dest_TK = idx_TK // E_local  # rank holding each selected expert
        goes_TR = torch.zeros(T, R, dtype=torch.bool, device=x_TD.device).scatter_(1, dest_TK, True)
        pair_rank, pair_token = goes_TR.T.nonzero(as_tuple=True)  # (P,) each, sorted by rank then token
        here_PK = dest_TK[pair_token] == pair_rank[:, None]  # (P, K) bool: the token's slots this pair's rank serves
        local_PK = torch.where(here_PK, idx_TK[pair_token] % E_local, -1)  # local expert index or -1
        gate_PK = torch.where(here_PK, weights_TK[pair_token].float(), 0.0)  # gate values travel with the row
        group = self._group()
        send = goes_TR.sum(0)  # (R,) rows to each rank
        recv = _exchange_counts(send, group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()

        # ---- dispatch: hidden states, local expert indices and gate values
        x_QD = all_to_all_single_autograd(x_TD[pair_token].contiguous(), recv_sizes, send_sizes, group)
        local_QK = local_PK.new_empty(sum(recv_sizes), K)
        dist.all_to_all_single(local_QK, local_PK.contiguous(), recv_sizes, send_sizes, group=group)
        gate_QK = all_to_all_single_autograd(gate_PK.contiguous(), recv_sizes, send_sizes, group)

        # ---- this rank's experts on the received rows, sorted by local expert
        row_S, k_S = (local_QK >= 0).nonzero(as_tuple=True)
        expert_S = local_QK[row_S, k_S]
        order = expert_S.argsort(stable=True)
        row_S, k_S, expert_S = row_S[order], k_S[order], expert_S[order]
        row_G, pos_S, counts_G = expert_groups(row_S, expert_S, torch.bincount(expert_S, minlength=E_local),
                                               pads_expert_rows(x_QD, len(row_S), E_local))  # see experts.PAD_ROWS
        y_GD = expert_ffn(x_QD.index_select(0, row_G), counts_G, self.gate_up_proj, self.down_proj)  # (G, D)
        y_SD = y_GD if y_GD.shape[0] == len(row_S) else y_GD.index_select(0, pos_S)  # (S, D) in slot order
        # gate (S,) -> (S, 1) times y_SD (S, D)
        y_SD = (y_SD.float() * gate_QK[row_S, k_S][:, None]).to(x_TD.dtype)  # g_{i,t} FFN_i(u_t)
        y_QD = torch.zeros_like(x_QD, dtype=x_TD.dtype).index_add_(0, row_S, y_SD)  # summed per received row

        # ---- combine: one row back per (token, rank) pair, summed per token at the source
        back_PD = all_to_all_single_autograd(y_QD.contiguous(), send_sizes, recv_sizes, group)
        out_TD = torch.zeros_like(x_TD).index_add_(0, pair_token, back_PD.to(x_TD.dtype))

        st = self.stats
        st.tokens += T
        st.slots += T * K
        st.rows += len(pair_token)
        remote = len(pair_token) - send_sizes[self.ep_rank]
        st.remote_rows += remote
        st.remote_bytes += remote * x_TD.shape[-1] * x_TD.element_size()
        if T:
            st.max_ranks_per_token = max(st.max_ranks_per_token, int(goes_TR.sum(1).max()))
        return out_TD, counts_E


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE module of the model (main layers, then MTP blocks) with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def is_expert_param(name: str) -> bool:
    """Routed-expert weights: sharded over EP ranks, replicated over DP ranks."""
    return ".experts." in name and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> DispatchStats:
    """Replace every MoE layer's routed experts by this rank's slice of them (in place); return the dispatch
    statistics shared by all layers. Every rank must have built the model identically (same seed)."""
    stats = DispatchStats()
    for _, moe in moe_modules(model):
        moe.experts = ExpertParallelExperts(moe.experts, group, stats)
    return stats


def use_microbatch_groups(model: nn.Module, groups: list[dist.ProcessGroup]) -> None:
    """Give every expert-parallel layer one EP group per micro-batch slot (all with the same ranks)."""
    for _, moe in moe_modules(model):
        if isinstance(moe.experts, ExpertParallelExperts):
            moe.experts.microbatch_groups = list(groups)


def node_limit_note(n_group: int, topk_group: int, topk_method: str, ep: int) -> str:
    """How many EP ranks a token can reach under the config's group limit."""
    if topk_method == "greedy" or n_group <= 1 or topk_group >= n_group:
        return f"no group limit: a token may reach all {ep} EP ranks"
    if n_group % ep == 0:
        groups_per_rank = n_group // ep
        return (f"{n_group} expert groups on {ep} EP ranks ({groups_per_rank} per rank): a token reaches at most "
                f"{min(topk_group, ep)} ranks (node-limited routing)")
    return (f"{n_group} expert groups do not map onto {ep} EP ranks; the group limit ({topk_group}) does not bound "
            "the ranks a token reaches")
