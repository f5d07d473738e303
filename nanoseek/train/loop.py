"""The training loop: every DeepSeek-V3 objective (SPEC §4-§6) on a packed corpus, resumable and observable.

One optimizer step = ``grad_accum`` micro-batches (fewer during a batch-size warmup, see optim.micro_batches)
of ``batch_size`` windows of ``seq_len + 1`` tokens:
  loss = L_main + lambda * (1/D) sum_k L_k + alpha * L_bal   (nanoseek.objectives.training_loss)
  backward per micro-batch (scaled by 1 / micro-batches), clip the gradient norm to 1.0, AdamW step,
  then the auxiliary-loss-free bias update b_i += gamma * sign(mean c - c_i) from the expert counts summed
  over all micro-batches of the step (balance="bias").
A step whose loss or gradient is NaN/inf is skipped (no update) and reported; ``max_bad_steps`` in a row stop
the run with the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..allocator import keep_freed_memory
from ..devices import pick_device
from ..errors import on_rank0
from ..hf import CheckpointError
from ..objectives import ExpertLoadTracker, cross_entropy_sums, max_violation, training_loss, update_balance_bias
from . import checkpoint as ckpt_io
from .config import TrainConfig
from .data import BatchStream, prepare_data, validation_batches
from .metrics import MetricsLog
from .optim import bias_gamma, build_optimizer, learning_rate, micro_batches, mtp_lambda
from .run_state import (Progress, TrainingError, batch_warmup_note, check_resumable, check_same_corpus, end_event,
                        nonfinite_message, open_metrics, resume_point, resumed_tokenizer, streak_stop_message,
                        warmup_warning)
from .build import (autocast_context, build_model, precision_note, check_model_settings, enable_activation_checkpointing,
                    init_from_tokenizer, model_config)
from .memory import check_memory
from .precision import MasterWeights


FIT_PROBE_STEPS = 6  # steps timed before the number of steps is fitted to the time budget
REFIT_EVERY = 10  # refit that often until the decay begins, so a slow start (a busy machine) is corrected


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    stopped_by: str  # "steps", "time_budget"
    final_val_loss: float | None
    elapsed: float


# What a run directory holds before its first checkpoint (train_config.json first, see Trainer._start_files)
START_FILES = {ckpt_io.CONFIG_FILE, *ckpt_io.TOKENIZER_FILES, "data.json", "metrics.jsonl", ".lock",
               ckpt_io.CHECKPOINTS}
OLD_RUN_DIR = ".old-run"  # with --overwrite: the replaced run's files until the new run's first checkpoint
MOVING_ASIDE = ".old-run.partial"  # the replaced run's files while they are moved aside, renamed OLD_RUN_DIR after


class StartInterrupted(KeyboardInterrupt):
    """Ctrl-C before a new run's first checkpoint: the run directory was left as it was before the start."""


def _discard_start_files(d: Path) -> None:
    """A start's files (all but the lock and a set-aside old run)."""
    for item in d.iterdir():
        if item.name in (".lock", OLD_RUN_DIR):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def _put_back_old_run(d: Path) -> None:
    """A start's files removed; the old run that --overwrite set aside, if any, moved back in place."""
    _discard_start_files(d)
    aside = d / OLD_RUN_DIR
    if aside.is_dir():
        for item in aside.iterdir():
            item.rename(d / item.name)
        aside.rmdir()


def _has_checkpoint(d: Path) -> bool:
    try:
        return ckpt_io.current_checkpoint(d) is not None
    except CheckpointError:
        return False


def recover_killed_overwrite(d: Path) -> None:
    """Before any command on run directory d: an --overwrite start killed before its first checkpoint left the
    run it was replacing in OLD_RUN_DIR (or part of it in MOVING_ASIDE, the rest in place); that run is put back
    in place. Killed after it, while deleting OLD_RUN_DIR, it left the new run: the deletion is finished."""
    moving, aside = (d / MOVING_ASIDE).is_dir(), (d / OLD_RUN_DIR).is_dir()
    if not (moving or aside):
        return
    with ckpt_io.run_lock(d):  # never under a start still running
        if moving:  # killed while setting the old run aside: the new run has no file yet
            for item in (d / MOVING_ASIDE).iterdir():
                item.rename(d / item.name)
            (d / MOVING_ASIDE).rmdir()
        elif _has_checkpoint(d):  # the new run's first checkpoint is complete
            shutil.rmtree(d / OLD_RUN_DIR)
            return
        else:
            _put_back_old_run(d)
    if on_rank0():
        print(f"{d}: a start with --overwrite stopped before its first checkpoint; the run it was to replace "
              "is back in place", file=sys.stderr)


def _interrupted_start(d: Path) -> bool:
    """Whether directory d holds a run that stopped before its first checkpoint was complete, and nothing else."""
    try:
        if ckpt_io.current_checkpoint(d) is not None:
            return False
    except CheckpointError:
        return False
    names = {p.name for p in d.iterdir()}
    return ckpt_io.CONFIG_FILE in names and all(n in START_FILES or n.endswith(".lnk") for n in names)


def resume_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The run's own TrainConfig with ``overrides`` applied; a change that would not continue the same
    run (model, data, batch, optimizer, objectives) is a ValueError naming it."""
    recover_killed_overwrite(Path(run_dir))
    ckpt, state, saved = ckpt_io.read_checkpoint_config(run_dir)
    try:
        cfg = TrainConfig.from_dict(saved)
        cfg.validate()
    except (TypeError, ValueError) as e:  # a damaged file: the flags its messages name were not given now
        raise CheckpointError(f"{ckpt / ckpt_io.CONFIG_FILE}: the run's training configuration is invalid: {e}") \
            from None
    if overrides:
        cfg = cfg.replace(**overrides)
    check_resumable(run_dir, saved, cfg)
    if cfg.steps < state["step"]:
        raise ValueError(f"--steps {cfg.steps} is below the step of {run_dir}'s checkpoint ({state['step']}): "
                         "a resumed run can only go on to more steps")
    return cfg


# ---------------------------------------------------------------------------------------------- the trainer
@dataclass
class _Session:
    """What the steps of a run use (built by Trainer._setup)."""

    model: torch.nn.Module
    mc: Any  # the ModelConfig
    masters: MasterWeights | None  # with --dtype bf16-weights
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the optimizer's, for the gradient clip
    batches: BatchStream
    val_batches: list[torch.Tensor]
    data_keys: Any  # the corpus cache's keys, saved to check that a resume reads the same corpus
    metrics: MetricsLog
    autocast: Callable[[], Any]
    forward_and_loss: Callable[..., Any]
    progress: Progress
    device: torch.device


def affordable_steps(cfg: TrainConfig, tokens: int, per_full_step: float, seconds: float) -> int:
    """How many steps from ``tokens`` trained tokens fit in ``seconds`` at ``per_full_step`` seconds per step of
    grad_accum micro-batches; a step of a batch-size warmup costs its share of micro-batches."""
    n = 0
    while cfg.batch_warmup_start is not None and tokens < cfg.batch_warmup_tokens:
        m = micro_batches(tokens, cfg)
        cost = per_full_step * m / cfg.grad_accum
        if cost > seconds:
            return n
        seconds, tokens, n = seconds - cost, tokens + m * cfg.batch_size * cfg.seq_len, n + 1
    return n + int(seconds / per_full_step)


class _BudgetFit:
    """Fits the number of steps to the time budget (``fit_steps_to_budget``): after FIT_PROBE_STEPS timed steps,
    then every REFIT_EVERY steps until the schedule can no longer change. Times are per full step: a step of the
    batch-size warmup, with fewer micro-batches, counts as scaled up to grad_accum of them."""

    def __init__(self, trainer: "Trainer", step: int, budget: float, t_run: float):
        self.trainer, self.budget, self.t_run = trainer, budget, t_run
        steps = trainer.cfg.steps
        self.fit_at = step + FIT_PROBE_STEPS if steps > step + FIT_PROBE_STEPS else None
        self.step_times: list[float] = []  # of the finite steps, per full step
        self.last: tuple[int, float] | None = None  # (step, time) of the last fit
        self.micro = 0  # micro-batches since the last fit
        self.cap = steps  # fitting never goes above the configured steps

    def count(self, rec: dict[str, Any]) -> None:
        """Every step's record, skipped ones included."""
        self.micro += rec["micro_batches"]
        if not rec["skipped"]:
            self.step_times.append(rec["step_time"] * self.trainer.cfg.grad_accum / rec["micro_batches"])

    def after_step(self, step: int, tokens: int, metrics: MetricsLog) -> None:
        """After a finite step (and its validation), ``tokens`` trained so far: fit when it is time."""
        if self.fit_at is None or not (step == self.fit_at or (step > self.fit_at and step % REFIT_EVERY == 0)):
            return
        trainer, cfg = self.trainer, self.trainer.cfg
        now = time.perf_counter()
        if self.last is None:  # the first fit: the median step of the probe, plus an allowance for validation
            probe = sorted(self.step_times[1:])
            per_step = probe[len(probe) // 2] * (1.0 + cfg.eval_batches / (3.0 * cfg.grad_accum * cfg.eval_every)
                                                 + 0.02)
        else:  # later fits: the wall time per full step since the last fit, validation included
            per_step = (now - self.last[1]) * cfg.grad_accum / max(1, self.micro)
        new = trainer._fit_steps(cfg, step, tokens, per_step, self.budget - (now - self.t_run), self.cap, metrics)
        self.last, self.micro = (step, now), 0
        if new is None:
            self.fit_at = None  # the decay has begun: the schedule is fixed from here on
        elif new.steps != cfg.steps:
            trainer.cfg = new
            new.save(trainer.run_dir / ckpt_io.CONFIG_FILE)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self._print = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._bar = None

    def log(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            self._print(msg)

    # ------------------------------------------------------------------ run directory
    def _prepare_run_dir(self) -> None:
        d = self.run_dir
        recover_killed_overwrite(d)
        if self.resume:
            if d.exists() and not d.is_dir():
                raise ValueError(f"--resume {d} is a file, not a run directory")
            if not d.is_dir():
                raise FileNotFoundError(f"run directory {d} does not exist")
            return
        if d.exists() and not d.is_dir():
            raise ValueError(f"--out {d} exists and is not a directory")
        if d.is_dir() and any(p.name != ".lock" for p in d.iterdir()):
            if _interrupted_start(d):  # stopped before its first checkpoint: start again in its place
                self.log(f"{d} holds only the files of a start that stopped before its first checkpoint: "
                         "starting again")
                self.overwrite = True
                return
            is_run = (d / ckpt_io.POINTER).is_symlink() or (d / ckpt_io.CONFIG_FILE).exists()
            if not is_run:
                raise ValueError(f"--out {d} exists and is not empty (and is not a nanoseek run)")
            if not self.overwrite:
                try:
                    _, state, _ = ckpt_io.read_checkpoint_config(d)
                    where = f" (step {state['step']})"
                except (CheckpointError, FileNotFoundError):
                    where = ""
                raise ValueError(f"{d} already holds a training run{where}: continue it with --resume {d}, "
                                 "or pass --overwrite to start again")
        d.mkdir(parents=True, exist_ok=True)

    def _start_files(self) -> None:
        """A new run's first file, under the lock: its train_config.json, which marks the directory as a run.
        With --overwrite the old run's files are first set aside (in OLD_RUN_DIR), not deleted: see starting()."""
        if self.overwrite:
            aside = self.run_dir / MOVING_ASIDE
            aside.mkdir()
            for item in self.run_dir.iterdir():
                if item.name not in (".lock", MOVING_ASIDE):
                    item.rename(aside / item.name)
            aside.rename(self.run_dir / OLD_RUN_DIR)  # one rename: a kill before it leaves the old run whole
        self.cfg.save(self.run_dir / ckpt_io.CONFIG_FILE)

    @contextlib.contextmanager
    def starting(self):
        """Around a new run's set-up, which ends with its first checkpoint. If the set-up fails (a bad corpus, a
        setting the model rejects, Ctrl-C), the directory is left as it was: this start's files are removed and,
        with --overwrite, the old run is put back. Once it succeeds, the old run's files are deleted."""
        if self.resume:
            yield
            return
        try:
            yield
        except KeyboardInterrupt:
            _put_back_old_run(self.run_dir)
            raise StartInterrupted from None
        except BaseException:
            _put_back_old_run(self.run_dir)
            raise
        if (self.run_dir / OLD_RUN_DIR).is_dir():
            shutil.rmtree(self.run_dir / OLD_RUN_DIR)

    # ------------------------------------------------------------------ main
    def run(self) -> TrainResult:
        self._prepare_run_dir()
        threads = torch.get_num_threads()
        try:
            with ckpt_io.run_lock(self.run_dir):
                if not self.resume:
                    self._start_files()
                if self.cfg.threads:
                    torch.set_num_threads(self.cfg.threads)
                return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> TrainResult:
        with self.starting():
            r = self._setup()
        cfg, progress = self.cfg, r.progress
        budget = cfg.time_budget * 60.0 if cfg.time_budget else None
        t_run = time.perf_counter()
        fit = _BudgetFit(self, progress.step, budget, t_run) if cfg.fit_steps_to_budget and budget else None
        stopped_by = "steps"
        last_val = None
        self._open_bar(progress.step)
        try:
            while progress.step < self.cfg.steps:
                if budget is not None and time.perf_counter() - t_run >= budget:
                    stopped_by = "time_budget"
                    break
                rec = self._step(r)
                step = progress.step
                if fit is not None:
                    fit.count(rec)
                if rec["skipped"]:
                    self._skipped(r, rec)
                    continue
                if r.val_batches and (step % cfg.eval_every == 0 or step == self.cfg.steps):
                    last_val = self.evaluate(r.model, r.val_batches, r.autocast, step, progress.tokens, r.metrics)
                if fit is not None:
                    fit.after_step(step, progress.tokens, r.metrics)
                cfg = self.cfg  # the fit may have changed the number of steps
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self._save(r)
            end = end_event(self.run_dir, cfg, stopped_by, progress)
            if stopped_by == "time_budget" or progress.bad_streak:
                self.log(end["message"])
            r.metrics.append(end)
            if stopped_by == "time_budget":
                step = progress.step
                if r.val_batches and (last_val is None or last_val[0] != step):
                    last_val = self.evaluate(r.model, r.val_batches, r.autocast, step, progress.tokens, r.metrics)
                if progress.bad_streak == 0:  # not in the middle of a NaN/inf streak
                    self._save(r)
        finally:
            self._close_bar()
        wall = time.perf_counter() - t_run
        self.log(f"trained to step {progress.step} ({progress.tokens:,} tokens) in {wall:.0f} s"
                 + (f"; validation loss {last_val[1]:.4f}" if last_val else "") + f"; checkpoint: {self.run_dir}")
        return TrainResult(self.run_dir, progress.step, progress.tokens, stopped_by,
                           last_val[1] if last_val else None, progress.elapsed)

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> "_Session":
        """Everything the steps use: the resumed checkpoint read, data, model, optimizer; the run's files."""
        cfg, run = self.cfg, self.run_dir
        device = pick_device(cfg.device)
        keep_freed_memory(device)  # no page faults for the same activations every step (see allocator.py)
        t_setup = time.perf_counter()
        resumed = resume_point(run, cfg) if self.resume else None  # read before anything is written
        check_memory(check_model_settings(cfg, not self.resume), cfg, device)  # before the data

        # ---- data and tokenizer
        if resumed:
            data = prepare_data(cfg, tokenizer_path=resumed_tokenizer(run, resumed.checkpoint), log=self.log)
            check_same_corpus(run, resumed.state, data.summary["cache"])
        else:
            data = prepare_data(cfg, run_dir=run, tokenizer_path=init_from_tokenizer(cfg), log=self.log)
        train_seqs = data.train_sequences(cfg.seq_len)
        if len(train_seqs) == 0:
            raise ValueError(f"the training split has {data.train.n_tokens} tokens, fewer than one sequence of "
                             f"--seq-len {cfg.seq_len} + 1: lower --seq-len or add text")
        val_seqs = data.val_sequences(cfg.seq_len)
        val_batches = validation_batches(val_seqs, cfg.batch_size, cfg.eval_batches)
        if not val_batches:
            self.log("validation: the validation split is too small; no validation loss will be reported")
        elif val_seqs.seq_len < cfg.seq_len:
            self.log(f"validation: the validation split has only {data.val.n_tokens} tokens, so its windows are "
                     f"{val_seqs.seq_len} tokens, not --seq-len {cfg.seq_len}")

        # ---- model and optimizer
        mc = model_config(cfg, data.vocab_size, data.bos_id, data.eos_id)
        est = check_memory(mc, cfg, device)
        model = build_model(cfg, mc, device, resumed.checkpoint if resumed else None, self.log, data.tokenizer)
        # bf16 weights, fp32 masters; with --compile they are stepped by one compiled pass per weight
        states = torch.bfloat16 if cfg.optimizer_states == "bf16" else torch.float32  # AdamW's moments
        masters = MasterWeights(model, fused=cfg.compile, states_dtype=states) if cfg.dtype == "bf16-weights" \
            else None
        optimizer = build_optimizer(masters.named_parameters() if masters else model, cfg)
        progress = Progress()
        if resumed:
            tensors = ckpt_io.load_training_tensors(resumed.checkpoint)
            if resumed.state["step"] > 0 or any(k.startswith("optim.") for k in tensors):
                ckpt_io.load_optimizer_tensors(optimizer, tensors, resumed.checkpoint)
            ckpt_io.restore_rng(tensors, resumed.checkpoint)
            progress = Progress.from_state(resumed.state)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        autocast = autocast_context(device, cfg.dtype, model)

        def forward_and_loss(inputs: torch.Tensor, labels: torch.Tensor, lam: float | torch.Tensor,
                             alpha: float | torch.Tensor):
            """One micro-batch: the forward (under autocast) and the V3 objective on its outputs."""
            with autocast():
                out = model.forward_train(inputs)
            return out, training_loss(out, labels, mtp_lambda=lam, balance_alpha=alpha)

        if cfg.compile:
            # the loss in the same graph as the forward, where it fuses with the head's output: a bench-preset step
            # (no MTP, bf16 weights + fp32 masters) took 0.875 s against 0.901 s with only the forward compiled
            # (medians of 10 alternating steps)
            forward_and_loss = torch.compile(forward_and_loss)
            self.log("torch.compile: the first steps (and the first validation) compile the model, which takes tens "
                     "of seconds; Inductor keeps the result on disk for later runs")
        self._log_run(mc, est["params"], device)

        # ---- files of the run
        metrics = open_metrics(run, cfg, self.resume, progress, data.summary,
                               start={"params": est["params"], "model": mc.to_hf()})
        if resumed:
            self.log(f"resumed {run} at step {progress.step} ({progress.tokens:,} tokens)")
        session = _Session(
            model=model, mc=mc, masters=masters, optimizer=optimizer,
            params=[p for g in optimizer.param_groups for p in g["params"]],
            batches=BatchStream(train_seqs, cfg.batch_size, cfg.seed, **progress.position),
            val_batches=val_batches, data_keys=data.summary["cache"], metrics=metrics, autocast=autocast,
            forward_and_loss=forward_and_loss, progress=progress, device=device)
        if not resumed:
            self._save(session)
        self.log(f"setup took {time.perf_counter() - t_setup:.1f} s")
        return session

    def _log_run(self, mc, n_params: int, device: torch.device) -> None:
        cfg = self.cfg
        experts = (f"{mc.n_routed_experts} routed experts top-{mc.num_experts_per_tok}" if mc.has_moe
                   else "dense: no MoE layer")
        self.log(f"model: preset {cfg.preset}, {n_params / 1e6:.2f} M parameters ({mc.num_hidden_layers} layers, "
                 f"d {mc.hidden_size}, {experts}, "
                 f"MTP depth {mc.num_nextn_predict_layers}, vocabulary {mc.vocab_size}); {device.type}, "
                 f"{precision_note(cfg.dtype, device)}"
                 + (", bf16 AdamW moments" if cfg.optimizer_states == "bf16" else "")
                 + f", {torch.get_num_threads()} threads")
        alpha = cfg.effective_balance_alpha
        self.log(f"training: {cfg.steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} = "
                 f"{cfg.tokens_per_step:,} tokens" + batch_warmup_note(cfg) + f", lr {cfg.lr:g}, balance "
                 f"{cfg.balance} (alpha {alpha:g}" + (f", gamma {cfg.bias_gamma:g}" if cfg.balance == "bias" else "")
                 + f"), MTP lambda {cfg.mtp_lambda:g}"
                 + (f", time budget {cfg.time_budget:g} min" if cfg.time_budget else ""))
        if warning := warmup_warning(cfg):
            self.log(warning)

    def _save(self, r: "_Session") -> None:
        st = r.progress.state(self.cfg, r.batches.position, r.data_keys)
        with r.masters.fp32_weights() if r.masters else contextlib.nullcontext():  # checkpoints hold fp32
            ckpt_io.save_checkpoint(self.run_dir, r.model, r.optimizer, st, self.cfg.to_dict(),
                                    keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ one optimizer step
    def _step(self, r: "_Session") -> dict[str, Any]:
        """Forward and backward of the step's micro-batches, clip, AdamW and the bias update (skipped when the
        loss or the gradient is NaN/inf); returns the step's metrics record (``skipped``: it did not update)."""
        cfg, progress = self.cfg, r.progress
        t0 = time.perf_counter()
        step = progress.step
        lr = learning_rate(step, cfg)
        for g in r.optimizer.param_groups:
            g["lr"] = lr
        lam, gamma, alpha = mtp_lambda(step, cfg), bias_gamma(step, cfg), cfg.effective_balance_alpha
        weights = (lam, alpha)
        if cfg.compile:  # as 0-d tensors, inputs of the compiled graph: a float is a constant of the graph, and the
            # switch to lambda's later value would compile the model again (tens of seconds, late in the run)
            weights = tuple(torch.tensor(v, dtype=torch.float32, device=r.device) for v in weights)
        n_micro = micro_batches(progress.tokens, cfg)
        tracker = ExpertLoadTracker()
        sums: dict[str, Any] = {"loss": 0.0, "main": 0.0, "mtp": 0.0, "balance": 0.0, "depth": None}
        try:
            for _ in range(n_micro):
                batch = r.batches.next().to(r.device)  # (batch_size, seq_len + 1)
                out, terms = r.forward_and_loss(batch[:, :-1], batch[:, 1:], *weights)
                (terms.total / n_micro).backward()
                if out.routing:
                    tracker.add(out.expert_counts)
                sums["loss"] += terms.total.item() / n_micro
                sums["main"] += terms.main.item() / n_micro
                sums["mtp"] += terms.mtp.item() / n_micro
                sums["balance"] += terms.balance.item() / n_micro
                depth = [t.item() / n_micro for t in terms.mtp_per_depth]
                sums["depth"] = depth if sums["depth"] is None else [a + b for a, b in zip(sums["depth"], depth)]
                del out, terms
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise TrainingError(self._oom_message(e)) from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
                raise TrainingError(self._oom_message(e)) from None
            raise
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if r.masters:
            grad_norm = r.masters.clip_grad_norm(clip)  # the step scales the gradients
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(r.params, clip))
        counts = tracker.take() if r.mc.n_routed_experts and not tracker.empty else None
        finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            if r.masters:
                r.masters.step(r.optimizer)  # AdamW on the masters, then the bf16 weights refreshed
            else:
                r.optimizer.step()
            if gamma and counts is not None:
                update_balance_bias(r.model, counts, gamma)
        if r.masters:
            r.masters.zero_grad()  # the pending bf16 gradients too
        else:
            r.optimizer.zero_grad(set_to_none=True)
        step_tokens = n_micro * cfg.batch_size * cfg.seq_len
        dt = time.perf_counter() - t0
        progress.step += 1
        progress.tokens += step_tokens
        progress.elapsed += dt
        progress.bad_streak = 0 if finite else progress.bad_streak + 1
        rec: dict[str, Any] = {
            "type": "train", "step": progress.step, "tokens": progress.tokens, "loss": sums["loss"],
            "main_loss": sums["main"], "mtp_loss": sums["mtp"], "mtp_losses": sums["depth"] or [],
            "balance_loss": sums["balance"], "lr": lr, "mtp_lambda": lam, "bias_gamma": gamma, "balance_alpha": alpha,
            "grad_norm": grad_norm, "tokens_per_s": step_tokens / dt, "step_time": dt, "elapsed": progress.elapsed,
            "skipped": not finite, "micro_batches": n_micro,
        }
        if counts is not None:
            mv = max_violation(counts)
            rec["maxvio_batch"] = [round(float(v), 5) for v in mv]
            rec["maxvio_batch_mean"] = float(mv.mean())
            rec["expert_counts"] = counts.tolist()
        if progress.step % cfg.log_every == 0 or not finite or progress.step == cfg.steps:
            r.metrics.append(rec)
        self._update_bar(rec)
        return rec

    def _skipped(self, r: "_Session", rec: dict[str, Any]) -> None:
        """A NaN/inf step: neither validated nor saved (the last good checkpoint stays the current one); the run
        stops after ``max_bad_steps`` of them in a row."""
        step, streak = r.progress.step, r.progress.bad_streak
        msg = nonfinite_message(step, rec["loss"], rec["grad_norm"], streak)
        self.log(msg)
        r.metrics.append({"type": "event", "step": step, "event": "nonfinite", "message": msg})
        if streak >= self.cfg.max_bad_steps:
            stop = streak_stop_message(self.run_dir, step, streak)
            r.metrics.append({"type": "event", "step": step, "event": "stopped", "message": stop})
            raise TrainingError(stop)

    def _fit_steps(self, cfg: TrainConfig, step: int, tokens: int, per_step: float, remaining: float, cap: int,
                   metrics: MetricsLog) -> TrainConfig | None:
        """Fit the run's number of steps to the time budget left, while that changes no step already taken.

        Until the cosine decay and the lambda / gamma switches begin, a step's learning rate, lambda and gamma
        do not depend on the total number of steps, so the run so far is exactly the run configured with the
        new total from the start (train_config.json records it; --resume continues it). Returns None once the
        schedule can no longer change.
        """
        frac = min(cfg.decay_start, cfg.mtp_lambda_switch, cfg.bias_gamma_switch if cfg.balance == "bias" else 1.0)
        if frac <= 0 or step >= frac * cfg.steps - 1:
            return None
        fit = step + affordable_steps(cfg, tokens, per_step, 0.97 * remaining)
        steps = max(min(cap, fit), math.floor(step / frac) + 2, 2 * FIT_PROBE_STEPS)
        if steps != cfg.steps:
            msg = (f"time budget: {per_step:.2f} s per step, {remaining / 60:.1f} min left: training {steps} "
                   f"steps (at most {cap})")
            self.log(msg)
            metrics.append({"type": "event", "step": step, "event": "fit_steps", "message": msg, "steps": steps})
            if self._bar is not None:
                self._bar.total = steps
                self._bar.refresh()
        return cfg.replace(steps=steps)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self, model, val_batches, autocast, step: int, tokens: int, metrics: MetricsLog):
        was = model.training
        model.eval()
        device = model.embed_tokens.weight.device
        total = n = 0.0
        depth_tot: list[float] = []
        depth_n: list[float] = []
        counts = None
        try:
            for batch in val_batches:
                batch = batch.to(device)
                with autocast():
                    out = model.forward_train(batch[:, :-1])
                (main_sum, main_n), *depths = cross_entropy_sums([out.logits, *out.mtp_logits], batch[:, 1:])
                total += main_sum
                n += main_n
                for k, (s, c) in enumerate(depths, start=1):
                    if len(depth_tot) < k:
                        depth_tot.append(0.0), depth_n.append(0.0)
                    depth_tot[k - 1] += s
                    depth_n[k - 1] += c
                if out.routing:
                    c = out.expert_counts.to(torch.int64)
                    counts = c if counts is None else counts + c
        finally:
            model.train(was)
        loss = total / max(n, 1)
        rec: dict[str, Any] = {"type": "val", "step": step, "tokens": tokens, "val_loss": loss,
                               "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(n),
                               "val_mtp_losses": [t / max(c, 1) for t, c in zip(depth_tot, depth_n)]}
        if counts is not None:
            mv = max_violation(counts)
            rec["maxvio_global"] = [round(float(v), 5) for v in mv]
            rec["maxvio_global_mean"] = float(mv.mean())
        metrics.append(rec)
        self.log(f"step {step}: validation loss {loss:.4f}, perplexity {rec['val_ppl']:.2f}"
                 + (f", MaxVio_global {rec['maxvio_global_mean']:.3f}" if counts is not None else ""))
        return step, loss

    # ------------------------------------------------------------------ progress
    def _open_bar(self, step: int) -> None:
        if not self.cfg.progress:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.cfg.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                         desc="train", mininterval=0.5, smoothing=0.1)

    def _update_bar(self, rec: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"loss {rec['main_loss']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | lr {rec['lr']:.2e}",
                                  refresh=False)
        self._bar.update(1)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _oom_message(self, e: BaseException) -> str:
        cfg = self.cfg
        good = ckpt_io.current_checkpoint(self.run_dir)
        return (f"out of memory in a micro-batch of {cfg.batch_size} x {cfg.seq_len} tokens: lower --batch-size "
                f"(raise --grad-accum to keep the tokens per step), --seq-len, or use --activation-checkpointing; "
                f"the last checkpoint ({good.name if good else 'none'}) is intact ({type(e).__name__})")


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or continue) the run in ``out``. See :class:`TrainConfig` for every setting."""
    return Trainer(cfg, out, resume=resume, overwrite=overwrite, log=log).run()
