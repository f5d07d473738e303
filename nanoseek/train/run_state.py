"""What the single-process and the distributed trainers share about a run: the checkpoint a resumed run
continues from, the progress saved with every checkpoint, the files a run writes when it starts or resumes,
and the messages of a NaN/inf streak and of the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from . import checkpoint as ckpt_io
from .config import RESUMABLE_CHANGES, TrainConfig
from .metrics import MetricsLog
from .optim import learning_rate


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (repeated NaN/inf, out of memory, a dead peer rank).

    ``rank``: under torchrun, the rank that hit it on its own (a collective failed as seen from there), which
    prints it; None when every rank stops the same way, and rank 0 alone prints it (nanoseek.errors.report_error).
    """

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


@dataclass
class Progress:
    """Where a run stands: saved in each checkpoint's training state, read back by ``--resume``."""

    step: int = 0  # optimizer steps taken (skipped NaN/inf steps included)
    tokens: int = 0  # tokens trained on
    elapsed: float = 0.0  # seconds spent in training steps (not set-up, validation or saves)
    bad_streak: int = 0  # NaN/inf steps in a row up to ``step``
    position: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "cursor": 0})  # of the data stream

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Progress":
        return cls(step=state["step"], tokens=state["tokens"], elapsed=float(state["elapsed"]),
                   bad_streak=int(state.get("bad_streak", 0)),
                   position={"epoch": state["data"]["epoch"], "cursor": state["data"]["cursor"]})

    def state(self, cfg: TrainConfig, position: dict[str, int], data_keys: Any, **extra: Any) -> dict[str, Any]:
        """The checkpoint's training state (``position``: the data stream's now)."""
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "data": position,
                "data_keys": data_keys, "bad_streak": self.bad_streak,
                "lr": learning_rate(max(self.step - 1, 0), cfg), "seed": cfg.seed, **extra}


@dataclass
class ResumePoint:
    checkpoint: Path  # the run's current checkpoint directory
    state: dict[str, Any]  # its training state
    saved_config: dict[str, Any]  # the run's train_config.json as the checkpoint recorded it


def resume_mismatches(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from the checkpoint's and may not (not in RESUMABLE_CHANGES)."""
    # a setting the checkpoint lacks was added later, with a default that keeps what the run did
    saved = {**TrainConfig().to_dict(), **saved}
    now = cfg.to_dict()
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != now.get(key):
            out.append(f"{key} {now.get(key)!r} (checkpoint: {saved.get(key)!r})")
    return out


def check_resumable(run: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A ValueError naming the settings of ``cfg`` that would not continue the run the checkpoint saved."""
    bad = resume_mismatches(saved, cfg)
    if bad:
        raise ValueError(f"cannot resume {run} with a different configuration: {'; '.join(bad)} "
                         f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")


def resume_point(run: Path, cfg: TrainConfig) -> ResumePoint:
    """The checkpoint ``run`` continues from; a ValueError naming the settings that would not continue it."""
    ckpt_dir, state, saved = ckpt_io.read_checkpoint_config(run)
    check_resumable(run, saved, cfg)
    return ResumePoint(ckpt_dir, state, saved)


def resumed_tokenizer(run: Path, ckpt_dir: Path) -> Path:
    """The run's tokenizer.json (in the run directory, or else in its checkpoint)."""
    tok = run / "tokenizer.json"
    return tok if tok.is_file() else ckpt_dir / "tokenizer.json"


def check_same_corpus(run: Path, state: dict[str, Any], data_keys: Any) -> None:
    saved = state.get("data_keys")
    if saved and saved != data_keys:
        raise ValueError(f"cannot resume {run}: the corpus changed since the checkpoint (its documents or "
                         "tokenizer differ), so the data order would not continue")


def open_metrics(run: Path, cfg: TrainConfig, resume: bool, progress: Progress, data_summary: dict[str, Any],
                 start: dict[str, Any]) -> MetricsLog:
    """The run's metrics.jsonl: on resume, pruned to the checkpoint's step with a ``resume`` event; on a new
    run, emptied, with data.json and a ``start`` event (``start``: more fields for it). Also saves the config
    (a time-budget fit or a resume may have changed the number of steps)."""
    metrics = MetricsLog(run / "metrics.jsonl")
    layout = {"layout": start["layout"]} if "layout" in start else {}
    if resume:
        ckpt_io.prune(run, cfg.keep_checkpoints)  # leftovers of a save that was interrupted
        metrics.truncate_after(progress.step)
        metrics.append({"type": "event", "step": progress.step, "event": "resume",
                        "message": f"resumed at step {progress.step}", **layout})
    else:
        metrics.reset()
        atomic_write_json(run / "data.json", data_summary)
        metrics.append({"type": "event", "step": 0, "event": "start", "message": "training started", **start})
    cfg.save(run / ckpt_io.CONFIG_FILE)
    return metrics


# ---------------------------------------------------------------------------------------------- messages
def batch_warmup_note(cfg: TrainConfig) -> str:
    if cfg.batch_warmup_start is None:
        return ""
    return (f" (batch-size warmup: {cfg.batch_warmup_start} sequences per step at the start, growing to "
            f"{cfg.batch_size * cfg.grad_accum} over {cfg.batch_warmup_tokens:,} tokens)")


def warmup_warning(cfg: TrainConfig) -> str | None:
    """A learning-rate warmup as long as the run (e.g. the default 30 steps in a 20-step run)."""
    if cfg.warmup_steps < cfg.steps:
        return None
    return (f"warning: --warmup-steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the learning rate never "
            f"reaches --lr {cfg.lr:g} and never decays")


def nonfinite_message(step: int, loss: float, grad_norm: float, bad_streak: int) -> str:
    return (f"step {step}: the loss or gradient is not finite (loss {loss}, grad norm {grad_norm}); the step was "
            f"skipped ({bad_streak} in a row)")


def streak_stop_message(run: Path, step: int, bad_streak: int, resume_flags: str = "") -> str:
    """The stop after --max-bad-steps NaN/inf steps in a row. A resume keeps the run's learning rate (see
    RESUMABLE_CHANGES): a lower one is a new run started from the checkpoint's weights (--init-from)."""
    good = ckpt_io.current_checkpoint(run)
    return (f"stopped: the loss was NaN/inf in {bad_streak} consecutive steps (up to step {step}); the last good "
            f"checkpoint ({good.name if good else 'none'}) is intact. Check the data, then resume with --resume {run}"
            + (f" {resume_flags}" if resume_flags else "") + f" (a larger --max-bad-steps skips more bad steps), or "
            f"start a new run with a lower --lr from its weights: --init-from {run} --out NEW_RUN")


def end_event(run: Path, cfg: TrainConfig, stopped_by: str, progress: Progress) -> dict[str, Any]:
    """The run's last metrics event: ``time_budget`` for a stop on the budget, else ``done``."""
    if stopped_by == "time_budget":
        event, msg = "time_budget", f"time budget of {cfg.time_budget:g} min reached at step {progress.step}/{cfg.steps}"
    else:
        event, msg = "done", finished(run, progress.bad_streak)
    return {"type": "event", "step": progress.step, "event": event, "message": msg}


def finished(run: Path, bad_streak: int) -> str:
    """The message of a run that trained all its steps (the last ``bad_streak`` of them skipped as NaN/inf)."""
    if not bad_streak:
        return "finished"
    good = ckpt_io.current_checkpoint(run)
    return (f"finished, but the last {bad_streak} steps were NaN/inf and skipped, so nothing after them was saved: "
            f"the checkpoint is the last good one ({good.name if good else 'none'})")
