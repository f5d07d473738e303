"""Pipeline-parallel training of a :class:`~nanoseek.DeepSeekV3` on ``torch.distributed.pipelining`` (SPEC §8).

The model is cut into a sequence of *stages* (contiguous slices of the layer stack) and each rank of the
pipeline group runs its stages on a stream of equal micro-batches, following a schedule:

- ``"1f1b"``: one stage per rank; after a warm-up every rank alternates one forward and one backward
  (PipeDream-flush). Bubble (PP-1)(F+B).
- ``"interleaved-zb"``: two stages per rank, looped (rank r holds stages r and r + PP), with the
  zero-bubble split of the backward into B = I (input gradient, on the critical path) + W (weight
  gradient, deferred into the bubbles); ZB1P of arXiv 2401.10241. Bubble (PP-1)(F+B-2W).
- ``"dualpipev"`` (default): DeepSeek-V3's DualPipe (§3.2.1) "cut in half": two stages per rank placed as a
  V (rank r holds stages r and 2PP-1-r), so the micro-batches flow down the ranks and back up. In the
  steady state each rank runs the forward of one chunk paired with the backward of another (the
  ``OVERLAP_F_B`` action, "F&B"), and the tail uses the I/W split. Bubble (PP/2-1)(F&B+B-3W) counted
  in DualPipe's PP = 2 x ranks stages, with 1x parameters (no second model copy, unlike DualPipe).
- ``"zbv"``: the zero-bubble V schedule (ZB-V, same V placement, no F&B pairing).

Placement. Stage 0 holds the embedding and the first layers; the last stage the last layers, the final
norm, the output head and the MTP modules. DeepSeek-V3 (§3.2.1) deploys "the shallowest layers (including the
embedding layer) and deepest layers (including the output head) of the model on the same PP rank", which
lets the MTP modules share the embedding and the head physically: the V schedules do exactly that (stages 0
and 2PP-1 live on rank 0). With the looped schedules the last stage lives on rank PP-1, which therefore uses
its own copy of the embedding (its process's ``model.embed_tokens``, set equal to rank 0's at construction);
after every backward the two copies' gradients are summed across the two ranks, so both apply identical
updates, and the copy is listed in :attr:`PipelineRunner.duplicate_params`.

Token ids travel down the pipeline next to the hidden state as a second, integer output (sent without
gradient) because the MTP modules at the last stage embed t_{i+k}. The last stage returns the main and MTP
logits; the schedule's loss function computes next-token + lambda x MTP cross-entropies against the labels.
The sequence-wise balance loss is per MoE layer and the layers live on different stages, so each MoE
layer's alpha x L_Bal enters the backward where it is computed, through :class:`AddAuxiliaryLoss` (a
zero-forward autograd function, as DeepSeek's own modeling code does it).

Overlap. The ``OVERLAP_F_B`` function registered on DualPipeV runs the paired forward and backward of two
different micro-batches and *starts the forward's send to the next rank before* the backward finishes (torch's
default runtime sends only after both), so the next rank gets its input one backward earlier. With expert
parallelism (``overlap_threads``, set by the distributed trainer) the forward runs in a second thread while the
backward runs in the schedule's thread: one chunk's all-to-all dispatch and combine (and their waits) proceed
while the other chunk computes, which is what DualPipe's F&B overlap is for. Collectives stay safe because each
micro-batch's expert-parallel all-to-alls use their own copy of the EP group (``expert_parallel.microbatch``;
the backward's all-to-alls reuse the group their forward captured): within a group the order of collectives is
the same on every rank, and the two threads never share a group. Compute order inside each chunk never changes.
What this does not do is DeepSeek's finer interleaving (attention / dispatch / MLP / combine of the two chunks
on separate GPU streams with SM partitioning); on a CPU the two threads share the cores, so the gain is the
communication wait, not more compute.

Uses ``PipelineStage`` with static shapes (no metadata-inference forward): a schedule is built per
micro-batch shape and cached. Tested on torch 2.13 (the custom F&B function replays the runtime's
forward/backward bookkeeping, which is private API).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    FULL_BACKWARD,
    FORWARD,
    OVERLAP_F_B,
    SEND_F,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
    _Action,
    _batch_p2p,
    _PipelineContext,
    _wait_batch_p2p,
)

from ..config import ModelConfig
from ..model.moe import Routing
from ..model.transformer import DeepSeekV3
from ..objectives import cross_entropy_sums, mtp_loss, next_token_loss, sequence_balance_loss
from .expert_parallel import microbatch

__all__ = ["SCHEDULES", "AddAuxiliaryLoss", "EvalStats", "PipelineRunner", "StepLosses", "plan_stages"]

SCHEDULES = ("dualpipev", "1f1b", "interleaved-zb", "zbv")
V_SCHEDULES = ("dualpipev", "zbv")


class StepLosses(NamedTuple):
    """One step's loss values (full batch, identical on every pp rank); ``mtp`` is before lambda and
    ``balance`` (summed over MoE layers) before alpha, as in :class:`nanoseek.objectives.LossTerms`."""

    total: float
    main: float
    mtp: float
    mtp_per_depth: list[float]
    balance: float


@dataclass
class EvalStats:
    """Forward-only sums over an evaluation batch (identical on every pp rank, except ``expert_counts``,
    which holds this rank's MoE modules)."""

    main_sum: float                 # sum of main-head cross-entropies over the tokens
    n_tokens: int
    mtp_sums: list[float]           # per depth k: sum over the B x (T - k) positions
    mtp_tokens: list[int]
    expert_counts: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class StageLayout:
    """Which layers each stage runs and which pp rank holds it."""

    layers: tuple[range, ...]       # per stage
    stage_rank: tuple[int, ...]     # per stage: its rank in the pp group

    @property
    def n_stages(self) -> int:
        return len(self.layers)


def plan_stages(config: ModelConfig, pp_size: int, schedule: str, n_microbatches: int) -> StageLayout:
    """Split the layers into stages for ``schedule`` on ``pp_size`` ranks; ValueError naming the problem.

    Stages: PP for 1f1b, 2 x PP for the others. Every stage gets at least one layer; leftover layers go to
    the middle stages first (stage 0 also runs the embedding, the last stage the head and the MTP modules).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pp_size < 2:
        raise ValueError(f"pipeline parallelism needs at least 2 ranks in the pp group, got {pp_size}")
    n_stages = pp_size if schedule == "1f1b" else 2 * pp_size
    n_layers = config.num_hidden_layers
    if n_layers < n_stages:
        raise ValueError(f"{n_layers} layers cannot be split into the {n_stages} stages of {schedule} on "
                         f"{pp_size} ranks (every stage needs at least one layer)")
    # enough micro-batches to fill the pipeline: torch requires it of 1F1B and DualPipeV; ZB-V is held to
    # DualPipeV's rule, interleaved ZB to 1F1B's
    min_mb = {"1f1b": pp_size, "dualpipev": n_stages, "zbv": n_stages, "interleaved-zb": pp_size}[schedule]
    if n_microbatches < min_mb:
        raise ValueError(f"{schedule} on {pp_size} ranks ({n_stages} stages) needs at least {min_mb} "
                         f"micro-batches, got n_microbatches={n_microbatches}")
    rounds = max(1, n_microbatches // pp_size)  # ScheduleInterleavedZeroBubble's rounds of micro-batches
    if schedule == "interleaved-zb" and n_microbatches % rounds:
        raise ValueError(f"interleaved-zb runs n_microbatches={n_microbatches} in {rounds} equal rounds, which "
                         f"does not divide; use a multiple of the pp size {pp_size}")
    base, extra = divmod(n_layers, n_stages)
    sizes = [base] * n_stages
    for s in (list(range(1, n_stages - 1)) + [0, n_stages - 1])[:extra]:
        sizes[s] += 1
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    layers = tuple(range(start, start + size) for start, size in zip(starts, sizes))
    if schedule in V_SCHEDULES:  # V: down the ranks, then back up
        stage_rank = tuple(s if s < pp_size else 2 * pp_size - 1 - s for s in range(n_stages))
    else:  # looped: stage s on rank s mod PP
        stage_rank = tuple(s % pp_size for s in range(n_stages))
    return StageLayout(layers, stage_rank)


# ---------------------------------------------------------------------------------------------- balance loss
class AddAuxiliaryLoss(torch.autograd.Function):
    """Return ``x`` unchanged (a view of it); in the backward, also send gradient 1 into ``aux`` (a scalar
    loss term).

    So ``AddAuxiliaryLoss.apply(x, alpha * L_bal)`` adds d(alpha L_bal)/d(theta) to the backward of whatever
    consumes ``x``, without the loss having to reach the end of the pipeline (DeepSeek's modeling code).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype, ctx.aux_device = aux.dtype, aux.device
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        return grad_x, torch.ones((), dtype=ctx.aux_dtype, device=ctx.aux_device)


class _Recorder:
    """What the stages observe during one step (or one evaluation): balance losses and expert counts."""

    def __init__(self) -> None:
        self.reset(balance_scale=None)

    def reset(self, balance_scale: float | None) -> None:
        """``balance_scale``: alpha / n_microbatches to put the balance loss into the backward (0: only
        record it); None: evaluation, record the expert counts only."""
        self.balance_scale = balance_scale
        self.balance_sum: torch.Tensor | float = 0.0  # over MoE layers and micro-batches (fp64, no sync)
        self.counts: dict[str, torch.Tensor] = {}
        self.ce_sums: list[torch.Tensor] = []  # [main, depth 1, ..., depth D], summed over micro-batches

    def observe(self, x: torch.Tensor, routing: Routing, name: str) -> torch.Tensor:
        counts = routing.counts.detach().to(torch.int64)
        self.counts[name] = self.counts[name] + counts if name in self.counts else counts.clone()
        if self.balance_scale is None:
            return x
        E, K = routing.scores.shape[-1], routing.topk_idx.shape[-1]
        # (eqs. 17-20) this layer's sum_i f_i P_i, averaged over the micro-batch's sequences; the full-batch
        # mean over sequences is the mean over equal micro-batches, hence alpha / n_microbatches
        loss = sequence_balance_loss([routing], E, K)
        self.balance_sum = self.balance_sum + loss.detach().double()
        if self.balance_scale and torch.is_grad_enabled():
            x = AddAuxiliaryLoss.apply(x, loss * self.balance_scale)
        return x


# ---------------------------------------------------------------------------------------------- stages
class _Stage(nn.Module):
    """A contiguous slice of the model: references (never copies) the model's own modules.

    inputs: ``(ids,)`` at stage 0, else ``(hidden (b, T, d), ids (b, T))``; outputs: ``(hidden, ids)``,
    at the last stage ``(logits (b, T, V), mtp_logits_1 (b, T-1, V), ...)``.
    """

    def __init__(self, model: DeepSeekV3, layers: range, is_first: bool, is_last: bool,
                 module_names: dict[int, str], recorder: _Recorder, autocast: Callable[[], ContextManager]):
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.recorder, self.autocast = recorder, autocast
        self.hidden_dtype = model.embed_tokens.weight.dtype
        self.rotary = model.rotary  # buffers only
        self.embed_tokens = model.embed_tokens if is_first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.moe_names = [module_names[id(model.layers[i].mlp)] for i in layers]
        if is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
            # on a looped schedule's last rank this is that process's copy of the embedding
            self.mtp_embed = model.embed_tokens if len(model.mtp) else None
            self.mtp_moe_names = [module_names[id(m.block.mlp)] for m in model.mtp]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.autocast():
            if self.is_first:
                (ids,) = inputs
                x = self.embed_tokens(ids)
            else:
                x, ids = inputs
            T = ids.shape[1]
            cos, sin = self.rotary(torch.arange(T, device=ids.device)[None])  # (1, T, d_R/2) each
            for layer, name in zip(self.layers, self.moe_names):
                x, routing = layer(x, cos, sin)
                if routing is not None:
                    x = self.recorder.observe(x, routing, name)
            if not self.is_last:
                if x._is_view():  # AddAuxiliaryLoss returns a view; the runtime detaches outputs in place
                    x = x.clone()
                return x.to(self.hidden_dtype), ids
            # last stage: as DeepSeekV3.forward_train, from the final norm on
            h = self.norm(x)
            outputs = [self.lm_head(h)]
            for k, (module, name) in enumerate(zip(self.mtp, self.mtp_moe_names), start=1):
                if T - k <= 0:
                    break
                emb_next = self.mtp_embed(ids[:, k:])  # (b, T-k, d): Emb(t_{i+k})
                h, routing = module(h[:, : T - k], emb_next, cos[..., : T - k, :], sin[..., : T - k, :])
                if routing is not None:
                    h = self.recorder.observe(h, routing, name)
                outputs.append(self.lm_head(h))  # (b, T-k, V)
            return tuple(outputs)


# ---------------------------------------------------------------------------------------------- runner
class PipelineRunner:
    """Runs forward + backward of a :class:`DeepSeekV3` through a pipeline schedule on ``pp_group``.

    Every rank of the group builds the full model (same weights) and passes it here; each rank then works
    on its own stages' parameters only (:meth:`named_parameters`), with the full model's names.
    """

    def __init__(self, model: DeepSeekV3, pp_group: dist.ProcessGroup, *, schedule: str = "dualpipev",
                 n_microbatches: int, device: torch.device = torch.device("cpu"),
                 autocast: Callable[[], ContextManager] | None = None, overlap_threads: bool = False):
        self.config = model.config
        # DualPipeV F&B: run the paired forward in a second thread while the backward runs (see _install_overlap)
        self.overlap_threads = overlap_threads
        self.threaded_pairs = 0  # F&B pairs the last step ran in two threads
        self.group = pp_group
        self.pp_size = dist.get_world_size(pp_group)
        self.rank = dist.get_rank(pp_group)
        self.schedule_name = schedule
        self.n_microbatches = n_microbatches
        self.device = torch.device(device)
        # small collectives (shapes, loss values): on the CPU for gloo, on the device for NCCL
        self._comm_device = torch.device("cpu") if dist.get_backend(pp_group) == "gloo" else self.device
        self.layout = plan_stages(model.config, self.pp_size, schedule, n_microbatches)  # raises before any comm
        self.local_stages = [s for s in range(self.layout.n_stages) if self.layout.stage_rank[s] == self.rank]
        self.last_rank = self.layout.stage_rank[-1]
        self._autocast = autocast or contextlib.nullcontext
        self._recorder = _Recorder()
        self._mtp_lambda = 0.0  # of the step in progress, for the loss function
        self._step_counts: dict[str, torch.Tensor] = {}
        self._schedules: dict[tuple[int, int, int], object] = {}
        self._step_microbatches = n_microbatches  # of the step in progress
        self._early_sends: list[list[dist.Work]] = []  # DualPipeV's forward sends started inside F&B
        self.early_sends = 0  # how many of them the last step started (before the paired backward)

        names = {id(m): n for n, m in model.named_modules()}
        S = self.layout.n_stages
        self.stage_modules = {
            s: _Stage(model, self.layout.layers[s], s == 0, s == S - 1, names, self._recorder, self._autocast)
            for s in self.local_stages}
        local = {id(p) for stage in self.stage_modules.values() for p in stage.parameters()}
        self._named_params = [(n, p) for n, p in model.named_parameters() if id(p) in local]

        self.duplicate_params: list[nn.Parameter] = []
        self._dup_param, self._dup_peer = self._setup_duplicate_embedding(model)
        # torch 2.13's weight-gradient pass (W of the I/W split) walks part of the last stage's graph twice
        # when one weight feeds it along two paths: the tied head/embedding (the head and the MTP input), or
        # the embedding of two MTP depths' inputs; that stage then runs its whole backward at I time (W becomes
        # a no-op)
        tied = model.lm_head.weight is model.embed_tokens.weight
        self._whole_backward_at_i = (len(model.mtp) > 0 and tied) or len(model.mtp) > 1

    def _setup_duplicate_embedding(self, model: DeepSeekV3) -> tuple[nn.Parameter | None, int | None]:
        """With the last stage on a rank other than 0, the embedding it uses (MTP input, tied head) is that
        rank's own ``model.embed_tokens``: a duplicate of rank 0's. Make it equal to rank 0's; return (the
        embedding, the peer rank) on the two ranks that exchange its gradient, (None, None) elsewhere."""
        uses_embed = len(model.mtp) > 0 or model.lm_head.weight is model.embed_tokens.weight
        if not uses_embed or self.last_rank == 0 or self.rank not in (0, self.last_rank):
            return None, None
        w = model.embed_tokens.weight
        peer = self.last_rank if self.rank == 0 else 0
        with torch.no_grad():
            if self.rank == 0:
                dist.send(w.detach().contiguous(), dst=dist.get_global_rank(self.group, peer), group=self.group)
            else:
                buf = torch.empty_like(w)
                dist.recv(buf, src=dist.get_global_rank(self.group, peer), group=self.group)
                w.copy_(buf)
                self.duplicate_params = [w]
        return w, peer

    # ------------------------------------------------------------------ parameters and counts
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, named as in ``model.named_parameters()``."""
        return iter(self._named_params)

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self._named_params)

    def expert_counts(self) -> dict[str, torch.Tensor]:
        """Per local MoE module (full-model name, e.g. ``layers.2.mlp``, ``mtp.0.block.mlp``): (E,) int64
        tokens routed to each expert, summed over the micro-batches of the last :meth:`step`."""
        return dict(self._step_counts)

    # ------------------------------------------------------------------ step
    def step(self, batch: torch.Tensor | None, mtp_lambda: float, balance_alpha: float,
             n_microbatches: int | None = None) -> StepLosses:
        """Forward + backward of ``batch`` (B, T+1) through the schedule; accumulate into each local
        parameter's .grad the gradient of L_main + mtp_lambda * mean_k L_k + balance_alpha * L_bal of the full
        batch, as single-process ``training_loss(...).total.backward()`` does.

        The batch is split into ``n_microbatches`` equal micro-batches (default: the runner's; fewer in the steps
        of a batch-size warmup; B must divide); each one's loss enters
        the backward divided by their number, so the sum is the full-batch mean, exactly when every
        micro-batch has the same number of labelled tokens (always, without ignore_index labels). Ranks
        holding neither stage 0 nor the last stage may pass ``batch=None``. Returns the same
        :class:`StepLosses` on every rank of the group.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("PipelineRunner.step needs gradients enabled (not under torch.no_grad())")
        B, T = self._agree_on_shape(batch)
        n_mb = n_microbatches or self.n_microbatches
        if B % n_mb:
            raise ValueError(f"batch size {B} is not divisible into n_microbatches={n_mb} equal micro-batches")
        schedule = self._schedule(B // n_mb, T, n_mb)
        self._step_microbatches = n_mb
        self._mtp_lambda = mtp_lambda
        self._recorder.reset(balance_scale=balance_alpha / n_mb)
        args, target = (), None
        if batch is not None:
            batch = batch.to(self.device, torch.int64)
            if 0 in self.local_stages:
                args = (batch[:, :-1].contiguous(),)
            if self.layout.n_stages - 1 in self.local_stages:
                target = batch[:, 1:].contiguous()

        stash = self._stash_duplicate_grad()
        self._early_sends = []
        self.threaded_pairs = 0
        schedule.step(*args, target=target, return_outputs=False)
        for works in self._early_sends:
            _wait_batch_p2p(works)
        self.early_sends, self._early_sends = len(self._early_sends), []
        self._sum_duplicate_grad(stash)
        self._step_counts = self._recorder.counts

        # losses: CE sums live on the last stage's rank, balance sums on every rank
        depth = self._mtp_depth(T)
        ce = self._recorder.ce_sums or [0.0] * (1 + depth)
        vec = torch.tensor([float(v) for v in [*ce, self._recorder.balance_sum]], dtype=torch.float64,
                           device=self._comm_device) / n_mb
        dist.all_reduce(vec, group=self.group)
        main, per_depth, balance = vec[0].item(), vec[1:-1].tolist(), vec[-1].item()
        mtp = sum(per_depth) / len(per_depth) if per_depth else 0.0
        return StepLosses(main + mtp_lambda * mtp + balance_alpha * balance, main, mtp, per_depth, balance)

    def _loss_fn(self, outputs: tuple[torch.Tensor, ...] | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one micro-batch, divided by the number of micro-batches (no scale_grads:
        with the V schedules the embedding sits in two stages of a rank and would be scaled twice)."""
        logits, *mtp_logits = outputs if isinstance(outputs, tuple) else (outputs,)
        main = next_token_loss(logits, labels)
        mtp, per_depth = mtp_loss(mtp_logits, labels)
        values = [v.detach().double() for v in [main, *per_depth]]
        rec = self._recorder
        rec.ce_sums = [a + b for a, b in zip(rec.ce_sums, values)] if rec.ce_sums else values
        return (main + self._mtp_lambda * mtp.to(main.device)) / self._step_microbatches

    def _mtp_depth(self, T: int) -> int:
        """The number of MTP depths that run on T positions (depth k needs T - k > 0, as forward_train)."""
        return sum(1 for k in range(1, self.config.num_nextn_predict_layers + 1) if T - k > 0)

    # ------------------------------------------------------------------ schedules
    def _schedule(self, mb: int, T: int, n_mb: int):
        """The schedule for n_mb micro-batches of shape (mb, T), built on first use (static stage shapes)."""
        key = (mb, T, n_mb)
        if key in self._schedules:
            return self._schedules[key]
        # one schedule at a time: each holds its stages' receive buffers for all its micro-batches, and a
        # batch-size warmup only ever grows n_mb
        self._schedules.clear()
        d, V, S = self.config.hidden_size, self.config.vocab_size, self.layout.n_stages
        dev = self.device
        with self._autocast():  # the logits' dtype under autocast
            logit_dtype = F.linear(torch.zeros(1, 1, device=dev), torch.zeros(1, 1, device=dev)).dtype
        hidden_dtype = next(iter(self.stage_modules.values())).hidden_dtype
        ids = torch.empty(mb, T, dtype=torch.int64, device="meta")
        hidden = torch.empty(mb, T, d, dtype=hidden_dtype, device="meta", requires_grad=True)
        logits = tuple(torch.empty(mb, T - k, V, dtype=logit_dtype, device="meta")
                       for k in range(self._mtp_depth(T) + 1))
        stages = [PipelineStage(self.stage_modules[s], s, S, dev, group=self.group,
                                input_args=(ids,) if s == 0 else (hidden, ids),
                                output_args=logits if s == S - 1 else (hidden, ids),
                                dw_builder=self._no_split if s == S - 1 and self._whole_backward_at_i else None)
                  for s in self.local_stages]
        plan_stages(self.config, self.pp_size, self.schedule_name, n_mb)  # enough micro-batches for the schedule
        kwargs = dict(n_microbatches=n_mb, loss_fn=self._loss_fn, scale_grads=False)
        if self.schedule_name == "1f1b":
            schedule = Schedule1F1B(stages[0], **kwargs)
        elif self.schedule_name == "interleaved-zb":
            schedule = ScheduleInterleavedZeroBubble(stages, **kwargs)
        elif self.schedule_name == "zbv":
            schedule = ScheduleZBVZeroBubble(stages, **kwargs)
        else:
            schedule = ScheduleDualPipeV(stages, **kwargs)
            self._install_overlap(schedule, {stage.stage_index: stage for stage in stages})
        self._schedules[key] = schedule
        return schedule

    @staticmethod
    def _no_split() -> Callable[[], None]:
        """dw_builder of a stage whose I action computes the full backward: nothing left for W."""
        return lambda: None

    # ------------------------------------------------------------------ DualPipeV's F&B
    def _install_overlap(self, schedule: ScheduleDualPipeV, stages: dict[int, PipelineStage]) -> None:
        """Register the OVERLAP_F_B function; it sends the forward's output itself, so drop those SEND_F."""
        order = schedule.pipeline_order_with_comms[self.rank]
        early: set[tuple[int, int]] = set()
        for action in list(order):
            if action.computation_type != OVERLAP_F_B:
                continue
            for sub in action.sub_actions:
                send = _Action(sub.stage_index, SEND_F, sub.microbatch_index)
                if sub.computation_type == FORWARD and send in order:
                    order.remove(send)
                    early.add((sub.stage_index, sub.microbatch_index))

        def forward(action: _Action, ctx: _PipelineContext) -> None:
            with microbatch(action.microbatch_index):  # its expert-parallel all-to-alls use its own EP group
                self._run_forward(schedule, stages, action, ctx)

        def overlap_f_b(action: _Action, ctx: _PipelineContext) -> None:
            """F then B of two different chunks; the F's activations leave for the next rank before B runs.
            With ``overlap_threads``, F runs in a second thread while B runs in this one."""
            kinds = [sub.computation_type for sub in action.sub_actions]
            if self.overlap_threads and sorted(map(str, kinds)) == sorted(map(str, (FORWARD, FULL_BACKWARD))):
                f = action.sub_actions[kinds.index(FORWARD)]
                b = action.sub_actions[kinds.index(FULL_BACKWARD)]
                self._run_pair_threaded(schedule, stages, f, b, ctx)
                if (f.stage_index, f.microbatch_index) in early:
                    self._early_sends.append(_batch_p2p(stages[f.stage_index].get_fwd_send_ops(f.microbatch_index)))
                self.threaded_pairs += 1
                return
            for sub in action.sub_actions:
                if sub.computation_type == FORWARD:
                    forward(sub, ctx)
                    if (sub.stage_index, sub.microbatch_index) in early:
                        ops = stages[sub.stage_index].get_fwd_send_ops(sub.microbatch_index)
                        self._early_sends.append(_batch_p2p(ops))
                elif sub.computation_type == FULL_BACKWARD:
                    self._run_backward(schedule, stages, sub)
                else:
                    raise RuntimeError(f"unexpected sub-action {sub} in OVERLAP_F_B {action}")

        schedule.register_custom_function(OVERLAP_F_B, overlap_f_b)
        schedule.register_custom_function(FORWARD, forward)

    def _run_pair_threaded(self, schedule, stages: dict[int, PipelineStage], f: _Action, b: _Action,
                           ctx: _PipelineContext) -> None:
        """Forward of chunk f in a second thread, backward of chunk b in this one, so f's expert-parallel
        all-to-alls (on micro-batch f's EP group) proceed while b computes, and the other way round. Each
        thread keeps its own collectives' order, and the two use different process groups, so no rank can
        pair them differently; autocast and grad mode are per thread, and the stage's forward sets its own."""
        errors: list[BaseException] = []

        def run_forward() -> None:
            try:
                with microbatch(f.microbatch_index):
                    self._run_forward(schedule, stages, f, ctx)
            except BaseException as e:  # re-raised in the schedule's thread
                errors.append(e)

        worker = threading.Thread(target=run_forward, name=f"nanoseek-F{f.microbatch_index}", daemon=True)
        worker.start()
        try:
            self._run_backward(schedule, stages, b)
        finally:
            worker.join()
        if errors:
            raise errors[0]

    @staticmethod
    def _run_forward(schedule, stages: dict[int, PipelineStage], a: _Action, ctx: _PipelineContext) -> None:
        """The runtime's FORWARD action (torch 2.13 _PipelineScheduleRuntime._step_microbatches)."""
        stage, mb = stages[a.stage_index], a.microbatch_index
        if not stage.is_first and a.stage_index - 1 not in stages:
            _wait_batch_p2p(schedule.fwd_recv_ops.pop((a.stage_index, mb)))
        output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
        schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
        if a.stage_index + 1 in stages:  # V: the next stage is on this rank, hand over directly
            stages[a.stage_index + 1].set_local_fwd_input(output, mb)

    @staticmethod
    def _run_backward(schedule, stages: dict[int, PipelineStage], a: _Action) -> None:
        """The runtime's FULL_BACKWARD action."""
        stage, mb = stages[a.stage_index], a.microbatch_index
        if not stage.is_last and a.stage_index + 1 not in stages:
            _wait_batch_p2p(schedule.bwd_recv_ops.pop((a.stage_index, mb)))
        loss = schedule._maybe_get_loss(stage, mb)
        schedule.backward_counter[a.stage_index] += 1
        last = schedule.backward_counter[a.stage_index] == schedule._n_microbatches
        stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
        if a.stage_index - 1 in stages:
            stages[a.stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

    # ------------------------------------------------------------------ the duplicated embedding
    def _stash_duplicate_grad(self) -> torch.Tensor | None:
        """Set the duplicated embedding's .grad aside, so that only this step's gradients are exchanged."""
        if self._dup_param is None:
            return None
        old, self._dup_param.grad = self._dup_param.grad, None
        return old

    def _sum_duplicate_grad(self, old: torch.Tensor | None) -> None:
        """Rank 0 and the last rank swap this step's embedding gradients and both keep the sum."""
        p = self._dup_param
        if p is None:
            return
        mine = p.grad if p.grad is not None else torch.zeros_like(p)
        theirs = torch.empty_like(mine)
        peer = dist.get_global_rank(self.group, self._dup_peer)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine.contiguous(), peer, self.group),
                                        dist.P2POp(dist.irecv, theirs, peer, self.group)])
        for w in works:
            w.wait()
        total = mine + theirs  # IEEE addition commutes: both ranks get the same bits
        p.grad = total if old is None else old + total

    # ------------------------------------------------------------------ shapes
    def _agree_on_shape(self, batch: torch.Tensor | None) -> tuple[int, int]:
        """(B, T) of ``batch`` (B, T+1), checked on every rank at once, so a bad batch raises everywhere
        instead of leaving the other ranks waiting inside the schedule."""
        needs = 0 in self.local_stages or self.layout.n_stages - 1 in self.local_stages
        big = 1 << 62
        missing = int(batch is None and needs)
        bad = int(batch is not None and (batch.dim() != 2 or batch.shape[1] < 2))
        if batch is not None and not bad:
            B, T1 = batch.shape
            vec = [missing, bad, B, -B, T1, -T1]
        else:
            vec = [missing, bad, 0, -big, 0, -big]
        t = torch.tensor(vec, dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        missing, bad, b_max, neg_b_min, t_max, neg_t_min = t.tolist()
        b_min, t_min = -neg_b_min, -neg_t_min
        if missing:
            raise ValueError("the pp ranks holding stage 0 and the last stage need the batch (got None)")
        if bad:
            raise ValueError("batch must be (B, T+1) token ids with T >= 1")
        if b_max != b_min or t_max != t_min:
            raise ValueError(f"pp ranks got batches of different shapes (B {b_min}..{b_max}, "
                             f"T+1 {t_min}..{t_max})")
        return b_max, t_max - 1

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_stats(self, batch: torch.Tensor | None) -> EvalStats:
        """Forward only, the whole batch at once, stage after stage (blocking sends between ranks, in stage
        order, so no rank can wait on another out of order); cross-entropy sums of the main head and every
        MTP depth, the same on every rank."""
        B, T = self._agree_on_shape(batch)
        self._recorder.reset(balance_scale=None)
        S, owner = self.layout.n_stages, self.layout.stage_rank
        depth = self._mtp_depth(T)
        sums = torch.zeros(2 + 2 * depth, dtype=torch.float64, device=self._comm_device)  # main, n, (sum, n) per k
        out: tuple[torch.Tensor, ...] = ()
        for s in self.local_stages:
            if s == 0:
                args = (batch[:, :-1].to(self.device, torch.int64).contiguous(),)
            elif owner[s - 1] == self.rank:  # V: the previous stage ran on this rank
                args = out
            else:
                args = (torch.empty(B, T, self.config.hidden_size, dtype=self.stage_modules[s].hidden_dtype,
                                    device=self.device),
                        torch.empty(B, T, dtype=torch.int64, device=self.device))
                for t in args:
                    dist.recv(t, src=dist.get_global_rank(self.group, owner[s - 1]), group=self.group)
            out = self.stage_modules[s](*args)
            if s < S - 1 and owner[s + 1] != self.rank:
                for t in out:
                    dist.send(t.contiguous(), dst=dist.get_global_rank(self.group, owner[s + 1]), group=self.group)
            elif s == S - 1:  # the main head's and each MTP depth's (sum, tokens)
                labels = batch[:, 1:].to(self.device, torch.int64)
                for k, (ce_sum, n) in enumerate(cross_entropy_sums(out, labels)):
                    sums[2 * k], sums[2 * k + 1] = ce_sum, n
        dist.all_reduce(sums, group=self.group)
        return EvalStats(main_sum=sums[0].item(), n_tokens=int(sums[1].item()),
                         mtp_sums=sums[2::2].tolist(), mtp_tokens=[int(v) for v in sums[3::2].tolist()],
                         expert_counts=dict(self._recorder.counts))

    def eval_loss(self, batch: torch.Tensor | None) -> tuple[float, int]:
        """(sum of main-head cross-entropies, number of tokens) of ``batch``, forward only."""
        stats = self.eval_stats(batch)
        return stats.main_sum, stats.n_tokens
