"""``nanoseek train`` across processes: ``torchrun --nproc-per-node N -m nanoseek train --ep E --pp P --dp D``.

The same run as single-process training (same TrainConfig, same data order, same initialization, same
checkpoints), spread over EP x PP x DP ranks:
- every rank draws the same global batch from the same seeded stream and keeps its share (the data group
  is ``dp x ep``, see :mod:`.mesh`), so the per-step losses equal a single process's;
- expert parallelism replaces each MoE layer's routed experts by this rank's slice (:mod:`.expert_parallel`);
- pipeline parallelism runs the stages with ``torch.distributed.pipelining`` (:mod:`.pipeline`; DualPipeV by
  default); the configured ``grad_accum`` micro-batches become pipeline micro-batches;
- gradients are reduced over the data group, clipped by the global norm (:mod:`.sync`), and AdamW steps with
  ZeRO-1 over DP (:mod:`.state`); the expert counts of the bias update are summed over the data group first,
  so every replica applies the same update;
- rank 0 logs, shows the progress bar, writes metrics and (gathered) checkpoints; collectives time out after
  ``--dist-timeout`` seconds, so a dead or hung rank ends the job with an error instead of a hang, and
  ``--resume`` continues from the last checkpoint under any layout.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..allocator import keep_freed_memory
from ..objectives import cross_entropy_sums, max_violation, training_loss
from ..train import checkpoint as ckpt_io
from ..train.config import TrainConfig
from ..train.data import BatchStream, prepare_data, validation_batches
from ..train.build import (autocast_context, build_model, check_model_settings, init_from_tokenizer, model_config,
                           precision_note)
from ..train.loop import TrainResult, Trainer, pick_device
from ..train.metrics import MetricsLog
from ..train.optim import bias_gamma, learning_rate, micro_batches, mtp_lambda
from ..train.run_state import (Progress, TrainingError, batch_warmup_note, check_same_corpus, end_event,
                               nonfinite_message, open_metrics, resume_point, resumed_tokenizer, streak_stop_message,
                               warmup_warning)
from .expert_parallel import apply_expert_parallel, moe_modules, node_limit_note, use_microbatch_groups
from .mesh import DEFAULT_TIMEOUT_S, Layout, ParallelContext, init_parallel, world_from_env
from .state import DistributedOptimizer, full_model, gather_full_state
from .sync import clip_global_grad_norm, reduce_gradients, sum_over


@dataclass
class ParallelSettings:
    layout: Layout
    schedule: str = "dualpipev"  # pipeline schedule (see nanoseek.distributed.pipeline.SCHEDULES)
    microbatches: int | None = None  # pipeline micro-batches per --grad-accum micro-batch; None: the fewest that fit
    timeout_s: float = DEFAULT_TIMEOUT_S


class _CountCollector:
    """Token counts per expert of every MoE module that runs on this rank, summed over a step's forwards."""

    def __init__(self, model: torch.nn.Module):
        self.enabled = False
        self.counts: dict[str, torch.Tensor] = {}
        for name, moe in moe_modules(model):
            moe.register_forward_hook(self._hook(name))
        self.routers = dict((name, moe.gate) for name, moe in moe_modules(model))

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.enabled:
                c = output[1].counts.to(torch.int64)
                self.counts[name] = c if name not in self.counts else self.counts[name] + c
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.counts = self.counts, {}
        return out


def layout_flags(layout: Layout) -> str:
    """The flags of a layout (those above 1), for a --resume command under torchrun."""
    return " ".join(f"--{k} {getattr(layout, k)}" for k in ("ep", "pp", "dp") if getattr(layout, k) > 1)


def _collective_failure(e: BaseException | None) -> BaseException | None:
    """The failed or timed-out collective behind ``e``: ``e`` itself or one it was raised from
    (torch.distributed.pipelining wraps a stage's errors as "[Stage N] failed to run forward"); else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, dist.DistBackendError) or any(
                s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")):
            return e
        e = e.__cause__ or e.__context__
    return None


RANK0_WAIT = datetime.timedelta(days=1)  # how long the others wait for rank 0 to prepare the data or save


class _SigintNoted:
    """While a run trains: SIGINT raises KeyboardInterrupt as usual, and is noted. torch's autograd engine can
    drop the KeyboardInterrupt of a Ctrl-C that comes while a backward pass waits in a collective, which then
    fails as the interrupted peers exit: the rank must still say it was interrupted, not that a peer died."""

    def __init__(self):
        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.seen = True
        signal.default_int_handler(signum, frame)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Session:
    """What the steps of a distributed run use on this rank (built by DistributedTrainer._setup)."""

    model: torch.nn.Module  # the full model, with only this rank's stages and experts filled
    mc: Any  # the ModelConfig
    runner: Any  # the PipelineRunner with --pp > 1, else None
    per_accum: int  # pipeline micro-batches per --grad-accum micro-batch
    stats: Any  # the expert-parallel all-to-all statistics with --ep > 1, else None
    collector: _CountCollector
    named: list[tuple[str, torch.nn.Parameter]]  # this rank's parameters
    duplicates: list[torch.nn.Parameter]  # copies of a parameter another rank also holds (a V pipeline's embedding)
    optimizer: DistributedOptimizer
    batches: BatchStream  # the global batches, the same on every rank
    rows: slice  # this data rank's rows of each
    val_batches: list[torch.Tensor]
    data_keys: Any
    metrics: MetricsLog | None  # rank 0 only
    autocast: Callable[[], Any]
    progress: Progress
    device: torch.device


class DistributedTrainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, parallel: ParallelSettings, resume: bool = False,
                 overwrite: bool = False, log: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg, self.run_dir, self.parallel = cfg, Path(run_dir), parallel
        self.resume, self.overwrite = resume, overwrite
        self._print = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._bar = None
        self.ctx: ParallelContext | None = None

    # ------------------------------------------------------------------ logging (rank 0 only)
    def log(self, msg: str) -> None:
        if self.ctx is not None and not self.ctx.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            self._print(msg)

    def _on_main(self, fn: Callable[[], Any], group: dist.ProcessGroup | None = None) -> Any:
        """Run ``fn`` on rank 0; if it fails, every rank raises the same error (no rank waits for a peer
        that has stopped). The others wait for it in ``group`` (default: the job's, --dist-timeout)."""
        result, error = None, None
        if self.ctx.is_main:
            try:
                result = fn()
            except (ValueError, FileNotFoundError, TrainingError, OSError) as e:
                error = f"{type(e).__name__}:{e}"
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            kind, msg = box[0].split(":", 1)
            raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(msg)
        return result

    @contextlib.contextmanager
    def _own_errors(self):
        """This rank's own reads of the run's files: where ranks do not share a filesystem, a peer may have read
        them fine, so a rank other than 0 says such an error itself, with its number (errors.report_error)."""
        try:
            yield
        except (ValueError, OSError) as e:
            if not self.ctx.is_main and getattr(e, "rank", None) is None:
                e.rank = self.ctx.rank
            raise

    # ------------------------------------------------------------------ main
    def run(self) -> TrainResult | None:
        device = pick_device(self.cfg.device)
        keep_freed_memory(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        ok = False
        sigint = _SigintNoted()
        try:
            self.ctx = init_parallel(self.parallel.layout, device, self.parallel.timeout_s)
            self._single = single = Trainer(self.cfg, self.run_dir, self.resume, self.overwrite)
            self._on_main(single._prepare_run_dir)
            with contextlib.ExitStack() as lock:  # rank 0 holds the run's lock; a run in use stops every rank
                self._on_main(lambda: lock.enter_context(ckpt_io.run_lock(self.run_dir)))
                if not self.resume:
                    self._on_main(single._start_files)
                result = self._run(device)
            ok = True
            return result if self.ctx.is_main else None
        except Exception as e:
            failed = _collective_failure(e)
            if failed is not None and sigint.seen:  # Ctrl-C: the peers stopped too
                raise KeyboardInterrupt from None
            if failed is not None:
                rank = dist.get_rank() if dist.is_initialized() else world_from_env()[0]
                raise TrainingError(  # this rank's own view: it prints it (nanoseek.errors.report_error)
                    f"a collective failed or timed out (--dist-timeout {self.parallel.timeout_s:g} s): "
                    f"a peer rank died or hangs ({str(failed).splitlines()[0][:200]}); the last checkpoint in "
                    f"{self.run_dir} is intact: resume with --resume {self.run_dir} "
                    f"{layout_flags(self.parallel.layout)}", rank=rank) from None
            raise
        finally:
            sigint.restore()
            self._close_bar()
            torch.set_num_threads(threads)
            if owns_group and dist.is_initialized():
                if ok:
                    dist.barrier()  # gloo may abort at exit while a peer still uses the group
                dist.destroy_process_group()

    def _run(self, device: torch.device) -> TrainResult:
        with self._single.starting() if self.ctx.is_main else contextlib.nullcontext():  # the files: rank 0's
            s = self._setup(device)
        cfg, ctx, run, progress = self.cfg, self.ctx, self.run_dir, s.progress
        budget = cfg.time_budget * 60.0 if cfg.time_budget else None
        t_run = time.perf_counter()
        stopped_by, last_val = "steps", None
        self._open_bar(progress.step)
        while progress.step < cfg.steps:
            stop = torch.tensor([1.0 if budget is not None and time.perf_counter() - t_run >= budget else 0.0])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if stop.item():
                stopped_by = "time_budget"
                break
            loss, grad_norm = self._step(s)
            step = progress.step
            if progress.bad_streak:  # neither validated nor saved: the last good checkpoint stays the current one
                self._skipped(s, loss, grad_norm)
                continue
            if s.val_batches and (step % cfg.eval_every == 0 or step == cfg.steps):
                last_val = self._evaluate(s.model, s.runner, s.collector, s.val_batches, s.autocast, step,
                                          progress.tokens, s.metrics, device)
            if step % cfg.save_every == 0 or step == cfg.steps:
                self._save(s)
        step = progress.step
        end = end_event(run, cfg, stopped_by, progress)
        if stopped_by == "time_budget" or progress.bad_streak:
            self.log(end["message"])
        if ctx.is_main:
            s.metrics.append(end)
        if stopped_by == "time_budget" and progress.bad_streak == 0:  # not in the middle of a NaN/inf streak
            self._save(s)
        self._close_bar()
        self.log(f"trained to step {step} ({progress.tokens:,} tokens) in {time.perf_counter() - t_run:.0f} s"
                 + (f"; validation loss {last_val:.4f}" if last_val is not None else "") + f"; checkpoint: {run}")
        return TrainResult(run, step, progress.tokens, stopped_by, last_val, progress.elapsed)

    # ------------------------------------------------------------------ set-up
    def _setup(self, device: torch.device) -> "_Session":
        """Checks, data, the model split over the layout, the optimizer; the run's files (on rank 0)."""
        cfg, run, ctx, par = self.cfg, self.run_dir, self.ctx, self.parallel
        layout = par.layout
        t_setup = time.perf_counter()
        if cfg.dtype == "bf16-weights":
            raise ValueError("--dtype bf16-weights runs in one process only for now; use --dtype bf16 (autocast) "
                             "with --ep / --pp / --dp")
        if cfg.compile:
            raise ValueError("--compile runs in one process only for now (the expert-parallel all-to-all and the "
                             "pipeline stages are not compiled); leave it out with --ep / --pp / --dp")
        if cfg.batch_size % ctx.data_size:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {ctx.data_size} data-parallel "
                             f"ranks (--dp {layout.dp} x --ep {layout.ep})")
        if self.resume and not self.overwrite:
            self._on_main(lambda: resume_point(run, cfg))
        self._on_main(lambda: check_model_settings(cfg, not self.resume))  # before the data

        # ---- data: rank 0 prepares (tokenizer, token cache), then the others read the same
        state: dict[str, Any] | None = None
        ckpt_dir = None
        if self.resume:
            with self._own_errors():
                ckpt_dir, state, _ = ckpt_io.read_checkpoint_config(run)
        # (training a tokenizer and tokenizing a corpus, or downloading one, and writing a large model's checkpoint
        # may take longer than --dist-timeout: the others wait for them in a group of their own, which a dead rank 0
        # still fails at once)
        self._waiting = waiting = dist.new_group(backend="gloo", timeout=RANK0_WAIT)
        if ctx.is_main:
            data = self._on_main(lambda: prepare_data(
                cfg, **({"tokenizer_path": resumed_tokenizer(run, ckpt_dir)} if self.resume
                        else {"run_dir": run, "tokenizer_path": init_from_tokenizer(cfg)}),
                log=self.log), group=waiting)
        else:
            self._on_main(lambda: None, group=waiting)
            tok = resumed_tokenizer(run, ckpt_dir) if self.resume else run / "tokenizer.json"
            with self._own_errors():
                data = prepare_data(cfg, tokenizer_path=tok, log=lambda _: None)
        dist.barrier(group=waiting)  # each rank has read the new run's files before a set-up error deletes them
        if self.resume:
            with self._own_errors():
                check_same_corpus(run, state, data.summary["cache"])
        train_seqs = data.train_sequences(cfg.seq_len)
        if len(train_seqs) == 0:
            raise ValueError(f"the training split has fewer tokens than one sequence of --seq-len {cfg.seq_len} + 1")

        # ---- model: every rank builds (or loads) the full model identically, then keeps its part
        mc = model_config(cfg, data.vocab_size, data.bos_id, data.eos_id)
        layout.validate(dist.get_world_size(), mc)
        with self._own_errors():
            model = build_model(cfg, mc, device, ckpt_dir if self.resume else None, self.log, data.tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        stats = apply_expert_parallel(model, ctx.ep_group) if layout.ep > 1 else None
        autocast = autocast_context(device, cfg.dtype, model)  # after expert parallelism replaced the experts
        runner, per_accum = None, 1
        if layout.pp > 1:
            per_accum = self._microbatches(cfg, ctx)
            runner = self._pipeline(model, mc, per_accum, device, autocast)
            named = list(runner.named_parameters())
            duplicates = list(runner.duplicate_params)
            local = {id(p) for _, p in named}
            for p in model.parameters():  # free the layers of the other stages
                if id(p) not in local:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        else:
            named = list(model.named_parameters())
            duplicates = []
        optimizer = DistributedOptimizer(named, cfg, ctx)
        progress = Progress()
        if self.resume:
            with self._own_errors():
                tensors = ckpt_io.load_training_tensors(ckpt_dir)
                if state["step"] > 0 or any(k.startswith("optim.") for k in tensors):
                    optimizer.load(tensors, ctx, ckpt_dir)
            progress = Progress.from_state(state)
        self._log_run(mc, n_params, device)

        metrics = (open_metrics(run, cfg, self.resume, progress, data.summary,
                                start={"params": n_params, "model": mc.to_hf(), "layout": str(layout)})
                   if ctx.is_main else None)
        if self.resume:
            self.log(f"resumed {run} at step {progress.step} ({progress.tokens:,} tokens)")
        lo = ctx.data_rank * (cfg.batch_size // ctx.data_size)
        session = _Session(
            model=model, mc=mc, runner=runner, per_accum=per_accum, stats=stats, collector=_CountCollector(model),
            named=named, duplicates=duplicates, optimizer=optimizer,
            batches=BatchStream(train_seqs, cfg.batch_size, cfg.seed, **progress.position),
            rows=slice(lo, lo + cfg.batch_size // ctx.data_size),
            val_batches=validation_batches(data.val_sequences(cfg.seq_len), cfg.batch_size, cfg.eval_batches),
            data_keys=data.summary["cache"], metrics=metrics, autocast=autocast, progress=progress, device=device)
        if not self.resume:
            self._save(session)
        self.log(f"setup took {time.perf_counter() - t_setup:.1f} s")
        return session

    def _pipeline(self, model, mc, per_accum: int, device: torch.device, autocast):
        """The PipelineRunner of this rank's stages: ``per_accum`` pipeline micro-batches per --grad-accum one."""
        from .pipeline import PipelineRunner, plan_stages

        cfg, ctx, par = self.cfg, self.ctx, self.parallel
        n_micro = per_accum * cfg.grad_accum
        if cfg.batch_warmup_start is not None:  # the smaller steps of a batch-size warmup fit the schedule too
            for k in range(cfg.batch_warmup_start // cfg.batch_size, cfg.grad_accum):
                try:
                    plan_stages(mc, par.layout.pp, par.schedule, per_accum * k)
                except ValueError as e:
                    raise ValueError(f"--batch-warmup-start {cfg.batch_warmup_start}: a step of {k} "
                                     f"micro-batches does not fit the pipeline: {e}") from None
        overlap = par.layout.ep > 1 and par.schedule == "dualpipev"
        if overlap:  # F&B in two threads: each micro-batch's all-to-alls on their own copy of the EP group
            use_microbatch_groups(model, self._microbatch_ep_groups(n_micro))
        return PipelineRunner(model, ctx.pp_group, schedule=par.schedule, n_microbatches=n_micro,
                              device=device, autocast=autocast, overlap_threads=overlap)

    def _log_run(self, mc, n_params: int, device: torch.device) -> None:
        cfg, layout, par = self.cfg, self.parallel.layout, self.parallel
        self.log(f"distributed: {layout} on {dist.get_world_size()} ranks ({dist.get_backend()}), "
                 + (f"pipeline {par.schedule}, " if layout.pp > 1 else "")
                 + (f"ZeRO-1 over {layout.dp} DP ranks, " if layout.dp > 1 else "")
                 + (node_limit_note(mc.n_group, mc.topk_group, mc.topk_method, layout.ep) if layout.ep > 1 else
                    "no expert parallelism"))
        experts = (f"{mc.n_routed_experts} routed experts top-{mc.num_experts_per_tok}" if mc.has_moe
                   else "dense: no MoE layer")
        self.log(f"model: preset {cfg.preset}, {n_params / 1e6:.2f} M parameters ({mc.num_hidden_layers} layers, "
                 f"d {mc.hidden_size}, {experts}, MTP depth {mc.num_nextn_predict_layers}, vocabulary "
                 f"{mc.vocab_size}); {precision_note(cfg.dtype, device)}")
        self.log(f"training: {cfg.steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} = "
                 f"{cfg.tokens_per_step:,} tokens ({cfg.batch_size // self.ctx.data_size} sequences per data rank)"
                 + batch_warmup_note(cfg))
        if warning := warmup_warning(cfg):
            self.log(warning)

    def _save(self, s: "_Session") -> None:
        """A checkpoint of the full model and optimizer, gathered from every rank and written by rank 0."""
        ctx = self.ctx
        gathered = gather_full_state(s.model, s.named, s.optimizer, ctx, s.duplicates)
        if ctx.is_main:
            model_sd, optim = gathered
            st = s.progress.state(self.cfg, s.batches.position, s.data_keys, layout=str(self.parallel.layout))
            ckpt_io.save_checkpoint(self.run_dir, full_model(s.mc, model_sd), optim, st, self.cfg.to_dict(),
                                    keep=self.cfg.keep_checkpoints)
        dist.barrier(group=self._waiting)

    # ------------------------------------------------------------------ one optimizer step
    def _step(self, s: "_Session") -> tuple[float, float]:
        """Forward and backward of this rank's share of the step's micro-batches, gradients reduced over the
        data ranks and clipped by the global norm, AdamW (ZeRO-1) and the bias update, skipped on every rank
        when the loss or the gradient is NaN/inf; returns (loss, gradient norm)."""
        cfg, ctx, progress = self.cfg, self.ctx, s.progress
        t0 = time.perf_counter()
        step = progress.step
        lr = learning_rate(step, cfg)
        s.optimizer.set_lr(lr)
        lam, gamma, alpha = mtp_lambda(step, cfg), bias_gamma(step, cfg), cfg.effective_balance_alpha
        n_micro = micro_batches(progress.tokens, cfg)  # grad_accum, fewer during a batch-size warmup
        if s.stats is not None:
            s.stats.reset()
        s.collector.enabled = True
        local = [s.batches.next()[s.rows].to(s.device) for _ in range(n_micro)]  # (b, T+1) each
        if s.runner is not None:
            out = s.runner.step(torch.cat(local), lam, alpha, n_microbatches=s.per_accum * n_micro)
            parts = [out.total, out.main, out.mtp, out.balance, *out.mtp_per_depth]
            pipe = {"pp_fb_threaded": s.runner.threaded_pairs, "pp_fb_early_sends": s.runner.early_sends}
        else:
            parts, pipe = None, None
            for batch in local:
                with s.autocast():
                    o = s.model.forward_train(batch[:, :-1])
                terms = training_loss(o, batch[:, 1:], mtp_lambda=lam, balance_alpha=alpha)
                (terms.total / n_micro).backward()
                vals = [terms.total, terms.main, terms.mtp, terms.balance, *terms.mtp_per_depth]
                vals = [float(v.detach()) / n_micro for v in vals]
                parts = vals if parts is None else [a + b for a, b in zip(parts, vals)]
                del o, terms
        s.collector.enabled = False
        losses = sum_over(torch.tensor([float(v) for v in parts], dtype=torch.float64), ctx.data_group)
        losses /= ctx.data_size
        reduce_gradients(s.named, ctx)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = clip_global_grad_norm(s.named, ctx, clip, s.duplicates)
        counts = self._summed_counts(s.collector)  # this rank's MoE layers, summed over the data ranks
        all_counts = self._all_layer_counts(counts)  # every stage's layers (for the metrics)
        finite = math.isfinite(float(losses[0])) and math.isfinite(grad_norm)
        if finite:
            s.optimizer.step()
            if gamma:
                for name, c in counts.items():
                    bias = s.collector.routers[name].e_score_correction_bias
                    if bias is not None:
                        c = c.to(bias.device, torch.float32)
                        bias.add_(gamma * torch.sign(c.mean() - c))  # b_i += gamma sign(mean c - c_i)
        s.optimizer.zero_grad()
        step_tokens = n_micro * cfg.batch_size * cfg.seq_len
        dt = time.perf_counter() - t0
        progress.step += 1
        progress.tokens += step_tokens
        progress.elapsed += dt
        progress.bad_streak = 0 if finite else progress.bad_streak + 1  # the same on every rank: all global
        a2a = None
        if s.stats is not None:
            d = s.stats.as_dict()
            keys = ("a2a_tokens", "a2a_rows", "a2a_remote_rows", "a2a_remote_bytes", "a2a_slots")
            a2a = dict(zip(keys, sum_over(torch.tensor([float(d[k]) for k in keys]), dist.group.WORLD).tolist()))
        if ctx.is_main:
            rec = self._record(progress, losses, lr, lam, gamma, alpha, grad_norm, dt, step_tokens, all_counts, a2a)
            rec.update(pipe or {}, skipped=not finite, micro_batches=n_micro)
            if progress.step % cfg.log_every == 0 or not finite or progress.step == cfg.steps:
                s.metrics.append(rec)
            self._update_bar(rec)
        return float(losses[0]), grad_norm

    def _skipped(self, s: "_Session", loss: float, grad_norm: float) -> None:
        """A NaN/inf step; the run stops after ``max_bad_steps`` of them in a row."""
        step, streak = s.progress.step, s.progress.bad_streak
        msg = nonfinite_message(step, loss, grad_norm, streak)
        self.log(msg)
        if self.ctx.is_main:
            s.metrics.append({"type": "event", "step": step, "event": "nonfinite", "message": msg})
        if streak >= self.cfg.max_bad_steps:
            msg = streak_stop_message(self.run_dir, step, streak, layout_flags(self.parallel.layout))
            if self.ctx.is_main:
                s.metrics.append({"type": "event", "step": step, "event": "stopped", "message": msg})
            raise TrainingError(msg)

    # ------------------------------------------------------------------ pieces
    def _microbatches(self, cfg: TrainConfig, ctx: ParallelContext) -> int:
        """Pipeline micro-batches per --grad-accum micro-batch: --microbatches, checked, or the fewest the
        schedule accepts."""
        local = cfg.batch_size // ctx.data_size
        need = 2 * ctx.layout.pp if self.parallel.schedule in ("dualpipev", "zbv", "interleaved-zb") else ctx.layout.pp
        m = self.parallel.microbatches
        if m is not None:
            if local % m or m < need:
                raise ValueError(f"--microbatches {m}: each data rank's {local} sequences (--batch-size "
                                 f"{cfg.batch_size} over {ctx.data_size} data ranks) must split into {m} equal "
                                 f"micro-batches, and the {self.parallel.schedule} schedule needs at least {need}")
            return m
        for n in range(need, local + 1):
            if local % n == 0:
                return n
        raise ValueError(f"the {self.parallel.schedule} schedule needs at least {need} micro-batches, but each "
                         f"data rank has {local} sequences per step: raise --batch-size or lower --pp")

    def _microbatch_ep_groups(self, n: int) -> list[dist.ProcessGroup]:
        """``n`` copies of this rank's EP group (every rank creates every group, in the same order)."""
        ranks = self.ctx.mesh.mesh  # (pp, dp, ep) global ranks
        mine = []
        for _ in range(n):
            for pp in range(ranks.shape[0]):
                for dp in range(ranks.shape[1]):
                    members = ranks[pp, dp].tolist()
                    group = dist.new_group(members)
                    if self.ctx.rank in members:
                        mine.append(group)
        return mine

    def _summed_counts(self, collector: _CountCollector) -> dict[str, torch.Tensor]:
        counts = collector.take()
        if not counts:
            return {}
        names = sorted(counts)
        stacked = sum_over(torch.stack([counts[n] for n in names]), self.ctx.data_group)  # (layers, E)
        return dict(zip(names, stacked))

    def _all_layer_counts(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With pipeline stages, the counts of every stage's MoE layers (gathered over the pp group)."""
        if self.parallel.layout.pp == 1:
            return counts
        parts: list = [None] * self.parallel.layout.pp
        dist.all_gather_object(parts, {k: v.cpu() for k, v in counts.items()}, group=self.ctx.pp_group)
        return {k: v for part in parts for k, v in part.items()}

    def _record(self, progress, losses, lr, lam, gamma, alpha, grad_norm, dt, step_tokens, counts, a2a) -> dict:
        vals = losses.tolist()
        rec: dict[str, Any] = {
            "type": "train", "step": progress.step, "tokens": progress.tokens, "loss": vals[0], "main_loss": vals[1],
            "mtp_loss": vals[2], "balance_loss": vals[3], "mtp_losses": vals[4:], "lr": lr, "mtp_lambda": lam,
            "bias_gamma": gamma, "balance_alpha": alpha, "grad_norm": grad_norm,
            "tokens_per_s": step_tokens / dt, "step_time": dt, "elapsed": progress.elapsed, "skipped": False}
        if counts:
            c = _by_layer(counts)
            mv = max_violation(c)
            rec["maxvio_batch"] = [round(float(v), 5) for v in mv]
            rec["maxvio_batch_mean"] = float(mv.mean())
            rec["expert_counts"] = c.tolist()
        if a2a is not None:
            rec.update(a2a)
        return rec

    @torch.no_grad()
    def _evaluate(self, model, runner, collector: _CountCollector, val_batches, autocast, step, tokens, metrics,
                  device) -> float | None:
        """Validation as in one process: main and per-depth MTP losses, MaxVio_global from the expert counts of
        every MoE layer over the validation set; each data rank takes its share of every batch."""
        ctx = self.ctx
        sums: torch.Tensor | None = None  # main (sum, tokens), then (sum, tokens) per MTP depth
        counts: dict[str, torch.Tensor] = {}

        def share(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
            """This data rank's rows; a rank left without any still runs one row (its expert-parallel and
            pipeline peers wait for its collectives) and counts none of it."""
            part = batch[ctx.data_rank::ctx.data_size]
            return (part, 1.0) if len(part) else (batch[:1], 0.0)

        def add(values: list[float], layer_counts: dict[str, torch.Tensor], weight: float) -> None:
            nonlocal sums
            v = weight * torch.tensor(values, dtype=torch.float64)
            sums = v if sums is None else sums + v
            for name, c in layer_counts.items():
                c = c * int(weight)
                counts[name] = counts[name] + c if name in counts else c

        collector.take()
        collector.enabled = True
        model.eval()
        try:
            for batch in val_batches:
                part, weight = share(batch)
                part = part.to(device)
                if runner is not None:
                    st = runner.eval_stats(part)
                    values = [st.main_sum, st.n_tokens]
                    for s_k, n_k in zip(st.mtp_sums, st.mtp_tokens):
                        values += [s_k, n_k]
                else:
                    with torch.no_grad(), autocast():
                        out = model.forward_train(part[:, :-1])
                    values = [v for pair in cross_entropy_sums([out.logits, *out.mtp_logits], part[:, 1:])
                              for v in pair]
                add(values, collector.take(), weight)
        finally:
            collector.enabled = False
            model.train()
        total = sum_over(sums, ctx.data_group)
        if counts:
            names = sorted(counts)
            counts = dict(zip(names, sum_over(torch.stack([counts[n] for n in names]), ctx.data_group)))
        all_counts = self._all_layer_counts(counts)  # every stage's layers
        loss = float(total[0] / max(total[1], 1))
        rec: dict[str, Any] = {"type": "val", "step": step, "tokens": tokens, "val_loss": loss,
                               "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(total[1]),
                               "val_mtp_losses": [float(total[i] / max(total[i + 1], 1))
                                                  for i in range(2, len(total), 2)]}
        if all_counts:
            mv = max_violation(_by_layer(all_counts))
            rec["maxvio_global"] = [round(float(v), 5) for v in mv]
            rec["maxvio_global_mean"] = float(mv.mean())
        if ctx.is_main:
            metrics.append(rec)
        self.log(f"step {step}: validation loss {loss:.4f}, perplexity {rec['val_ppl']:.2f}"
                 + (f", MaxVio_global {rec['maxvio_global_mean']:.3f}" if all_counts else ""))
        return loss

    def _open_bar(self, step: int) -> None:
        if self.ctx.is_main:  # the other ranks show nothing
            Trainer._open_bar(self, step)

    _update_bar = Trainer._update_bar
    _close_bar = Trainer._close_bar


def _layer_order(name: str) -> tuple[int, int]:
    """Main layers first, then MTP blocks, each by index (``layers.3.mlp``, ``mtp.0.block.mlp``)."""
    parts = name.split(".")
    return (0 if parts[0] == "layers" else 1, int(parts[1]))


def _by_layer(counts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n_moe_layers, E): the counts stacked in the model's layer order, as one process's metrics have them."""
    return torch.stack([counts[n] for n in sorted(counts, key=_layer_order)])


def train_distributed(cfg: TrainConfig, out: str | Path, parallel: ParallelSettings, resume: bool = False,
                      overwrite: bool = False, log: Callable[[str], None] | None = None) -> TrainResult | None:
    """Train (or continue) the run in ``out`` across the job's ranks; returns the result on rank 0."""
    return DistributedTrainer(cfg, out, parallel, resume=resume, overwrite=overwrite, log=log).run()


def wants_distributed(ep: int | None, pp: int | None, dp: int | None) -> bool:
    """True under torchrun with more than one rank, or when a parallel degree above 1 is asked for."""
    return world_from_env()[1] > 1 or any((v or 1) > 1 for v in (ep, pp, dp))
